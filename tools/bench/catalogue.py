"""Catalogue-scale figures for ``tools.bench.cli``: what grows with the number of *spots*.

On synthetic catalogues of 1k, 10k and 100k spots (``tools.bench.synthetic``: spots
as distinguishable as the real wa-landmarks ones, ~10 photos each), measures:

- ``derive_s_<n>_spots``: deriving the public structure (codec, looks,
  prototypes, cells, calibration) at build time;
- ``load_s_<n>_spots``: a server's start on the stored version, from launching
  ``lite_server.cli serve`` to ``/readyz`` answering;
- ``public_bytes_<n>_spots``: what a phone downloads once per index version
  (``GET /v1/public`` from that server, gzipped, on the wire), and
  ``delta_bytes_1pct_<n>``: the same after an update that changes 1% of the spots;
- ``http_p50_ms_cells_<n>_spots``: the default (cells) query through the real
  server on loopback.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.vision.extractor import Extractor
from lite_server.api.updates import photo_rows, remove_spots
from lite_server.config import ServerConfig
from lite_server.index.store import Index, publish
from lite_server.index.structure import Structure, StructureParams, derive
from lite_server.search.lookup import Lookup
from lite_server.search.publication import PublicParams, build, delta_bytes, public_bytes
from tools.bench.synthetic import SyntheticCatalogue, generate, publish_catalogue
from tools.bench.timing import cells_bodies, get_public, interleaved, label, median_ms, post, save_plot, serve, timed
from tools.live import LiveServer

SPOTS = (1_000, 10_000, 100_000)
TARGETS = {"public_bytes_10k_spots": 2 * 2**20, "public_bytes_100k_spots": 16 * 2**20,
           "delta_bytes_share_1pct_100k": 0.05,
           "derive_s_100k_spots": 300.0, "http_p50_ms_cells_100k_spots": 30.0}


def run_catalogue(spots: tuple[int, ...], extractor: Extractor, work: Path, repeats: int) -> dict[str, Any]:
    """The catalogue figures at every size of ``spots``."""
    result: dict[str, Any] = {"catalogue": "tools.bench.synthetic catalogues (spots modelled on wa-landmarks), "
                                           "~10 photos a spot, one held-out query each"}
    seconds: dict[str, float] = {}
    for n in spots:
        with timed(seconds, f"catalogue_{label(n)}"):
            result.update(bench_catalogue(n, extractor, work, repeats, label(n)))
    result["catalogue_seconds"] = seconds
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
    del structure
    started = time.monotonic()
    server = serve(folder)
    try:
        out[f"load_s_{tag}_spots"] = round(time.monotonic() - started, 2)
        public, out[f"public_bytes_{tag}_spots"] = get_public(server)
        out.update(bench_cells_http(server, extractor, queries, repeats, tag))
    finally:
        server.stop()
    if out[f"public_bytes_{tag}_spots"] != public_bytes(public):
        raise RuntimeError("the served document's size differs from the size delta_bytes compares with")
    out.update(bench_update(folder, catalogue, public, tag))
    return out


def bench_update(folder: Path, catalogue: SyntheticCatalogue, public: PublicParams, tag: str) -> dict[str, Any]:
    """An update that changes 1% of the spots, as ``index add`` makes them: half of them
    gain a photo (their held-out query), half are new spots. Its derivation time, how many
    spots' cells moved and the phone's delta from ``public`` (the version before); then the
    cells moved by removing 1% of the spots."""
    index = Index.load(folder)
    n = len(index.spots)
    grown = np.arange(0, n, 200)[: max(1, n // 200)]
    fresh = generate(max(1, n // 200), seed=2)
    new_spots = [replace(s, id=f"new-{s.id}") for s in fresh.spots]
    rows = photo_rows(index) + [(index.spots[s].id, f"added/{s}.jpg") for s in grown] \
        + [(new_spots[s].id, f"added/new-{i}.jpg") for i, s in enumerate(fresh.photo_spot)]
    first_query = np.searchsorted(catalogue.query_spot, grown)
    features = np.concatenate([np.asarray(index.features), catalogue.queries[first_query], fresh.features])
    manifest = {**index.manifest, "bench": "1% of the spots changed"}
    started = time.monotonic()
    after = publish(folder, manifest, index.spots + new_spots, rows, features, update=True)
    out: dict[str, Any] = {f"update_s_1pct_{tag}": round(time.monotonic() - started, 2),
                           f"cells_moved_1pct_{tag}": cells_moved(index, after)}
    updated = document_of(after)
    out[f"delta_bytes_1pct_{tag}"] = delta_bytes(public, updated)
    out[f"delta_bytes_share_1pct_{tag}"] = round(out[f"delta_bytes_1pct_{tag}"] / public_bytes(public), 4)
    removed = remove_spots(folder, [s.id for s in index.spots[1::100]])
    out[f"cells_moved_remove_1pct_{tag}"] = cells_moved(after, removed)
    out[f"delta_bytes_share_remove_1pct_{tag}"] = round(
        delta_bytes(updated, document_of(removed)) / public_bytes(updated), 4)
    return out


def document_of(index: Index) -> PublicParams:
    """The public document of a version, from its stored structure (no search backend to load)."""
    return build(Lookup(index, ServerConfig(), search=False))


def cells_moved(before: Index, after: Index) -> int:
    """Spots of both versions whose cell changed."""
    old, new = Structure.load(before.path), Structure.load(after.path)
    old_row = {s: i for i, s in enumerate(old.spot_ids.tolist())}
    both = [(i, old_row[s]) for i, s in enumerate(new.spot_ids.tolist()) if s in old_row]
    return int(sum(new.spot_cell[i] != old.spot_cell[j] for i, j in both))


def bench_cells_http(server: LiveServer, extractor: Extractor, queries: np.ndarray, repeats: int,
                     tag: str) -> dict[str, Any]:
    """p50 of the default (cells) query through the real server on this catalogue."""
    import requests

    bodies = cells_bodies(server, extractor, queries)
    cycle = iter(range(10**9))
    with requests.Session() as session:
        times = interleaved({"cells": lambda: post(session, server.url, bodies[next(cycle) % len(bodies)])}, repeats)
    return {f"http_p50_ms_cells_{tag}_spots": median_ms(times["cells"])}


def plot_catalogue(result: dict[str, Any], path: Path) -> bool:
    """Bytes and seconds against the number of spots (log axes); False when nothing was measured."""
    sizes = sorted({int(k.split("_")[-2].rstrip("k")) * 1000 for k in result
                    if k.startswith("derive_s_") and k.endswith("k_spots")})
    if not sizes:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, name in (("public_bytes_{}_spots", "full public document (gzip)"),
                      ("delta_bytes_1pct_{}", "delta after a 1% update (gzip)")):
        points = [(n, result[key.format(label(n))] / 2**20) for n in sizes if key.format(label(n)) in result]
        left.plot(*zip(*points), marker="o", label=name)
    left.plot([10_000, 100_000], [2, 16], "r+", markersize=12, label="targets (2 MB, 16 MB)")
    left.set(xscale="log", yscale="log", xlabel="spots", ylabel="MB on the wire", title="What a phone downloads")
    for key, name in (("derive_s_{}_spots", "derive the structure (build)"), ("load_s_{}_spots", "server load"),
                      ("update_s_1pct_{}", "update of 1% of the spots")):
        points = [(n, result[key.format(label(n))]) for n in sizes if key.format(label(n)) in result]
        right.plot(*zip(*points), marker="o", label=name)
    right.axhline(300, color="red", linewidth=0.8, label="5 min target (derive, 100k)")
    right.set(xscale="log", yscale="log", xlabel="spots (~10 photos each)", ylabel="seconds",
              title="Build and start-up")
    save_plot(fig, (left, right), path)
    return True
