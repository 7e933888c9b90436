"""``enfpire-client``: the device's command line."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

from .config import ClientConfig, load_config
from .errors import EnfPireError
from .extractor import Extractor


def _extract(args: argparse.Namespace, config: ClientConfig) -> int:
    extractor = Extractor(config.model_path(), num_threads=config.num_threads, max_pixels=config.max_pixels)
    feature = extractor.extract(args.photo)
    if args.json:
        print(json.dumps({
            "dim": extractor.dim, "feature": [round(float(x), 7) for x in feature],
            "model": extractor.model_path.name, "model_sha256": extractor.sha256,
            "interpreter": extractor.runtime,
        }))
    else:
        print(f"{extractor!r}")
        print(" ".join(f"{x:.5f}" for x in feature))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, ClientConfig], int]] = {"extract": _extract}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enfpire-client", description="EnfPire device client")
    parser.add_argument("--config", help="JSON config file (ENFPIRE_* variables and flags override it)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("extract", help="print a photo's feature vector")
    p.add_argument("photo")
    p.add_argument("--model", help="extractor .tflite (default: models/ or ~/.enfpire/models)")
    p.add_argument("--json", action="store_true", help="one JSON object with the feature and the model")
    return parser


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields a command line set explicitly."""
    names = ("model", "server", "transform", "strength", "k", "threshold", "dummies", "seed")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(ClientConfig, args.config, **overrides(args))
        return COMMANDS[args.command](args, config)
    except EnfPireError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
