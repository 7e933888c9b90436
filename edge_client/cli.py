"""``enfpire-client``: the device's command line."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

from .client import Client, clear_caches
from .config import ClientConfig, load_config
from .dummies.generator import PersonaGenerator
from .dummies.scheduler import DummyScheduler
from .errors import ConfigError, EnfPireError
from .privacy.recognizer import Recognition
from .vision.extractor import Extractor


def _extract(args: argparse.Namespace, config: ClientConfig) -> int:
    """One feature per photo (one JSON line each with --json), decoding ahead of the interpreter."""
    extractor = Extractor(config.model_path(), num_threads=config.num_threads, max_pixels=config.max_pixels,
                          reference_kernels=config.reference_kernels)
    if not args.json:
        print(f"{extractor!r}")
    for photo, feature in zip(args.photo, extractor.extract_many(args.photo)):
        if args.json:
            print(json.dumps({
                "photo": photo, "dim": extractor.dim, "feature": [round(float(x), 7) for x in feature],
                "model": extractor.model_path.name, "model_sha256": extractor.sha256,
                "interpreter": extractor.runtime, "kernels": "reference" if extractor.reference_kernels else "fast",
            }), flush=True)
        else:
            print(" ".join(f"{x:.5f}" for x in feature))
    return 0


def _recognize(args: argparse.Namespace, config: ClientConfig) -> int:
    if args.camera:
        from .vision.camera import capture_frame

        photo: object = capture_frame()
    elif args.photo:
        photo = args.photo
    else:
        raise ConfigError("give a PHOTO or --camera")
    with Client(config) as client:
        if config.dummies <= 0:
            _print_answer(args, client.recognize(photo), 0)  # type: ignore[arg-type]
            return 0
        scheduler = DummyScheduler(client, lambda: PersonaGenerator.from_client(client))
        # The answer is printed the moment it arrives; the rest of the burst still leaves
        # before the exit (a burst cut short would show which request came last).
        scheduler.recognize_once(photo, lambda result: _print_answer(  # type: ignore[arg-type]
            args, result, scheduler.counts["dummy_planned"]))
    return 0


def _print_answer(args: argparse.Namespace, result: Recognition, dummies: int) -> None:
    """The answer on stdout, flushed at once: the user's wait ends here."""
    if args.json:
        print(json.dumps({**result.to_dict(), "dummies": dummies}), flush=True)
    elif result.spot_id is None:
        best = f"; closest {result.candidates[0].name}" if result.candidates else ""
        print(f"not a known spot (score {result.score:.3f}{_confidence(result)} below the operating point{best})",
              flush=True)
    else:
        where = f" at {result.lat:.5f}, {result.lon:.5f}" if result.lat is not None and result.lon is not None else ""
        print(f"{result.name}{where}  score {result.score:.3f}{_confidence(result)}  "
              f"({len(result.candidates)} candidates, {result.bytes_sent + result.bytes_received} bytes)", flush=True)
    if not args.json and result.privacy is not None:
        print(privacy_line(result.privacy), flush=True)


def privacy_line(receipt: dict[str, Any]) -> str:
    """The privacy receipt in one line (computed on this device, never sent)."""
    if not receipt.get("request_sent"):
        return "privacy: answered from this device's cache, nothing was sent"
    line = (f"privacy: the server's view fits {receipt['plausible_spots']:.1f} spots equally well; its best guess "
            f"has probability {receipt['server_top1_probability']:.2f}")
    if receipt.get("answer_probability") is not None:
        line += f", this answer {receipt['answer_probability']:.2f}"
    if receipt.get("privacy_floor") and not receipt.get("floor_reached"):
        line += f" (below the privacy floor of {receipt['privacy_floor']:g}: the decoy cap was reached)"
    return line + f" ({receipt['cells_sent']} cells sent)"


def _confidence(result: Recognition) -> str:
    return "" if result.confidence is None else f", confidence {result.confidence:.2f}"


def _info(args: argparse.Namespace, config: ClientConfig) -> int:
    with Client(config) as client:
        print(json.dumps(client.info(), indent=2))
    return 0


def _clear_cache(args: argparse.Namespace, config: ClientConfig) -> int:
    removed = clear_caches(config, every_server=not args.server)
    print(f"removed {removed} cache file(s) from {config.state_path() / 'cache'}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, ClientConfig], int]] = {
    "extract": _extract, "recognize": _recognize, "info": _info, "clear-cache": _clear_cache}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enfpire-client", description="EnfPire device client")
    parser.add_argument("--config", help="JSON config file (ENFPIRE_* variables and flags override it)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("extract", help="print photos' feature vectors")
    p.add_argument("photo", nargs="+")
    p.add_argument("--model", help="extractor .tflite or registered model name (default: models/ or ~/.enfpire/models)")
    p.add_argument("--json", action="store_true", help="one JSON object a line: the photo, its feature and the model")
    p.add_argument("--reference-kernels", action="store_const", const=True, dest="reference_kernels",
                   help="TFLite's reference kernels: the same feature on every CPU (x86-64, aarch64), far slower")
    p = sub.add_parser("recognize", help="which spot is in a photo (privately)")
    p.add_argument("photo", nargs="?")
    p.add_argument("--camera", action="store_true", help="capture one frame with picamera2")
    p.add_argument("--server", help="server URL (default http://127.0.0.1:8080)")
    p.add_argument("--model")
    p.add_argument("--k", type=int, help="candidate spots to ask for")
    p.add_argument("--transform", help="privacy transform (default: the library's default)")
    p.add_argument("--strength", type=float)
    p.add_argument("--keep", type=float, metavar="SHARE",
                   help="open set: share of photos of known spots still answered (default 0.95; 1 = always answer)")
    p.add_argument("--threshold", type=float, help="below this score answer 'not a known spot' (overrides --keep)")
    p.add_argument("--seed", type=int)
    p.add_argument("--dummies", type=int, metavar="N", help="dummy requests sent with the real one (default 2)")
    p.add_argument("--no-dummies", action="store_const", const=0, dest="dummies", help="send the real request alone")
    p.add_argument("--no-cache", action="store_false", dest="cache", default=None,
                   help="always ask the server: neither read nor keep answers on this device")
    p.add_argument("--privacy-floor", type=float, metavar="N",
                   help="add decoy groups until at least N spots are plausible by this device's receipt (0 = off)")
    p.add_argument("--json", action="store_true")
    _relay_flags(p)
    p = sub.add_parser("info", help="print the server's /v1/info")
    p.add_argument("--server")
    _relay_flags(p)
    p = sub.add_parser("clear-cache", help="forget the answers and server info this device kept")
    p.add_argument("--server", help="only this server's (default: every server's)")
    return parser


def _relay_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--relay", metavar="URL", help="send every request through this Oblivious HTTP relay")
    p.add_argument("--gateway-keys", metavar="KEYS",
                   help="the gateway's key configuration (hex/base64) or its sha256; default: the signed schedule")
    p.add_argument("--server-identity", metavar="KEY",
                   help="the server's Ed25519 identity (hex/base64, from `enfpire-server ohttp show`) every key "
                        "configuration must be signed by; default: pin the identity first seen")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields a command line set explicitly."""
    names = ("model", "server", "transform", "strength", "k", "keep", "threshold", "dummies", "seed", "cache", "relay",
             "gateway_keys", "server_identity", "reference_kernels", "privacy_floor")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(ClientConfig, args.config, **overrides(args))
        return COMMANDS[args.command](args, config)
    except EnfPireError as exc:  # one line and exit 2; a PrivacyFloorError names the floor the server fails
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
