"""Public structure for the private transforms: spot prototypes and balanced cells.

- Prototypes: a few k-means centres of each spot's gallery features (its
  looks), used as the candidates' representative features and, published,
  to let the phone choose its cells and draw plausible decoys.
- Cells: a balanced clustering of the spots' mean features. Every cell holds
  at least ``min_spots`` spots, so a query naming a cell points at a crowd of
  look-alike spots rather than one.

Both are computed from at most ``SAMPLE_PER_SPOT`` photos of a spot (a fixed
random subset), so deriving them costs the same for a 1M-photo gallery as
for a 100k one; no spot of the real dataset has that many photos, so there
they use every photo.
"""
from __future__ import annotations

import numpy as np

from edge_client.extractor import l2_normalize

from .backends import release_pages

SAMPLE_PER_SPOT = 512


def spot_groups(photo_spot: np.ndarray, n_spots: int) -> list[np.ndarray]:
    """Photo rows of every spot, in spot order (one argsort, no per-photo loop)."""
    order = np.argsort(photo_spot, kind="stable")
    bounds = np.searchsorted(photo_spot[order], np.arange(n_spots + 1))
    return [order[bounds[s]:bounds[s + 1]] for s in range(n_spots)]


def sample_groups(groups: list[np.ndarray], cap: int = SAMPLE_PER_SPOT, seed: int = 0) -> list[np.ndarray]:
    """Each group's rows, or a fixed random ``cap`` of them in increasing order."""
    rng = np.random.default_rng(seed)
    return [rows if len(rows) <= cap else np.sort(rng.choice(rows, cap, replace=False)) for rows in groups]


def spot_photos(features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``features[rows]`` as float32; pages of a mapped gallery leave the resident set again."""
    photos = np.asarray(features[rows], np.float32)
    release_pages(features)
    return photos


def prototypes(features: np.ndarray, groups: list[np.ndarray], m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(unit vectors [P, dim], owning spot [P]): up to ``m`` k-means centres per spot.

    A spot with ``m`` photos or fewer is represented by its photos.
    """
    vectors, owners = [], []
    for spot, rows in enumerate(groups):
        photos = l2_normalize(spot_photos(features, rows))
        chosen = spherical_kmeans(photos, m) if len(photos) > m else photos
        vectors.append(chosen)
        owners.append(np.full(len(chosen), spot))
    return np.concatenate(vectors), np.concatenate(owners)


def spherical_kmeans(vectors: np.ndarray, m: int, iterations: int = 10, restarts: int = 3,
                     seed: int = 0) -> np.ndarray:
    """``m`` unit centres of unit ``vectors`` (cosine k-means), deterministic for a seed.

    k-means++ seeding, a few Lloyd rounds and the best of ``restarts`` runs:
    plenty for the tens of photos a spot has, in microseconds where a general
    k-means library spends milliseconds per call.
    """
    rng = np.random.default_rng(seed)
    best, best_fit = vectors[:m], -np.inf
    for _ in range(restarts):
        centres = _lloyd(vectors, _plus_plus(vectors, m, rng), iterations)
        fit = float((vectors @ centres.T).max(axis=1).sum())
        if fit > best_fit:
            best, best_fit = centres, fit
    return best


def _plus_plus(vectors: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    chosen = [int(rng.integers(len(vectors)))]
    distance = np.maximum(1.0 - vectors @ vectors[chosen[0]], 0.0)
    while len(chosen) < m:
        weights = distance ** 2
        pick = int(rng.choice(len(vectors), p=weights / weights.sum())) if weights.sum() > 0 else len(chosen)
        chosen.append(pick)
        distance = np.minimum(distance, np.maximum(1.0 - vectors @ vectors[pick], 0.0))
    return vectors[chosen]


def _lloyd(vectors: np.ndarray, centres: np.ndarray, iterations: int) -> np.ndarray:
    for _ in range(iterations):
        labels = np.argmax(vectors @ centres.T, axis=1)
        members = labels == np.arange(len(centres))[:, None]  # one-hot: a product beats ufunc.at
        sums = members.astype(vectors.dtype) @ vectors
        empty = ~members.any(axis=1)
        sums[empty] = centres[empty]  # an emptied centre stays where it was
        centres = l2_normalize(sums)
    return centres


def spot_means(features: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """The normalised mean of every spot's (unit) photos."""
    return l2_normalize(np.stack([spot_photos(features, rows).mean(axis=0) for rows in groups]))


def balanced_cells(means: np.ndarray, min_spots: int, seed: int = 0, iterations: int = 20) -> np.ndarray:
    """The cell of every spot: k-means with capacity, every cell >= ``min_spots`` spots.

    ``n_cells = n_spots // min_spots``; each round assigns (spot, cell) pairs
    greedily from the most similar, never over a cell's capacity, then moves
    the centres; sizes end in {floor, ceil}(n_spots / n_cells).
    """
    from sklearn.cluster import KMeans

    n_spots = len(means)
    n_cells = max(1, n_spots // max(1, min_spots))
    centres = KMeans(n_cells, n_init=5, random_state=seed).fit(means).cluster_centers_
    capacity = int(np.ceil(n_spots / n_cells))
    assign = np.zeros(n_spots, np.int64)
    for _ in range(iterations):
        similarity = means @ centres.T
        assign = _fill_small_cells(_capacitated_assign(similarity, capacity), similarity, min_spots)
        moved = l2_normalize(np.stack([means[assign == c].mean(axis=0) for c in range(n_cells)]))
        if np.allclose(moved, centres, atol=1e-6):
            break
        centres = moved
    return assign


def _capacitated_assign(similarity: np.ndarray, capacity: int) -> np.ndarray:
    n_spots, n_cells = similarity.shape
    assign = np.full(n_spots, -1)
    load = np.zeros(n_cells, np.int64)
    for flat in np.argsort(-similarity, axis=None):
        spot, cell = divmod(int(flat), n_cells)
        if assign[spot] < 0 and load[cell] < capacity:
            assign[spot] = cell
            load[cell] += 1
    return assign


def _fill_small_cells(assign: np.ndarray, similarity: np.ndarray, min_spots: int) -> np.ndarray:
    """Move spots from cells above ``min_spots`` into cells below it, most similar first."""
    sizes = np.bincount(assign, minlength=similarity.shape[1])
    for cell in np.flatnonzero(sizes < min_spots):
        while sizes[cell] < min_spots:
            donors = np.flatnonzero(sizes[assign] > min_spots)
            if not len(donors):
                return assign
            spot = donors[np.argmax(similarity[donors, cell])]
            sizes[assign[spot]] -= 1
            assign[spot] = cell
            sizes[cell] += 1
    return assign
