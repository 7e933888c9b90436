"""Nearest-neighbour backends behind one small interface.

Every backend holds L2-normalised vectors and answers inner-product (cosine)
top-n queries for a whole batch of queries at once: one matrix product, no
Python loop over photos.

- ``sklearn`` (default): ``NearestNeighbors(algorithm="brute")`` with the
  euclidean metric, whose ranking on unit vectors is the cosine ranking and
  which scikit-learn runs as a chunked, multi-threaded GEMM reduction.
- ``numpy``: the same product written out over a float16 matrix scanned in
  float32 blocks: the least memory (2 bytes a value), for very large galleries.
- ``faiss`` / ``faiss-ivf``: FAISS ``IndexFlatIP`` or ``IndexIVFFlat`` (the
  optional ``faiss`` extra).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_client.errors import ConfigError

BLOCK = 16384  # rows converted to float32 at a time by the numpy backend


class Backend(Protocol):
    """What the lookup needs from a nearest-neighbour index."""

    def add(self, vectors: np.ndarray) -> "Backend": ...

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosines, rows), both [n_queries, n], best first."""
        ...

    def save(self, path: Path) -> None: ...

    @property
    def size(self) -> int: ...


def _top(scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-first top ``n`` per row of a score matrix."""
    n = min(n, scores.shape[1])
    part = np.argpartition(-scores, n - 1, axis=1)[:, :n] if n < scores.shape[1] else \
        np.broadcast_to(np.arange(scores.shape[1]), (scores.shape[0], scores.shape[1]))
    picked = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-picked, axis=1, kind="stable")
    return np.take_along_axis(picked, order, axis=1), np.take_along_axis(part, order, axis=1)


class SklearnBackend:
    """scikit-learn brute-force neighbours (see module docstring)."""

    def __init__(self) -> None:
        self.model_ = None

    def add(self, vectors: np.ndarray) -> "SklearnBackend":
        from sklearn.neighbors import NearestNeighbors

        self._vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.model_ = NearestNeighbors(algorithm="brute", metric="euclidean").fit(self._vectors)
        return self

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        n = min(n, self.size)
        distances, rows = self.model_.kneighbors(np.asarray(queries, np.float32), n_neighbors=n)
        # |q - x|^2 = |q|^2 + 1 - 2 q.x for unit x: recover the inner product exactly.
        q2 = np.einsum("ij,ij->i", queries, queries)[:, None]
        return ((q2 + 1.0 - distances.astype(np.float32) ** 2) / 2.0).astype(np.float32), rows

    def save(self, path: Path) -> None:
        np.save(path, self._vectors.astype(np.float16))

    @property
    def size(self) -> int:
        return 0 if self.model_ is None else int(self.model_.n_samples_fit_)


class NumpyBackend:
    """Float16 at rest, scored block by block in float32 (see module docstring)."""

    def __init__(self) -> None:
        self.vectors_ = np.zeros((0, 0), np.float16)

    def add(self, vectors: np.ndarray) -> "NumpyBackend":
        self.vectors_ = vectors if vectors.dtype == np.float16 else vectors.astype(np.float16)
        return self

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.asarray(queries, np.float32)
        best_s = np.full((len(queries), 0), -np.inf, np.float32)
        best_r = np.zeros((len(queries), 0), np.int64)
        for start in range(0, self.size, BLOCK):
            block = self.vectors_[start:start + BLOCK].astype(np.float32)
            scores, rows = _top(queries @ block.T, n)
            merged_s = np.concatenate([best_s, scores], axis=1)
            merged_r = np.concatenate([best_r, rows + start], axis=1)
            best_s, pick = _top(merged_s, n)
            best_r = np.take_along_axis(merged_r, pick, axis=1)
        return best_s, best_r

    def save(self, path: Path) -> None:
        np.save(path, self.vectors_)

    @property
    def size(self) -> int:
        return int(self.vectors_.shape[0])


class FaissBackend:
    """FAISS exact inner product, or IVF with ``nlist`` lists probed ``nprobe`` at a time."""

    def __init__(self, ivf: bool = False, nlist: int = 0, nprobe: int = 16):
        self.ivf, self.nlist, self.nprobe = ivf, nlist, nprobe

    def add(self, vectors: np.ndarray) -> "FaissBackend":
        try:
            import faiss
        except ImportError as exc:
            raise ConfigError("the faiss backend needs: pip install 'enfpire[faiss]'") from exc
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        dim = vectors.shape[1]
        if self.ivf:
            nlist = self.nlist or max(1, int(4 * np.sqrt(len(vectors))))
            self.index_ = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            self.index_.train(vectors)
            self.index_.nprobe = self.nprobe
        else:
            self.index_ = faiss.IndexFlatIP(dim)
        self.index_.add(vectors)
        return self

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self.index_.search(np.ascontiguousarray(queries, np.float32), min(n, self.size))
        return scores, rows.astype(np.int64)

    def save(self, path: Path) -> None:
        import faiss

        faiss.write_index(self.index_, os.fspath(path))

    @property
    def size(self) -> int:
        return int(self.index_.ntotal) if hasattr(self, "index_") else 0


def make_backend(name: str) -> Backend:
    """A new, empty backend by its configuration name."""
    makers = {"sklearn": SklearnBackend, "numpy": NumpyBackend,
              "faiss": FaissBackend, "faiss-ivf": lambda: FaissBackend(ivf=True)}
    if name not in makers:
        raise ConfigError(f"unknown backend {name!r}; choose one of {sorted(makers)}")
    return makers[name]()  # type: ignore[no-any-return]


def load_backend(name: str, path: Path) -> Backend:
    """A backend of kind ``name`` filled from what ``save`` wrote to ``path``."""
    if name.startswith("faiss"):
        import faiss

        backend = FaissBackend(ivf=name == "faiss-ivf")
        backend.index_ = faiss.read_index(os.fspath(path))
        return backend
    return make_backend(name).add(np.load(path))
