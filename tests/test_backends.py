"""Every backend against the exact answer, on real features of the real model.

The gallery is the 24-spot test index's real features plus jittered copies of
them, so near-ties (the hard case for a quantised scan) are plentiful.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_client.vision.extractor import l2_normalize
from lite_server.config import ServerConfig
from lite_server.index.store import Index
from lite_server.search.backends import (
    BACKENDS,
    FaissBackend,
    QuantizedBackend,
    best_first,
    load_backend,
    make_backend,
    release_pages,
)
from lite_server.search.batching import BatchingBackend
from lite_server.search.lookup import Lookup

TIE = 2e-5  # scores closer than this may come in either order from different float kernels


@pytest.fixture(scope="module")
def gallery(index_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(float16 unit rows, spot of each row): real features, then 3 jittered copies of each."""
    index = Index.load(index_dir)
    real = np.asarray(index.features, np.float32)
    rng = np.random.default_rng(0)
    copies = np.repeat(real, 3, axis=0) * np.exp(0.05 * rng.standard_normal((3 * len(real), real.shape[1]), np.float32))
    vectors = l2_normalize(np.concatenate([real, copies])).astype(np.float16)
    return vectors, np.concatenate([index.photo_spot, np.repeat(index.photo_spot, 3)])


@pytest.fixture(scope="module")
def queries(gallery: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    rng = np.random.default_rng(1)
    picked = gallery[0][rng.choice(len(gallery[0]), 12, replace=False)].astype(np.float32)
    return l2_normalize(picked * np.exp(0.1 * rng.standard_normal(picked.shape, np.float32)))


def exact(vectors: np.ndarray, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: every score in float32, best first, ties to the lower row."""
    scores = queries @ vectors.astype(np.float32).T
    rows = np.arange(len(vectors))
    picked = [best_first(s, rows, n) for s in scores]
    return np.stack([p[0] for p in picked]), np.stack([p[1] for p in picked])


def assert_same_ranking(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray],
                        tie: float = TIE) -> None:
    """Same scores; same rows at every rank not tied (within ``tie``) with a neighbour."""
    (got_s, got_r), (want_s, want_r) = got, want
    np.testing.assert_allclose(got_s, want_s, atol=tie)
    gaps = np.abs(np.diff(want_s, axis=1)) > tie
    clear = np.ones_like(want_r, bool)
    clear[:, 1:] &= gaps
    clear[:, :-1] &= gaps
    assert clear.mean() > 0.5  # the check below must check something
    assert np.array_equal(got_r[clear], want_r[clear])


@pytest.mark.parametrize("name", [b for b in BACKENDS if b != "faiss-ivf"])
def test_exact_backends_give_the_exact_top_n(name: str, gallery: tuple[np.ndarray, np.ndarray],
                                             queries: np.ndarray) -> None:
    vectors = gallery[0]
    backend = make_backend(name).add(vectors)
    # scikit-learn ranks by |q - x|^2 = 2 - 2 q.x in float32: cancellation costs it ~1e-4.
    tie = 2e-4 if name == "sklearn" else TIE
    for n in (1, 40, 160):
        assert_same_ranking(backend.search(queries, n), exact(vectors, queries, n), tie)


def test_the_default_matches_faiss_flat_exactly(gallery: tuple[np.ndarray, np.ndarray], queries: np.ndarray) -> None:
    vectors = gallery[0]
    ours = QuantizedBackend().add(vectors).search(queries, 160)
    faiss = FaissBackend().add(vectors).search(queries, 160)
    assert_same_ranking(ours, faiss)


def test_faiss_ivf_probing_every_list_is_exact(gallery: tuple[np.ndarray, np.ndarray], queries: np.ndarray) -> None:
    vectors = gallery[0]
    backend = FaissBackend(ivf=True, nlist=16, nprobe=16).add(vectors)
    assert_same_ranking(backend.search(queries, 40), exact(vectors, queries, 40))


def test_the_quantised_scan_really_needs_the_rescore(gallery: tuple[np.ndarray, np.ndarray],
                                                     queries: np.ndarray) -> None:
    """The uint8 scores alone misorder near-ties; the bound keeps every true neighbour."""
    backend = QuantizedBackend().add(gallery[0])
    approx = backend.approximate(queries)
    want = exact(gallery[0], queries, 40)
    scan_only = np.argsort(-approx, axis=1, kind="stable")[:, :40]
    assert not np.array_equal(scan_only, want[1])
    for i, q in enumerate(queries):
        kept = backend._candidates(approx[i], float(np.linalg.norm(q)), 40)
        assert set(want[1][i]) <= set(kept) and len(kept) < len(gallery[0]) / 4


def test_search_groups_ranks_spots_by_their_best_photo(gallery: tuple[np.ndarray, np.ndarray],
                                                       queries: np.ndarray) -> None:
    vectors, spots = gallery
    backend = QuantizedBackend().add(vectors).set_groups(spots)
    scores, groups = backend.search_groups(queries, 10)
    every = queries @ vectors.astype(np.float32).T
    for q in range(len(queries)):
        best = np.array([every[q][spots == s].max() for s in range(spots.max() + 1)])
        np.testing.assert_allclose(scores[q], np.sort(best)[::-1][:10], atol=TIE)
        assert len(set(groups[q])) == 10 and np.allclose(best[groups[q]], scores[q], atol=TIE)


def test_save_and_load_keep_the_answers(gallery: tuple[np.ndarray, np.ndarray], queries: np.ndarray,
                                        tmp_path: Path) -> None:
    for name in ("numpy", "faiss"):
        backend = make_backend(name).add(gallery[0])
        path = tmp_path / f"{name}.bin"
        backend.save(path)
        again = load_backend(name, path)
        assert again.size == backend.size
        assert_same_ranking(again.search(queries, 40), backend.search(queries, 40))


def test_a_mapped_gallery_is_read_without_staying_resident(gallery: tuple[np.ndarray, np.ndarray],
                                                           queries: np.ndarray, tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    path = tmp_path / "big.npy"
    rng = np.random.default_rng(5)
    tiled = np.tile(gallery[0], (16, 1)).astype(np.float32)
    np.save(path, l2_normalize(tiled * np.exp(0.05 * rng.standard_normal(tiled.shape, np.float32))).astype(np.float16))
    mapped = np.load(path, mmap_mode="r")
    process = psutil.Process()
    before = process.memory_info().rss
    backend = QuantizedBackend().add(mapped)  # reads every page of the mapping
    backend.search(queries, 40)
    grown = process.memory_info().rss - before
    # The uint8 codes are half the float16 bytes; keeping the mapping resident would add all of it.
    assert grown < mapped.nbytes * 0.8
    assert_same_ranking(backend.search(queries, 40), exact(np.asarray(mapped), queries, 40))
    release_pages(mapped[5:9])  # a slice of a mapping is fine too
    assert float(mapped[5:9].astype(np.float32).sum()) > 0


class GatedBackend(QuantizedBackend):
    """The real backend, whose first search waits for the test to open a gate; counts searches."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.calls = threading.Event(), []

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(len(queries))
        self.gate.wait(timeout=30)
        return super().search(queries, n)


def test_concurrent_searches_share_one_batch(gallery: tuple[np.ndarray, np.ndarray], queries: np.ndarray) -> None:
    inner = GatedBackend().add(gallery[0])
    batched = BatchingBackend(inner, max_batch=32)
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, batched.search(queries[i], 5 + i)))
               for i in range(len(queries))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(batched._waiting) < len(queries) - 1 and time.monotonic() < deadline:
        time.sleep(0.01)  # the leader's search waits at the gate while the rest queue
    inner.gate.set()
    for thread in threads:
        thread.join(timeout=60)
    assert inner.calls == [1, len(queries) - 1]  # the leader alone, then everyone else at once
    for i in range(len(queries)):
        assert_same_ranking(results[i], QuantizedBackend.search(inner, queries[i:i + 1], 5 + i))


def test_a_failing_batch_fails_every_caller_and_the_next_one_runs(gallery: tuple[np.ndarray, np.ndarray],
                                                                  queries: np.ndarray) -> None:
    batched = BatchingBackend(QuantizedBackend().add(gallery[0]))
    with pytest.raises(ValueError):
        batched.search(queries[:, :10], 5)  # wrong dimension
    assert batched.search(queries[:1], 5)[1].shape == (1, 5)


def test_lookup_spots_agree_across_backends_and_batching(index_dir: Path, queries: np.ndarray) -> None:
    index = Index.load(index_dir)
    reference = Lookup(index, ServerConfig(backend="faiss", max_batch=1)).nearest_spots(queries[:1], 10)[0]
    for backend, batch in (("numpy", 1), ("numpy", 8), ("sklearn", 8)):
        lookup = Lookup(index, ServerConfig(backend=backend, max_batch=batch))
        assert np.array_equal(lookup.nearest_spots(queries[:1], 10)[0], reference)
