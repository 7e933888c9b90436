"""From a query to a candidate set: spot scores from photo neighbours, cells,
and what each candidate carries back to the phone."""
from __future__ import annotations

import functools
import json
import logging
from typing import Any

import numpy as np

from edge_client.protocol import wire
from edge_client.vision.extractor import l2_normalize

from ..config import ServerConfig
from ..index import calibration
from ..index.codec import PCACodec
from ..index.store import Index
from ..index.structure import Structure, StructureParams, derive
from .backends import Backend, make_backend, release_pages
from .batching import BatchingBackend

log = logging.getLogger(__name__)


class Lookup:
    """Answers candidate queries over one loaded :class:`Index`.

    At load it takes the public structure the transforms need (the PCA
    codec, spot looks and prototypes, balanced cells, calibration) from the
    index version, where the build stored it (:mod:`lite_server.index.structure`);
    it is a deterministic function of the index, so every replica publishes
    the same parameters.
    """

    def __init__(self, index: Index, config: ServerConfig | None = None, search: bool = True):
        """``search=False`` loads the public structure alone, for tools that build the public
        document: no search backend (most of a large index's load time), no vector queries."""
        config = config or ServerConfig()
        self.index = index
        self.config = config
        self.backend: Backend | None = None
        self._by_spot = False  # a backend that ranks spots itself answers in one pass
        if search:
            self.backend, self._by_spot = self._search_backend(index, config)
        n_spots = len(index.spots)
        self.popularity = np.bincount(index.photo_spot, minlength=n_spots) / max(1, len(index.photo_spot))
        structure = load_structure(index, StructureParams.from_config(config))
        self.codec = PCACodec.from_basis(structure.basis, structure.params.codec_kind) \
            if structure.basis is not None else None
        self.coverage_basis = structure.coverage_basis  # published beside a learned whitening
        bounds = np.searchsorted(structure.look_spot, np.arange(n_spots + 1))
        # Encoded once at load: a request only assembles what is ready.
        looks = l2_normalize(structure.looks)
        self._encoded = wire.encode_groups(looks, bounds, self.look_dtype())
        # The public document's looks are int8 codes of the looks whatever the candidates carry: with
        # 4-bit candidates the looks are kept in both encodings (int4 ~0.5x the int8 one's memory on top).
        self._published_looks = self._encoded if self.look_dtype() == self._dtype() else \
            wire.encode_groups(looks, bounds, self._dtype())
        self.calibration = calibration.public(structure.scores, calibration.coverage_ratio(structure.params.codec_kind),
                                              n_spots)
        self.prototypes, self.prototype_spot = structure.prototypes, structure.prototype_spot
        self.spot_cell = structure.spot_cell
        release_pages(index.features)  # read once above: keep them out of the resident set
        # A candidate's JSON text is fixed per index version and json.dumps of its ~27 kB of
        # base64 costs more than the lookup's re-score: cached per instance, at most ~75 MB.
        self._candidate_json = functools.lru_cache(maxsize=2048)(self._dump_candidate)

    @staticmethod
    def _search_backend(index: Index, config: ServerConfig) -> tuple[Backend, bool]:
        """The configured backend over the index's features; and whether it ranks spots itself."""
        backend = make_backend(config.backend).add(np.asarray(index.features))
        by_spot = hasattr(backend, "search_groups")
        if by_spot:
            backend.set_groups(index.photo_spot)  # type: ignore[attr-defined]
        if config.max_batch > 1:  # concurrent requests share one scan of the gallery
            backend = BatchingBackend(backend, config.max_batch)
        return backend, by_spot

    @property
    def n_cells(self) -> int:
        return int(self.spot_cell.max()) + 1 if len(self.spot_cell) else 0

    def nearest_spots(self, queries: np.ndarray, k: int) -> list[np.ndarray]:
        """For each query, the rows of its ``k`` best spots (a spot scores its best photo)."""
        if self.backend is None:
            raise RuntimeError("this Lookup was loaded without search (search=False)")
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
        """Vectors of the comparison space (see :meth:`project`) as they travel: int8 codes
        with a codec, else in the configured dtype."""
        return wire.encode(l2_normalize(vectors), self._dtype())

    def _dtype(self) -> str:
        return "int8" if self.codec else self.config.feature_dtype

    def look_dtype(self) -> str:
        """The wire dtype of the candidates' looks: :meth:`encode`'s, but int4 codes with a codec
        and ``look_bits`` 4 (half the bytes of int8, see :mod:`edge_client.protocol.nibbles`)."""
        return "int4" if self.codec and self.config.look_bits == 4 else self._dtype()

    def published_looks(self, spot_row: int) -> np.ndarray:
        """The spot's looks as the public document takes them: as :meth:`encode` sends vectors
        (int8 with a codec), whichever codes the candidates carry."""
        return wire.decode(self._published_looks[spot_row])

    def project(self, feature: np.ndarray) -> np.ndarray:
        """A feature in the space candidates are compared in on the phone (the codec's, or as it is)."""
        return self.codec.project(feature) if self.codec else np.asarray(feature, np.float32)

    def candidate(self, spot_row: int) -> dict[str, Any]:
        """Everything the phone needs to compare and show one spot."""
        return {**self.index.spots[spot_row].public(), "features": self._encoded[spot_row]}

    def candidates_json(self, spot_rows: np.ndarray) -> str:
        """The JSON array of :meth:`candidate` for ``spot_rows``, from cached text (see __init__)."""
        return "[" + ",".join(self._candidate_json(int(r)) for r in spot_rows) + "]"

    def _dump_candidate(self, spot_row: int) -> str:
        return json.dumps(self.candidate(spot_row), separators=(",", ":"))


def load_structure(index: Index, params: StructureParams) -> Structure:
    """The structure stored in ``index``'s version, or derived now when it has none for
    ``params`` (an index built before structures were stored, or other server settings)."""
    stored = Structure.load(index.path)
    # Calibration rows without the evidence terms (index versions built before they were
    # measured) are derived again: the phone would read the old evidence with new weights.
    if stored is not None and calibration.current(stored.scores) and stored.matches([s.id for s in index.spots],
                                                                                   params):
        return stored
    log.info("deriving the public structure of %s at load (%d spots): store it with a rebuild",
             index.version, len(index.spots))
    return derive(index.features, index.photo_spot, [s.id for s in index.spots], params)
