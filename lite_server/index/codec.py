"""Compact candidate features: a projection published once, int8 codes per query.

The projection is the gallery's PCA basis fitted here, or any basis of the same
shape (the learned whitening of :mod:`lite_server.index.whitening`, the default),
which the phone uses the same way: project, then L2-normalise.

The server learns a ``D``-dimensional basis from its gallery (no centring, so
cosines stay cosines of the projected vectors) and publishes it in
``/v1/info``. Candidates then carry ``D`` signed bytes per feature plus one
scale, instead of 1280 float16 values: about 20 times fewer bytes for a
rerank that agrees with the full-dimensional one on almost every query. The
phone projects its own feature with the same basis before comparing.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from edge_client.protocol import wire
from edge_client.vision.extractor import l2_normalize


class PCACodec:
    """``fit`` a basis on gallery features; ``encode`` rows as int8 codes."""

    def __init__(self, dim: int = 128, kind: str = "pca"):
        self.dim = dim
        # What the basis is ("pca" when fitted here; "learned-whitening" for a basis from
        # lite_server.index.whitening): published as is, so the document says honestly what it holds.
        self.kind = kind

    def fit(self, features: np.ndarray, sample: int = 20000, seed: int = 0) -> "PCACodec":
        rows = np.asarray(features)
        if len(rows) > sample:  # the basis of a huge gallery is learnt from a sample
            rows = rows[np.sort(np.random.default_rng(seed).choice(len(rows), sample, replace=False))]
        rows = np.asarray(rows, np.float32)
        # The top eigenvectors of the D x D second-moment matrix are the right
        # singular vectors of the rows: one small eigh instead of a tall SVD.
        _, vectors = np.linalg.eigh(rows.T @ rows)
        top = vectors[:, ::-1][:, : self.dim].T
        # float16 is what travels; the server encodes with exactly what the phone decodes.
        self.basis_ = top.astype(np.float16).astype(np.float32)
        return self

    @classmethod
    def from_basis(cls, basis: np.ndarray, kind: str = "pca") -> "PCACodec":
        """A fitted codec with a stored ``basis`` (rows = code dimensions) of ``kind``."""
        codec = cls(int(basis.shape[0]), kind)
        codec.basis_ = np.asarray(basis, np.float32)
        return codec

    def project(self, features: np.ndarray) -> np.ndarray:
        return l2_normalize(np.asarray(features, np.float32) @ self.basis_.T)

    def encode(self, features: np.ndarray) -> dict[str, Any]:
        return wire.encode(self.project(features), "int8")

    def public(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, "basis": wire.encode(self.basis_, "float16")}
