"""Nearest-neighbour backends behind one small interface.

Every backend holds L2-normalised vectors and answers inner-product (cosine)
top-n queries for a whole batch of queries at once: matrix products over
blocks of rows, no Python loop over photos.

- ``numpy`` (default): :class:`QuantizedBackend`, an *exact* search that
  scans a uint8 copy of the gallery (1 byte a value, so a 1M x 1280 gallery
  fits in 1.3 GB) and then re-scores, from the stored vectors, every row the
  uint8 error could have misplaced. Same answers as an exhaustive float32
  scan, at a quarter of its memory, and faster because the scan is memory
  bound (measured in docs/benchmarks.md).
- ``sklearn``: ``NearestNeighbors(algorithm="brute")`` with the euclidean
  metric, whose ranking on unit vectors is the cosine ranking.
- ``faiss`` / ``faiss-ivf``: FAISS ``IndexFlatIP`` or ``IndexIVFFlat`` (the
  optional ``faiss`` extra).

Exact backends break ties between equal scores by the lower row.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from edge_client.errors import ConfigError

CHUNK = 8192     # rows quantised at a time by QuantizedBackend.add (bounded temporaries)
SCAN_ROWS = 128  # rows widened to float32 per step: the block stays in L2 cache
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
SCAN_THREADS = min(2, os.cpu_count() or 1)  # more only adds contention for memory bandwidth
# Float32 rounding of a 1280-term dot product is far below this; it keeps the
# exactness argument of QuantizedBackend safe against it.
ROUNDING_SLACK = 1e-4


class Backend(Protocol):
    """What the lookup needs from a nearest-neighbour index."""

    def add(self, vectors: np.ndarray) -> "Backend": ...

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosines, rows), both [n_queries, n], best first."""
        ...

    def save(self, path: Path) -> None: ...

    @property
    def size(self) -> int: ...


