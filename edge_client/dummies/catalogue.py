"""The spot catalogue dummy personas walk over, read from the public document
(``GET /v1/public``, :mod:`edge_client.protocol.public`).

Coordinates and popularity place the personas; each spot's published looks
(the representatives a candidates answer carries, or on a large catalogue
its published prototypes) and the published spread make their photos look
real. Nothing in it depends on the user.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BadResponseError
from ..privacy.floors import decoy_weights
from ..privacy.recognizer import lifter
from ..protocol.public import PublicParams

EARTH_KM = 6371.0088


@dataclass(frozen=True)
class Catalogue:
    """Spots with coordinates (rows aligned), their popularity and features."""

    ids: list[str]
    lat: np.ndarray           # degrees, float64 [n]
    lon: np.ndarray
    popularity: np.ndarray    # gallery photo share, sums to 1
    features: list[np.ndarray]  # per spot, float32 [m, dim], L2-normalised rows
    spread: dict[str, float]  # the published photo-to-anchor spread (see lite_server.search.publication)
    version: str = ""
    # The same looks in the codec space, per spot (unit rows), and the matrix lifting codec rows back
    # to features (recognizer.lifter): None without a codec basis.
    codec_features: list[np.ndarray] | None = None
    lift: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def distances_from(self, row: int) -> np.ndarray:
        """Great-circle km from spot ``row`` to every spot."""
        return haversine_km(self.lat[row], self.lon[row], self.lat, self.lon)

    @classmethod
    def from_public(cls, doc: PublicParams, dim: int | None = None, max_share: float = 1.0,
                    max_cell_ratio: float | None = None) -> "Catalogue":
        """The catalogue of a public document; spots without coordinates or looks are left out
        (no one can walk there). Looks published as codec codes are lifted back to feature
        space in one matrix product (:func:`~edge_client.privacy.recognizer.lifter`), so dummies start from the same
        kind of vector a photo gives.

        ``max_share`` caps any one spot's popularity and ``max_cell_ratio`` any one cell's
        (the phone's ``max_decoy_share`` and ``max_decoy_cell_ratio``; the excess goes to the
        others in proportion), so a document that sinks all popularity into one spot, or the
        spots of one cell, cannot send every persona there. Unlike the decoys' draw there is
        no uniform share: personas should go where people go, and the caps leave an honest
        document's popularity as it is."""
        rows, counts = doc.anchors()
        codes = rows.decode()
        lift = lifter(doc.basis) if doc.basis is not None else None
        looks = codes @ lift if lift is not None else codes
        if dim is not None and looks.shape[-1] != dim:
            raise BadResponseError(f"the published looks have dimension {looks.shape[-1]}, not {dim}")
        parts = np.split(looks, np.cumsum(counts)[:-1])
        lat, lon = doc.columns["lat"].astype(np.float64), doc.columns["lon"].astype(np.float64)
        keep = np.flatnonzero(np.isfinite(lat) & np.isfinite(lon) & (counts > 0))
        if not len(keep):
            raise BadResponseError("the public document has no spot with coordinates and looks")
        cells = None if max_cell_ratio is None else doc.columns["cell"][keep]
        popularity = decoy_weights(doc.popularity[keep], max_share, 0.0, cells, max_cell_ratio or 1.0)
        coded = np.split(codes, np.cumsum(counts)[:-1]) if lift is not None else None
        return cls(doc.ids[keep].tolist(), lat[keep], lon[keep], popularity,
                   [_unit_rows(parts[r]) for r in keep], doc.spread, doc.version,
                   None if coded is None else [_unit_rows(coded[r]) for r in keep], lift)


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    matrix = matrix.reshape(-1, matrix.shape[-1]).astype(np.float32)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def haversine_km(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> Any:
    """Great-circle distance in km (scalars or numpy arrays)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))
