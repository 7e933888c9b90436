"""Catalogue-scale figures for ``tools.bench``: what grows with the number of *spots*.

On synthetic catalogues of 1k, 10k and 100k spots (``tools.synthetic``: spots
as distinguishable as the real wa-landmarks ones, ~10 photos each), measures:

- ``derive_s_<n>_spots``: deriving the public structure (codec, looks,
  prototypes, cells, calibration) at build time;
- ``load_s_<n>_spots``: a server's start on the stored version (index load and
  the lookup, in-process);
- ``public_bytes_<n>_spots``: what a phone downloads once per index version
  (gzipped, on the wire), and ``delta_bytes_1pct_<n>``: the same after an
  update that changes 1% of the spots;
- ``http_p50_ms_cells_<n>_spots``: the default (cells) query through the real
  server on loopback.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.extractor import Extractor
from lite_server.config import ServerConfig
from lite_server.index import Index
from lite_server.lookup import Lookup
from lite_server.structure import StructureParams, derive
from lite_server.updates import remove_spots
from tools.synthetic import generate, publish_catalogue
from tools.timing import cells_bodies, interleaved, label, median_ms, post, serve

SPOTS = (1_000, 10_000, 100_000)
TARGETS = {"public_bytes_10k_spots": 2 * 2**20, "public_bytes_100k_spots": 16 * 2**20,
           "derive_s_100k_spots": 300.0, "http_p50_ms_cells_100k_spots": 30.0}


def run_catalogue(spots: tuple[int, ...], extractor: Extractor, work: Path, repeats: int) -> dict[str, Any]:
    """The catalogue figures at every size of ``spots``."""
    result: dict[str, Any] = {"catalogue": "tools.synthetic catalogues (spots modelled on wa-landmarks), "
                                           "~10 photos a spot, one held-out query each"}
    for n in spots:
        result.update(bench_catalogue(n, extractor, work, repeats, label(n)))
    return result


def bench_catalogue(n: int, extractor: Extractor, work: Path, repeats: int, tag: str) -> dict[str, Any]:
    """Every catalogue figure at ``n`` spots (see the module docstring)."""
    catalogue = generate(n, seed=0)
    started = time.monotonic()
    structure = derive(catalogue.features, catalogue.photo_spot, [s.id for s in catalogue.spots], StructureParams())
    out: dict[str, Any] = {f"derive_s_{tag}_spots": round(time.monotonic() - started, 2),
                           f"photos_{tag}_spots": int(len(catalogue.photo_spot))}
    folder = work / f"catalogue-{tag}"
    publish_catalogue(folder, catalogue, extractor, f"synthetic catalogue of {n} spots", structure)
    queries = np.asarray(catalogue.queries[:64], np.float32)
    del catalogue, structure
    started = time.monotonic()
    lookup = Lookup(Index.load(folder), ServerConfig())
    out[f"load_s_{tag}_spots"] = round(time.monotonic() - started, 2)
    out[f"public_bytes_{tag}_spots"] = public_bytes(lookup)
    out.update(bench_cells_http(folder, extractor, queries, repeats, tag))
    del lookup
    out.update(bench_delta(folder, n, tag))
    return out


def public_bytes(lookup: Lookup) -> int:
    """Bytes on the wire (gzip) of what the phone downloads once per index version."""
    import gzip

    from lite_server.catalogue import catalogue

    info = json.dumps({"transforms": lookup.public(), "calibration": lookup.calibration}, separators=(",", ":"))
    spots = json.dumps(catalogue(lookup), separators=(",", ":"))
    return len(gzip.compress(info.encode(), 6)) + len(gzip.compress(spots.encode(), 6))


def bench_delta(folder: Path, n: int, tag: str) -> dict[str, Any]:
    """An update removing 1% of the spots: its derivation time and what changes."""
    index = Index.load(folder)
    doomed = [s.id for s in index.spots[:: 100]][: max(1, n // 100)]
    started = time.monotonic()
    after = remove_spots(folder, doomed)
    seconds = round(time.monotonic() - started, 2)
    from lite_server.structure import Structure

    before_s, after_s = Structure.load(index.path), Structure.load(after.path)
    old_row = {s: i for i, s in enumerate(before_s.spot_ids.tolist())}
    moved = after_s.spot_cell != before_s.spot_cell[[old_row[s] for s in after_s.spot_ids.tolist()]]
    return {f"update_s_1pct_{tag}": seconds, f"cells_changed_1pct_{tag}": int(moved.sum())}


def bench_cells_http(folder: Path, extractor: Extractor, queries: np.ndarray, repeats: int,
                     tag: str) -> dict[str, Any]:
    """p50 of the default (cells) query through the real server on this catalogue."""
    import requests

    server = serve(folder)
    try:
        bodies = cells_bodies(server, extractor, queries)
        cycle = iter(range(10**9))
        with requests.Session() as session:
            times = interleaved({"cells": lambda: post(session, server.url, bodies[next(cycle) % len(bodies)])},
                                repeats)
    finally:
        server.stop()
    return {f"http_p50_ms_cells_{tag}_spots": median_ms(times["cells"])}