def best_first(scores: np.ndarray, rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` best of one query's (scores, rows): highest score first, then lowest row."""
    order = np.lexsort((rows, -scores))[:n]
    return scores[order], rows[order]


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the enclosed BLAS calls on the calling thread only.

    OpenBLAS's own threads spin-wait; on many small products (our blocks) and a
    busy 2-core machine they cost 10x more than they give. threadpoolctl comes
    with scikit-learn (the server extra); without it nothing is changed.
    """
    controller = _blas_controller()
    if controller is None:  # pragma: no cover - the server extra installs threadpoolctl
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


@functools.lru_cache(maxsize=1)
def _blas_controller() -> Any:
    """Made once: finding the loaded BLAS libraries takes ~3 ms, a limit through it ~30 us."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover
        return None
    return ThreadpoolController()


def release_pages(array: np.ndarray) -> None:
    """Drop the pages under a memory-mapped ``array`` (or slice) from this process's resident set.

    They stay in the kernel's page cache (reclaimable, shared), so the next read
    is still fast; without this, one pass over a mapped 1M-photo gallery would
    leave 2.6 GB counted in the server's RSS. Not mapped: nothing to do.
    """
    root = _memmap_of(array)
    if root is None or not hasattr(mmap, "MADV_DONTNEED") or array.nbytes == 0:
        return
    handle = root._mmap  # numpy keeps the mmap object of every view of a mapping here
    mapping_start = root.ctypes.data - root.offset % mmap.ALLOCATIONGRANULARITY
    start = array.ctypes.data - mapping_start
    start -= start % mmap.PAGESIZE
    stop = min(array.ctypes.data - mapping_start + array.nbytes, len(handle))
    handle.madvise(mmap.MADV_DONTNEED, start, stop - start)


def _memmap_of(array: Any) -> np.memmap | None:
    """The memmap that owns the mapping under ``array`` (through views), if any."""
    while array is not None:
        if isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap):
            return array
        array = getattr(array, "base", None)
    return None


@functools.lru_cache(maxsize=1)
def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """Have glibc map (and unmap on free) every allocation of ``threshold`` bytes or more.

    A query on a 1M gallery makes several 4 MB score arrays. By default glibc
    raises its mapping threshold after the first such free and then keeps the
    freed blocks in each thread's arena: measured +130-190 MB resident after a
    few dozen queries. A fixed threshold returns them at once. Process-wide and
    idempotent; False where there is no glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


@functools.lru_cache(maxsize=1)
def _scan_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(SCAN_THREADS, thread_name_prefix="scan")


class RowReader:
    """Reads chosen rows of a gallery matrix as float32.

    Rows of a memory-mapped matrix are copied out and their pages dropped from
    the resident set again (:func:`release_pages`): they stay in the page
    cache, but not in the server's memory, however many queries it answers.
    (Counting pages and dropping them less often does not work: the kernel's
    fault-around maps 64 kB about every row read, whatever ``madvise`` says.)
    """

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors
        self._mapped = _memmap_of(vectors) is not None

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), dim] for increasing ``rows``."""
        out = np.asarray(self.vectors[rows], dtype=np.float32)
        if self._mapped:
            release_pages(self.vectors)
        return out


class QuantizedBackend:
    """Exact top-n from a uint8 scan plus an exact re-score (see module docstring).

    Each row ``x`` is stored as uint8 codes ``c`` with its own ``low`` and
    ``scale`` (``x ~ low + scale * c``) and the norm ``err`` of what that
    leaves out. For a query ``q`` the scan's score ``s`` is within
    ``|q| * err`` of the true ``q . x`` (Cauchy-Schwarz), so every row of the
    true top n has ``s + |q| err`` at least the n-th best ``s - |q| err``.
    Only those rows (usually a few hundred) are re-scored from the stored
    vectors, which makes the answer exact, not approximate.
    """

    def __init__(self) -> None:
        self.codes_ = np.zeros((0, 0), np.uint8)

    def add(self, vectors: np.ndarray) -> "QuantizedBackend":
        map_large_allocations()
        n, dim = vectors.shape
        self.codes_ = np.empty((n, dim), np.uint8)
        self.low_, self.scale_, self.err_ = (np.empty(n, np.float32) for _ in range(3))
        for start in range(0, n, CHUNK):
            chunk = vectors[start:start + CHUNK]
            self._quantize(start, np.asarray(chunk, dtype=np.float32))
            release_pages(chunk)  # a mapped gallery streams through, never all resident
        self.rows_ = RowReader(vectors)
        return self

    def _quantize(self, start: int, block: np.ndarray) -> None:
        rows = slice(start, start + len(block))
        low, high = block.min(axis=1), block.max(axis=1)
        scale = np.where(high > low, (high - low) / 255.0, 1.0).astype(np.float32)
        codes = np.clip(np.rint((block - low[:, None]) / scale[:, None]), 0, 255)
        self.codes_[rows] = codes
        self.low_[rows], self.scale_[rows] = low, scale
        self.err_[rows] = np.linalg.norm(block - (low[:, None] + scale[:, None] * codes), axis=1)

    def approximate(self, queries: np.ndarray) -> np.ndarray:
        """The scan's scores [n_queries, size], each within ``|q| * err`` of the exact one.

        The rows are split between ``SCAN_THREADS`` threads (numpy and BLAS release the GIL).
        """
        out = np.empty((self.size, len(queries)), np.float32)  # row-major per block: measured fastest
        transposed = np.ascontiguousarray(queries.T)
        bounds = np.linspace(0, self.size, SCAN_THREADS + 1).astype(int)
        with single_threaded_blas():
            if SCAN_THREADS == 1 or self.size < 4 * CHUNK:
                self._scan(0, self.size, transposed, out)
            else:
                list(_scan_pool().map(lambda i: self._scan(bounds[i], bounds[i + 1], transposed, out),
                                      range(SCAN_THREADS)))
        out *= self.scale_[:, None]
        if self.low_.any():  # non-negative features (ours) have every offset 0
            out += np.outer(self.low_, queries.sum(axis=1))
        return out.T

    def _scan(self, start: int, stop: int, transposed: np.ndarray, out: np.ndarray) -> None:
        """``out[start:stop] = codes[start:stop] @ transposed``, widening a few rows at a time."""
        step = SCAN_ROWS if transposed.shape[1] < 4 else 2 * SCAN_ROWS
        buffer = np.empty((step, self.codes_.shape[1]), np.float32)
        for row in range(start, stop, step):
            codes = self.codes_[row:min(stop, row + step)]
            block = buffer[:len(codes)]
            np.copyto(block, codes, casting="unsafe")
            np.matmul(block, transposed, out=out[row:row + len(codes)])

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        n = min(n, self.size)
        approx = self.approximate(queries)
        scores = np.empty((len(queries), n), np.float32)
        rows = np.empty((len(queries), n), np.int64)
        for i, query in enumerate(queries):  # per query, never per photo
            candidates = self._candidates(approx[i], float(np.linalg.norm(query)), n)
            exact = self.rows_(candidates) @ query
            scores[i], rows[i] = best_first(exact, candidates, n)
        return scores, rows

    def _candidates(self, approx: np.ndarray, query_norm: float, n: int) -> np.ndarray:
        """Increasing rows whose exact score may be among the ``n`` best."""
        slack = self.err_ * np.float32(query_norm) + np.float32(ROUNDING_SLACK)
        floor = np.partition(approx - slack, self.size - n)[self.size - n]
        return np.flatnonzero(approx + slack >= floor)

    def set_groups(self, groups: np.ndarray) -> "QuantizedBackend":
        """Label every row with a group (a spot) for :meth:`search_groups`."""
        order = np.argsort(groups, kind="stable").astype(np.int32 if len(groups) < 2**31 else np.int64)
        ordered = np.asarray(groups)[order]
        changes = np.r_[False, ordered[1:] != ordered[:-1]]
        self.group_order_, self.group_starts_ = order, np.flatnonzero(np.r_[True, changes[1:]])
        self.group_ids_ = ordered[self.group_starts_]
        self.group_err_ = np.maximum.reduceat(self.err_[order], self.group_starts_)  # worst row per group
        self.row_group_ = np.empty(len(order), np.int32)  # row -> position in group_ids_
        self.row_group_[order] = np.cumsum(changes)
        return self

    def search_groups(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, group ids) [n_queries, k] of the ``k`` groups with the best row, best first.

        Exact like :meth:`search`: a group's best scanned score, widened by its
        worst row error, bounds its true best; only rows that can be the best of
        a group that can be in the top ``k`` are re-scored. One scan, however
        many rows a group has.
        """
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        k = min(k, len(self.group_ids_))
        approx = self.approximate(queries)
        scores = np.empty((len(queries), k), np.float32)
        groups = np.empty((len(queries), k), self.group_ids_.dtype)
        for i, query in enumerate(queries):  # per query, never per photo or spot
            scores[i], groups[i] = self._best_groups(approx[i], query, k)
        return scores, groups

    def _best_groups(self, approx: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        norm = np.float32(np.linalg.norm(query))
        row_slack = self.err_ * norm + np.float32(ROUNDING_SLACK)
        best = np.maximum.reduceat(approx[self.group_order_], self.group_starts_)
        slack = self.group_err_ * norm + np.float32(ROUNDING_SLACK)
        lower = best - slack  # the true best of each group is within these bounds
        # First re-score only the scan's best row of each group that may be in the top k:
        # its exact score is a much tighter lower bound than ``lower``, which prunes the
        # group's other rows (near-duplicates of a popular spot can number hundreds).
        leading = approx == best[self.row_group_]
        leaders = np.flatnonzero(leading & self._may_rank(best + slack, lower, k))
        leader_exact = self.rows_(leaders) @ query
        np.maximum.at(lower, self.row_group_[leaders], leader_exact)
        rest = np.flatnonzero(self._may_rank(best + slack, lower, k) & ~leading
                              & (approx + row_slack >= lower[self.row_group_]))
        rows = np.concatenate([leaders, rest])
        exact = np.concatenate([leader_exact, self.rows_(rest) @ query])
        of = self.row_group_[rows]
        order = np.lexsort((rows, -exact, of))  # each group's best row first
        first = order[np.r_[True, of[order][1:] != of[order][:-1]]]
        pick = first[np.lexsort((rows[first], -exact[first]))][:k]
        return exact[pick], self.group_ids_[of[pick]]

    def _may_rank(self, upper: np.ndarray, lower: np.ndarray, k: int) -> np.ndarray:
        """Per row: may its group be among the ``k`` best, given bounds on every group's best."""
        floor = np.partition(lower, len(lower) - k)[len(lower) - k]
        return (upper >= floor)[self.row_group_]

    def save(self, path: Path) -> None:
        with open(path, "wb") as handle:  # exactly ``path``: np.save would add ".npy"
            np.save(handle, np.asarray(self.rows_.vectors))

    @property
    def size(self) -> int:
        return int(self.codes_.shape[0])


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
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        n = min(n, self.size)
        distances, rows = self.model_.kneighbors(queries, n_neighbors=n)
        # |q - x|^2 = |q|^2 + 1 - 2 q.x for unit x: recover the inner product exactly.
        q2 = np.einsum("ij,ij->i", queries, queries)[:, None]
        return ((q2 + 1.0 - distances.astype(np.float32) ** 2) / 2.0).astype(np.float32), rows

    def save(self, path: Path) -> None:
        with open(path, "wb") as handle:  # exactly ``path``: np.save would add ".npy"
            np.save(handle, self._vectors.astype(np.float16))

    @property
    def size(self) -> int:
        return 0 if self.model_ is None else int(self.model_.n_samples_fit_)


class FaissBackend:
    """FAISS exact inner product, or IVF with ``nlist`` lists probed ``nprobe`` at a time."""

    def __init__(self, ivf: bool = False, nlist: int = 0, nprobe: int = 16):
        self.ivf, self.nlist, self.nprobe = ivf, nlist, nprobe

    def add(self, vectors: np.ndarray) -> "FaissBackend":
        faiss = _faiss()
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
        queries = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        scores, rows = self.index_.search(queries, min(n, self.size))
        return scores, rows.astype(np.int64)

    def save(self, path: Path) -> None:
        _faiss().write_index(self.index_, os.fspath(path))

    @property
    def size(self) -> int:
        return int(self.index_.ntotal) if hasattr(self, "index_") else 0


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise ConfigError("the faiss backend needs: pip install 'enfpire[faiss]'") from exc
    return faiss


BACKENDS = ("numpy", "sklearn", "faiss", "faiss-ivf")
DEFAULT_BACKEND = "numpy"


def make_backend(name: str) -> Backend:
    """A new, empty backend by its configuration name."""
    makers = {"numpy": QuantizedBackend, "sklearn": SklearnBackend,
              "faiss": FaissBackend, "faiss-ivf": lambda: FaissBackend(ivf=True)}
    if name not in makers:
        raise ConfigError(f"unknown backend {name!r}; choose one of {sorted(makers)}")
    return makers[name]()  # type: ignore[no-any-return]


def load_backend(name: str, path: Path) -> Backend:
    """A backend of kind ``name`` filled from what ``save`` wrote to ``path``."""
    if name.startswith("faiss"):
        backend = FaissBackend(ivf=name == "faiss-ivf")
        backend.index_ = _faiss().read_index(os.fspath(path))
        return backend
    return make_backend(name).add(np.load(path, mmap_mode="r"))
