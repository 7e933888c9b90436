"""A folder of spot folders as an evaluation dataset: photos, a deterministic
query/gallery split, features cached per (dataset, model), and indexes built
from those features without extracting twice."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_client.vision.extractor import Extractor
from lite_server.index.store import Index, Spot, base_manifest, publish, read_spots_csv, scan_photos

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATASET = ROOT.parent / "shared" / "datasets" / "wa-landmarks"
CACHE = ROOT / ".cache"
#: The split's defaults: spots with fewer photos are left out; this share of a spot's photos are queries.
MIN_PHOTOS = 5
QUERY_FRACTION = 0.2


@dataclass(frozen=True)
class Dataset:
    """Photos (spot id, path) of one folder, and its spots catalogue."""

    root: Path
    photos: list[tuple[str, Path]]
    spots: dict[str, Spot]

    @property
    def labels(self) -> np.ndarray:
        return np.array([spot for spot, _ in self.photos])


def load_dataset(root: Path = DEFAULT_DATASET) -> Dataset:
    """``root/images`` (or ``root`` itself) holds the spot folders; ``root/landmarks.csv`` the catalogue."""
    images = root / "images" if (root / "images").is_dir() else root
    csv = next((p for p in (root / "landmarks.csv", root / "spots.csv") if p.is_file()), None)
    catalogue = read_spots_csv(csv) if csv else {}
    photos = scan_photos(images)
    spots = {s: catalogue.get(s) or Spot(s, s) for s in sorted({s for s, _ in photos})}
    return Dataset(root, photos, spots)


def _rank_key(path: Path) -> str:
    return hashlib.sha1(path.name.encode()).hexdigest()


def split(dataset: Dataset, query_fraction: float = QUERY_FRACTION, min_photos: int = MIN_PHOTOS,
          rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(gallery rows, query rows, spots left out): per spot, the ``query_fraction``
    of photos first by sha1 of the file name (at least one, never all) are queries; spots with
    fewer than ``min_photos`` are left out entirely. ``rows`` restricts the split
    to those photos (splitting a gallery again gives a tuning split)."""
    by_spot: dict[str, list[int]] = {}
    for row in (range(len(dataset.photos)) if rows is None else rows):
        by_spot.setdefault(dataset.photos[row][0], []).append(int(row))
    gallery, queries, left_out = [], [], 0
    for rows in by_spot.values():
        if len(rows) < min_photos:
            left_out += 1
            continue
        rows = sorted(rows, key=lambda r: _rank_key(dataset.photos[r][1]))
        # At least one query, and at least one gallery photo: a query's spot is always in the index.
        n_query = min(max(1, round(query_fraction * len(rows))), len(rows) - 1)
        queries += rows[:n_query]
        gallery += rows[n_query:]
    return np.array(sorted(gallery)), np.array(sorted(queries)), left_out


def hold_out_one(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(gallery rows, query rows): one photo of every spot that has two or more is a query."""
    gallery, queries, seen = [], [], {}
    counts: dict[str, int] = {}
    for spot, _ in dataset.photos:
        counts[spot] = counts.get(spot, 0) + 1
    for row, (spot, path) in sorted(enumerate(dataset.photos), key=lambda rp: _rank_key(rp[1][1])):
        if counts[spot] > 1 and spot not in seen:
            seen[spot] = row
            queries.append(row)
        else:
            gallery.append(row)
    return np.array(sorted(gallery)), np.array(sorted(queries))


def features(dataset: Dataset, extractor: Extractor, cache: Path = CACHE) -> np.ndarray:
    """Every photo's feature (float32, rows as ``dataset.photos``), cached on disk.

    The cache key is the dataset's photo list and the model's sha256, so a new
    model or a changed folder never reuses stale features. Undecodable photos
    get a zero row.
    """
    listing = "\n".join(f"{s}/{p.name}" for s, p in dataset.photos)
    key = hashlib.sha256(f"{dataset.root.resolve()}\n{listing}\n{extractor.sha256}".encode()).hexdigest()[:20]
    path = cache / "features" / f"{key}.npy"
    if path.is_file():
        return np.load(path)
    log.info("extracting %d photos (cached afterwards in %s)", len(dataset.photos), path)
    rows = extractor.extract_many((p for _, p in dataset.photos), on_error=lambda p, e: log.warning("%s", e))
    matrix = np.stack([np.zeros(extractor.dim, np.float32) if v is None else v for v in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, matrix)
    os.replace(tmp, path)
    return matrix


def build_from_features(dataset: Dataset, rows: np.ndarray, matrix: np.ndarray, extractor: Extractor,
                        out: Path) -> Index:
    """Publish an index of the photos ``rows`` from already extracted features."""
    photos = [dataset.photos[r] for r in rows]
    spot_ids = sorted({s for s, _ in photos})
    manifest = base_manifest(extractor, len(spot_ids), len(photos))
    return publish(out, manifest, [dataset.spots[s] for s in spot_ids],
                   [(s, p.name) for s, p in photos], matrix[rows])
