"""``make demo``: the main job end to end.

1. Sanity: the source classifier calls parrot.jpg a macaw.
2. Index: one photo of every wa-landmarks spot is held out, the rest indexed
   (features cached in .cache, the index kept in .cache/demo-index).
3. Serve: ``enfpire-server serve`` (waitress) on a free 127.0.0.1 port.
4. Recognize every held-out photo through the real HTTP path with the
   default privacy transform, and print what the phone found next to what
   the server could guess from the query it received.
5. Linked photos: one phone photographs one landmark five times; with the
   answer cache (the default) it asks the server once or twice, without it
   five times.
6. Oblivious HTTP: a few photos again, direct and through ``enfpire-relay``
   on 127.0.0.2, with the peer address the server logged for each path (the
   phone's for direct, only the relay's for OHTTP).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from edge_client.client import Client
from edge_client.config import ClientConfig
from edge_client.errors import PrivacyFloorError
from edge_client.privacy.recognizer import Recognition
from edge_client.vision.extractor import Extractor
from lite_server.index.store import BadIndexError, Index
from tools import dataset as ds
from tools.live import LiveRelay, LiveServer

ROOT = Path(__file__).resolve().parent.parent
SHARED_MODELS = ROOT.parent / "shared" / "models"


def sanity_check() -> None:
    """Classify the parrot photo with the source classifier: proves preprocessing and quantization."""
    classifier = Extractor(SHARED_MODELS / "mobilenet_v2_1.0_224_quant.tflite")
    labels = (SHARED_MODELS / "imagenet_labels.txt").read_text().splitlines()
    scores = classifier.extract(SHARED_MODELS / "parrot.jpg")
    print(f"sanity: parrot.jpg -> {labels[int(np.argmax(scores))]} ({classifier.runtime})")


def demo_index(data: ds.Dataset, gallery: np.ndarray, extractor: Extractor, out: Path) -> Index:
    """The demo's index, rebuilt only when the photos or the model changed."""
    try:
        index = Index.load(out)
        if index.model_sha256 == extractor.sha256 and len(index.photo_spot) == len(gallery):
            return index
    except BadIndexError:
        pass
    started = time.monotonic()
    matrix = ds.features(data, extractor)
    index = ds.build_from_features(data, gallery, matrix, extractor, out)
    print(f"index: {len(index.spots)} spots, {len(gallery)} photos ({time.monotonic() - started:.0f} s)")
    return index


def run(dataset_root: Path, show: int) -> int:
    sanity_check()
    data = ds.load_dataset(dataset_root)
    gallery, queries = ds.hold_out_one(data)
    extractor = Extractor(ClientConfig().model_path(), num_threads=0)
    index = demo_index(data, gallery, extractor, ds.CACHE / "demo-index")
    server = LiveServer(index.path.parent.parent, "-v", "--log-peers")
    try:
        # Every held-out photo stands for another tourist: no answer cache between them.
        with Client(ClientConfig(server=server.url, seed=0, cache=False), extractor=extractor) as client:
            print(f"server: {server.url}  transform: {client.transform!r}\n")
            popular = Counter(data.photos[r][0] for r in gallery)  # what the server knows of demand
            rows = [_ask(client, data, row, popular) for row in queries]
        _print_table(rows, show)
        linked(server, data, extractor)
        oblivious(server, data, queries[:5], extractor)
        lying(index.path.parent.parent, data, queries[0], extractor)
    finally:
        server.stop()
    return 0


def linked(server: LiveServer, data: ds.Dataset, extractor: Extractor, photos: int = 5) -> None:
    """Five photos of one landmark from one phone, with and without its answer cache."""
    spot = next(s for s in sorted(data.spots) if sum(p[0] == s for p in data.photos) >= photos)
    shots = [path for s, path in data.photos if s == spot][:photos]
    print(f"\nLinked photos: {photos} photos of {data.spots[spot].name} from one phone")
    for name, cache in (("default (answer cache)", True), ("--no-cache", False)):
        with tempfile.TemporaryDirectory() as state, \
                Client(ClientConfig(server=server.url, seed=0, cache=cache, state_dir=state), extractor=extractor) as client:
            asked = [client.ask(extractor.extract(path)) for path in shots]
        sent = sum(body is not None for body, _ in asked)
        found = Counter(result.name or "unknown" for _, result in asked).most_common(1)[0]
        print(f"  {name:23} requests to the server: {sent} of {photos}; the phone found {found[0]} {found[1]} times")


