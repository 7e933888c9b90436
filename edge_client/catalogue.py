"""The server's public spot catalogue (``GET /v1/spots``) as the phone keeps it.

Dummy personas walk over it: coordinates and popularity place them, each
spot's published features (the same representatives a candidates answer
carries) and the published spread make their photos look real. Fetched
once per index version; nothing in it depends on the user.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import wire
from .errors import BadResponseError

EARTH_KM = 6371.0088


@dataclass(frozen=True)
class Catalogue:
    """Spots with coordinates (rows aligned), their popularity and features."""

    ids: list[str]
    lat: np.ndarray           # degrees, float64 [n]
    lon: np.ndarray
    popularity: np.ndarray    # gallery photo share, sums to 1
    features: list[np.ndarray]  # per spot, float32 [m, dim], L2-normalised rows
    spread: dict[str, float]  # the published photo-to-anchor spread (see lite_server.catalogue)
    version: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    def distances_from(self, row: int) -> np.ndarray:
        """Great-circle km from spot ``row`` to every spot."""
        return haversine_km(self.lat[row], self.lon[row], self.lat, self.lon)

    @classmethod
    def from_payload(cls, payload: Any, dim: int | None = None, basis: np.ndarray | None = None) -> "Catalogue":
        """Parse ``/v1/spots``; spots without coordinates or features are left out (no one can walk there).

        Features published as codec codes are lifted back to feature space with
        the codec's ``basis`` (rows = code dimensions), so dummies start from
        the same kind of vector a photo gives.
        """
        try:
            spots = payload["spots"]
            rows = [(str(s["id"]), float(s["lat"]), float(s["lon"]), float(s["popularity"]),
                     wire.decode(s["features"])) for s in spots
                    if s.get("lat") is not None and s.get("lon") is not None]
            rows = [r[:4] + (m,) for r, m in zip(rows, _lift([r[4] for r in rows], dim, basis))]
            spread = {str(k): float(v) for k, v in dict(payload["spread"]).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise BadResponseError(f"malformed spot catalogue: {exc}") from None
        rows = [r for r in rows if r[4].size and all(map(math.isfinite, r[1:4]))]
        if not rows:
            raise BadResponseError("the spot catalogue has no spot with coordinates and features")
        popularity = np.array([r[3] for r in rows], np.float64).clip(0) + 1e-12
        return cls([r[0] for r in rows], np.array([r[1] for r in rows]), np.array([r[2] for r in rows]),
                   popularity / popularity.sum(), [_unit_rows(r[4]) for r in rows], spread,
                   str(payload.get("index_version", "")))


def _lift(matrices: list[np.ndarray], dim: int | None, basis: np.ndarray | None) -> list[np.ndarray]:
    """Codec codes back to feature space in one matrix product (hundreds of small ones
    cost seconds on a busy phone: each wakes the BLAS threads); checks the dimension."""
    if basis is not None:
        coded = [i for i, m in enumerate(matrices) if m.size and m.shape[-1] == basis.shape[0]]
        if coded:
            flat = [matrices[i].reshape(-1, basis.shape[0]).astype(np.float32) for i in coded]
            lifted = np.concatenate(flat) @ basis.astype(np.float32)
            for i, part in zip(coded, np.split(lifted, np.cumsum([len(f) for f in flat])[:-1])):
                matrices[i] = part.reshape(*matrices[i].shape[:-1], basis.shape[1])
    for m in matrices:
        if dim is not None and m.shape[-1] != dim:
            raise ValueError(f"expected vectors of dimension {dim}, got shape {list(m.shape)}")
    return matrices


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    matrix = matrix.reshape(-1, matrix.shape[-1]).astype(np.float32)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def haversine_km(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> Any:
    """Great-circle distance in km (scalars or numpy arrays)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))
