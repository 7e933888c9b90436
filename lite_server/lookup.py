"""From a query to a candidate set: spot scores from photo neighbours, and what
each candidate carries back to the phone."""
from __future__ import annotations

import numpy as np

from edge_client import wire

from .backends import Backend, make_backend
from .index import Index


def representatives(features: np.ndarray, m: int) -> np.ndarray:
    """Up to ``m`` rows of one spot's photos that cover its looks.

    Farthest-point sampling: start from the photo closest to the spot's mean,
    then repeatedly add the photo least similar to those already chosen.
    Deterministic, and a spot with ``m`` photos or fewer keeps them all.
    """
    n = len(features)
    if n <= m:
        return np.arange(n)
    vectors = features.astype(np.float32)
    chosen = [int(np.argmax(vectors @ vectors.mean(axis=0)))]
    nearest = vectors @ vectors[chosen[0]]
    while len(chosen) < m:
        nxt = int(np.argmin(nearest))
        chosen.append(nxt)
        nearest = np.maximum(nearest, vectors @ vectors[nxt])
    return np.array(sorted(chosen))


class Lookup:
    """Answers candidate queries over one loaded :class:`Index`."""

    def __init__(self, index: Index, backend: str = "sklearn", features_per_spot: int = 8,
                 feature_dtype: str = "float16"):
        self.index = index
        self.feature_dtype = feature_dtype
        self.backend: Backend = make_backend(backend).add(np.asarray(index.features))
        self._rep_offsets, self._rep_rows = self._representatives(features_per_spot)

    def _representatives(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """CSR arrays: spot ``s`` shows photo rows ``rows[offsets[s]:offsets[s+1]]``."""
        order = np.argsort(self.index.photo_spot, kind="stable")
        bounds = np.searchsorted(self.index.photo_spot[order], np.arange(len(self.index.spots) + 1))
        rows, offsets = [], [0]
        for s in range(len(self.index.spots)):
            members = order[bounds[s]:bounds[s + 1]]
            picked = members[representatives(np.asarray(self.index.features[members]), m)]
            rows.append(picked)
            offsets.append(offsets[-1] + len(picked))
        return np.array(offsets), (np.concatenate(rows) if rows else np.zeros(0, np.int64))

    def nearest_spots(self, queries: np.ndarray, k: int) -> list[np.ndarray]:
        """For each query, the rows of its ``k`` best spots (a spot scores its best photo)."""
        k = min(k, len(self.index.spots))
        n = min(self.backend.size, 4 * k)
        _, rows = self.backend.search(queries, n)
        out = []
        for q, photo_rows in enumerate(rows):
            spots = self._first_spots(photo_rows, k)
            while len(spots) < k and n < self.backend.size:  # many photos of few spots: look deeper
                n = min(self.backend.size, 4 * n)
                spots = self._first_spots(self.backend.search(queries[q:q + 1], n)[1][0], k)
            out.append(spots)
        return out

    def _first_spots(self, photo_rows: np.ndarray, k: int) -> np.ndarray:
        spots = self.index.photo_spot[photo_rows[photo_rows >= 0]]
        _, first = np.unique(spots, return_index=True)
        return spots[np.sort(first)][:k]

    @property
    def n_cells(self) -> int:
        return 0

    def spots_in_cells(self, cells: list[int]) -> np.ndarray:
        raise NotImplementedError

    def candidate(self, spot_row: int) -> dict:
        """Everything the phone needs to compare and show one spot."""
        rows = self._rep_rows[self._rep_offsets[spot_row]:self._rep_offsets[spot_row + 1]]
        features = np.asarray(self.index.features[np.sort(rows)], dtype=np.float32)
        return {**self.index.spots[spot_row].public(), "features": wire.encode(features, self.feature_dtype)}