def oblivious(server: LiveServer, data: ds.Dataset, rows: list[int], extractor: Extractor) -> None:
    """The same photos direct and through a relay on 127.0.0.2, with what the server saw of each."""
    relay = LiveRelay(server, "127.0.0.2")
    print(f"\nOblivious HTTP: relay {relay.url} -> gateway {server.url}/ohttp")
    try:
        with tempfile.TemporaryDirectory() as state:
            for name, settings in (("direct", {}), ("via relay", {"relay": relay.url, "state_dir": state})):
                mark = len(server.output())
                with Client(ClientConfig(server=server.url, seed=0, cache=False, **settings),
                            extractor=extractor) as client:
                    found = [client.recognize(data.photos[row][1]).name or "unknown" for row in rows]
                peers = Counter(re.findall(r"peer (\S+): ", server.output()[mark:]))
                print(f"  {name:9}  found: {', '.join(f[:18] for f in found)}")
                print(f"  {'':9}  server saw requests from: {dict(peers)}")
    finally:
        relay.stop()


def lying(index_root: Path, data: ds.Dataset, row: int, extractor: Extractor) -> None:
    """Beside the honest server, one that lies about its structure (cells of one spot each, which
    would show the server every photo's spot): the phone checks the document against its own
    floors and refuses, sending no query."""
    liar = LiveServer(index_root, "-v", "--log-peers", env={"ENFPIRE_CELL_MIN_SPOTS": "1"})
    print(f"\nA lying server: {liar.url} publishes cells of one spot each (cell_min_spots 1)")
    try:
        with tempfile.TemporaryDirectory() as state, \
                Client(ClientConfig(server=liar.url, seed=0, cache=False, state_dir=state), extractor=extractor) as client:
            try:
                found = client.recognize(data.photos[row][1]).name or "not a known spot"
                print(f"  the phone accepted it and found {found}: its floors did not hold")
            except PrivacyFloorError as exc:
                print(f"  the phone refused: {exc}")
        asked = len(re.findall(r"POST /v1/candidates", liar.output()))
        print(f"  candidates requests that reached it: {asked}")
    finally:
        liar.stop()


def _ask(client: Client, data: ds.Dataset, row: int, popular: Counter[str]) -> dict[str, object]:
    spot, photo = data.photos[row]
    body, result = client.ask(client.extractor.extract(photo))  # type: ignore[union-attr]
    return {"spot": data.spots[spot].name, "found": result.name or "not a known spot", "ok": result.spot_id == spot,
            "declined": result.spot_id is None, "best_ok": result.best == spot,
            "n": len(result.candidates), "server": _server_guess(client, body, result, popular) == spot,
            "bytes": result.bytes_sent + result.bytes_received}


def _server_guess(client: Client, body: dict[str, object], result: Recognition, popular: Counter[str]) -> str | None:
    """The server's own best guess from what it received: for a vector, its recognizer's
    top-1 (asked again with k = 1); for cells, the most popular spot it sent back
    (the full transform-aware attack is in tools/evaluate/cli.py)."""
    if "vector" not in body:
        return max((c.id for c in result.candidates), key=lambda i: popular[i], default=None)
    candidates, _, _ = client.query({**body, "k": 1})
    return str(candidates[0]["id"]) if candidates else None


def _print_table(rows: list[dict[str, object]], show: int) -> None:
    print(f"{'spot':32} {'phone found':32} {'ok':3} {'cands':>5} {'server ok':>9}")
    for r in rows[:show]:
        print(f"{str(r['spot'])[:32]:32} {str(r['found'])[:32]:32} {'yes' if r['ok'] else 'no':3} "
              f"{r['n']:>5} {'yes' if r['server'] else 'no':>9}")
    if len(rows) > show:
        print(f"... {len(rows) - show} more")
    n = len(rows)
    phone = sum(bool(r["ok"]) for r in rows) / n
    server = sum(bool(r["server"]) for r in rows) / n
    declined = sum(bool(r["declined"]) for r in rows)
    closed = sum(bool(r["best_ok"]) for r in rows) / n
    print(f"\n{n} held-out photos: phone top-1 {phone:.3f} ({declined} declined as not a known spot; "
          f"{closed:.3f} if it always answered), server's own guess {server:.3f}, "
          f"{np.mean([r['n'] for r in rows]):.0f} candidates, {np.median([r['bytes'] for r in rows]) / 1024:.1f} KiB a query")
    print(json.dumps({"queries": n, "phone_top1": round(phone, 4), "server_top1": round(server, 4)}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description="EnfPire end to end")
    parser.add_argument("--dataset", type=Path, default=ds.DEFAULT_DATASET)
    parser.add_argument("--show", type=int, default=15, help="table rows to print")
    args = parser.parse_args(argv)
    return run(args.dataset, args.show)


if __name__ == "__main__":
    sys.exit(main())
