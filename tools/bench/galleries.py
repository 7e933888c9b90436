"""Benchmark galleries: the real wa-landmarks features, tiled with jitter to 10k-1M, and their queries."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_client.vision.extractor import Extractor, l2_normalize
from lite_server.index.store import Index, base_manifest, publish
from tools.bench.plan import JITTER
from tools.dataset import Dataset


def limited(dataset: Dataset, photos: int) -> Dataset:
    """The first ``photos`` photos (0 = all) and only their spots."""
    if not photos:
        return dataset
    kept = dataset.photos[:photos]
    return Dataset(dataset.root, kept, {s: dataset.spots[s] for s in sorted({s for s, _ in kept})})


def tiled(real: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` float16 unit rows: the real features, then jittered copies of them."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, real.shape[1]), np.float16)
    for start in range(0, n, 50_000):
        rows = np.arange(start, min(n, start + 50_000))
        block = real[rows % len(real)]
        copies = rows >= len(real)
        block[copies] *= np.exp(JITTER * rng.standard_normal((int(copies.sum()), real.shape[1]), np.float32))
        out[rows] = l2_normalize(block)
    return out


def publish_gallery(dataset: Dataset, real: np.ndarray, n: int, extractor: Extractor, out: Path) -> Index:
    """An index directory the real server can load, of ``n`` tiled features."""
    spot_ids = sorted(dataset.spots)
    photo_rows = np.arange(n) % len(real)
    rows = ((dataset.photos[r][0], f"{dataset.photos[r][1].name}#{i}") for i, r in enumerate(photo_rows))
    manifest = {**base_manifest(extractor, len(spot_ids), n), "bench": f"tiled x{n / len(real):.1f}"}
    return publish(out, manifest, [dataset.spots[s] for s in spot_ids], rows, tiled(real, n))


def queries(real: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    """Jittered real features: near, never equal to, gallery rows."""
    rng = np.random.default_rng(seed)
    usable = np.flatnonzero(np.linalg.norm(real, axis=1) > 0)  # undecodable photos have zero rows
    picked = real[rng.choice(usable, count, replace=False)]
    return l2_normalize(picked * np.exp(JITTER * rng.standard_normal(picked.shape, np.float32)))
