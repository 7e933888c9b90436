"""From a query to a candidate set: spot scores from photo neighbours, cells,
and what each candidate carries back to the phone."""
from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np

from . import calibration
from . import cells as public
from .backends import Backend, make_backend, release_pages
from .batching import BatchingBackend
from .codec import PCACodec
from .config import ServerConfig
from .index import Index
from edge_client import wire
from edge_client.extractor import l2_normalize


class Lookup:
    """Answers candidate queries over one loaded :class:`Index`.

    At load it also derives the public structure the transforms need (spot
    prototypes, balanced cells, the PCA codec); all of it is a deterministic
    function of the index, so every replica publishes the same parameters.
    """

    def __init__(self, index: Index, config: ServerConfig | None = None):
        config = config or ServerConfig()
        self.index = index
        self.config = config
        self.backend: Backend = make_backend(config.backend).add(np.asarray(index.features))
        # A backend that ranks spots itself answers in one pass, however many photos a spot has.
        self._by_spot = hasattr(self.backend, "search_groups")
        if self._by_spot:
            self.backend.set_groups(index.photo_spot)  # type: ignore[attr-defined]
        if config.max_batch > 1:  # concurrent requests share one scan of the gallery
            self.backend = BatchingBackend(self.backend, config.max_batch)
        n_spots = len(index.spots)
        groups = public.spot_groups(index.photo_spot, n_spots)
        self.popularity = np.array([len(g) for g in groups], np.float64) / max(1, len(index.photo_spot))
        self.codec = PCACodec(config.codec_dim).fit(index.features) if config.codec_dim else None
        looks = public.sample_groups(groups)  # bounded work per spot, however large the gallery
        reps, rep_spot = public.prototypes(index.features, looks, config.features_per_spot)
        bounds = np.searchsorted(rep_spot, np.arange(n_spots + 1))
        # Encoded once at load: a request only assembles what is ready.
        self._encoded = [self.encode(reps[bounds[s]:bounds[s + 1]]) for s in range(n_spots)]
        published = [wire.decode(e).reshape(-1, self.codec.dim if self.codec else index.dim) for e in self._encoded]
        self.calibration = calibration.public(calibration.leave_one_out_scores(
            index.features, looks, config.features_per_spot, self.encode, self.project, published, self.coverage))
        protos, self.prototype_spot = public.prototypes(index.features, looks, config.prototypes_per_spot)
        self.prototypes = protos
        self.spot_cell = public.balanced_cells(public.spot_means(index.features, looks), config.cell_min_spots) \
            if n_spots else np.zeros(0, np.int64)
        release_pages(index.features)  # read once above: keep them out of the resident set
        # A candidate's JSON text is fixed per index version and json.dumps of its ~27 kB of
        # base64 costs more than the lookup's re-score: cached per instance, at most ~75 MB.
        self._candidate_json = functools.lru_cache(maxsize=2048)(self._dump_candidate)

    @property
    def n_cells(self) -> int:
        return int(self.spot_cell.max()) + 1 if len(self.spot_cell) else 0

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

    def spots_in_cells(self, cells: list[int]) -> np.ndarray:
        """Rows of every spot in ``cells``, in spot order (the order leaks nothing)."""
        return np.flatnonzero(np.isin(self.spot_cell, np.asarray(cells, dtype=np.int64)))

    def encode(self, vectors: np.ndarray) -> dict[str, Any]:
        """Features as they travel: PCA int8 codes, or float16 without a codec."""
        return self.codec.encode(vectors) if self.codec else wire.encode(vectors, self.config.feature_dtype)

    def project(self, feature: np.ndarray) -> np.ndarray:
        """A feature in the space candidates are compared in on the phone (the codec's, or as it is)."""
        return self.codec.project(feature) if self.codec else np.asarray(feature, np.float32)

    def coverage(self, feature: np.ndarray) -> float:
        """The length of a unit feature inside the codec's subspace, as the phone measures it."""
        return float(np.linalg.norm(self.codec.basis_ @ l2_normalize(feature))) if self.codec else 1.0

    def candidate(self, spot_row: int) -> dict[str, Any]:
        """Everything the phone needs to compare and show one spot."""
        return {**self.index.spots[spot_row].public(), "features": self._encoded[spot_row]}

    def candidates_json(self, spot_rows: np.ndarray) -> str:
        """The JSON array of :meth:`candidate` for ``spot_rows``, from cached text (see __init__)."""
        return "[" + ",".join(self._candidate_json(int(r)) for r in spot_rows) + "]"

    def _dump_candidate(self, spot_row: int) -> str:
        return json.dumps(self.candidate(spot_row), separators=(",", ":"))
