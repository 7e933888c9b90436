"""From a query to a candidate set: spot scores from photo neighbours, and what
each candidate carries back to the phone."""
from __future__ import annotations

import functools
import json

import numpy as np

from edge_client import wire

from .backends import DEFAULT_BACKEND, Backend, make_backend, release_pages
from .batching import BatchingBackend
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

    def __init__(self, index: Index, backend: str = DEFAULT_BACKEND, features_per_spot: int = 8,
                 feature_dtype: str = "float16", max_batch: int = 0):
        self.index = index
        self.feature_dtype = feature_dtype
        self.backend: Backend = make_backend(backend).add(np.asarray(index.features))
        # A backend that ranks spots itself answers in one pass, however many photos a spot has.
        self._by_spot = hasattr(self.backend, "search_groups")
        if self._by_spot:
            self.backend.set_groups(index.photo_spot)  # type: ignore[attr-defined]
        if max_batch > 1:  # concurrent requests share one scan of the gallery
            self.backend = BatchingBackend(self.backend, max_batch)
        self._rep_offsets, self._rep_rows = self._representatives(features_per_spot)
        release_pages(index.features)  # read once above: keep them out of the resident set
        # A candidate's JSON text is fixed per index version and json.dumps of its ~27 kB of
        # base64 costs more than the lookup's re-score: cached per instance, at most ~75 MB.
        self._candidate_json = functools.lru_cache(maxsize=2048)(self._dump_candidate)

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
        if self._by_spot:
            return list(self.backend.search_groups(queries, k)[1])  # type: ignore[attr-defined]
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

    def candidate(self, spot_row: int) -> dict:
        """Everything the phone needs to compare and show one spot."""
        rows = self._rep_rows[self._rep_offsets[spot_row]:self._rep_offsets[spot_row + 1]]
        features = np.asarray(self.index.features[np.sort(rows)], dtype=np.float32)
        return {**self.index.spots[spot_row].public(), "features": wire.encode(features, self.feature_dtype)}

    def candidates_json(self, spot_rows: np.ndarray) -> str:
        """The JSON array of :meth:`candidate` for ``spot_rows``, from cached text (see __init__)."""
        return "[" + ",".join(self._candidate_json(int(r)) for r in spot_rows) + "]"

    def _dump_candidate(self, spot_row: int) -> str:
        return json.dumps(self.candidate(spot_row), separators=(",", ":"))
