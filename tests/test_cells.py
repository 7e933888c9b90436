"""The public structure the transforms use: bounded derivation cost on large galleries."""
from __future__ import annotations

import numpy as np

from lite_server.index import cells


def test_sample_groups_bounds_each_spot_and_keeps_small_ones_whole() -> None:
    groups = [np.arange(5), np.arange(5, 2005), np.arange(2005, 2105)]
    sampled = cells.sample_groups(groups, cap=100)
    assert np.array_equal(sampled[0], groups[0]) and np.array_equal(sampled[2], groups[2])
    big = sampled[1]
    assert len(big) == 100 and np.all(np.diff(big) > 0) and set(big.tolist()) <= set(groups[1].tolist())
    assert np.array_equal(big, cells.sample_groups(groups, cap=100)[1])  # every replica derives the same
    assert not np.array_equal(big, cells.sample_groups(groups, cap=100, seed=1)[1])


def test_prototypes_of_a_sampled_spot_stay_close_to_all_its_photos() -> None:
    """Centres learnt from a sample describe the spot's other photos as well as their own."""
    rng = np.random.default_rng(0)
    looks = rng.random((4, 64)).astype(np.float32)
    photos = looks[rng.integers(0, 4, 3000)] + 0.05 * rng.standard_normal((3000, 64)).astype(np.float32)
    photos /= np.linalg.norm(photos, axis=1, keepdims=True)
    sampled = cells.sample_groups([np.arange(3000)], cap=256)
    centres, owner = cells.prototypes(photos, sampled, 4)
    assert centres.shape == (4, 64) and np.all(owner == 0)
    unseen = np.setdiff1d(np.arange(3000), sampled[0])
    assert (photos[unseen] @ centres.T).max(axis=1).min() > 0.95


def _look_alike_means(n_spots: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Unit spot means in loose groups of about 20, like landmarks of a few kinds."""
    rng = np.random.default_rng(seed)
    kinds = rng.standard_normal((n_spots // 20 + 1, dim)).astype(np.float32)
    means = kinds[rng.integers(0, len(kinds), n_spots)] + 0.7 * rng.standard_normal((n_spots, dim)).astype(np.float32)
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def _greedy(similarity: np.ndarray, capacity: int) -> np.ndarray:
    """The textbook greedy capacitated assignment, pair by pair from the most similar."""
    n_spots, n_cells = similarity.shape
    assign, load = np.full(n_spots, -1), np.zeros(n_cells, int)
    for flat in np.argsort(-similarity, axis=None):
        spot, cell = divmod(int(flat), n_cells)
        if assign[spot] < 0 and load[cell] < capacity:
            assign[spot], load[cell] = cell, load[cell] + 1
    return assign


def test_vectorised_capacitated_assignment_is_the_greedy_one() -> None:
    rng = np.random.default_rng(3)
    for n_spots, n_cells in ((37, 4), (200, 20), (301, 30)):
        similarity = rng.random((n_spots, n_cells))
        capacity = int(np.ceil(n_spots / n_cells))
        assert np.array_equal(cells._capacitated_assign(similarity, capacity), _greedy(similarity, capacity))


def test_batched_kmeans_finds_each_sets_looks_heaviest_first() -> None:
    rng = np.random.default_rng(1)
    looks = rng.standard_normal((50, 2, 16)).astype(np.float32)
    looks /= np.linalg.norm(looks, axis=2, keepdims=True)
    which = np.tile(np.r_[np.zeros(9, int), np.ones(3, int)], (50, 1))  # 9 photos of one look, 3 of the other
    photos = looks[np.arange(50)[:, None], which] + 0.02 * rng.standard_normal((50, 12, 16)).astype(np.float32)
    photos /= np.linalg.norm(photos, axis=2, keepdims=True)
    centres = cells.batched_kmeans(photos, 2, np.random.default_rng(0))
    assert centres.shape == (50, 2, 16)
    assert np.einsum("sd,sd->s", centres[:, 0], looks[:, 0]).min() > 0.99  # the 9-photo look first
    assert np.einsum("sd,sd->s", centres[:, 1], looks[:, 1]).min() > 0.99


def test_balanced_cells_of_many_spots_go_block_by_block_and_keep_every_cell_a_crowd() -> None:
    means = _look_alike_means(2000)
    assign = cells.balanced_cells(means, 10)
    sizes = np.bincount(assign)
    assert len(sizes) == 200 > 3 * cells.BLOCK_CELLS and sizes.min() >= 10
    # cells are look-alike groups: a spot is closer to its own cell's centre than to a random cell's
    centres = cells.cell_centres(means, assign, 200)
    own = np.einsum("sd,sd->s", means, centres[assign])
    assert own.mean() > (means @ centres.T).mean() + 0.3
    assert np.array_equal(assign, cells.balanced_cells(means, 10))  # every build derives the same


def test_an_update_moves_only_the_spots_it_must() -> None:
    means = _look_alike_means(1000)
    before = cells.balanced_cells(means, 10)
    grown = np.concatenate([means, _look_alike_means(10, seed=9)])  # 1% new spots
    after = cells.update_cells(grown, np.r_[before, np.full(10, -1)], 10)
    assert np.array_equal(after[:1000], before) and np.bincount(after).min() >= 10
    gone = np.flatnonzero(before == before[0])[:3]  # three spots of one cell leave
    keep = np.setdiff1d(np.arange(1000), gone)
    shrunk = cells.update_cells(means[keep], before[keep], 10)
    assert np.bincount(shrunk).min() >= 10 and (shrunk != before[keep]).mean() < 0.02


def test_removed_spots_are_replaced_from_neighbours_and_no_cell_is_renumbered() -> None:
    """A fresh build leaves every cell at exactly its minimum: nothing to spare. One spot leaves
    each of ten cells: the last cell is dissolved to make spares and each short cell takes one
    spot back; nothing else moves (a phone's delta stays near the 1% that changed)."""
    means = _look_alike_means(1000)
    before = cells.balanced_cells(means, 10)
    assert (np.bincount(before) == 10).all()
    gone = np.array([np.flatnonzero(before == c)[0] for c in range(0, 100, 10)])
    keep = np.setdiff1d(np.arange(1000), gone)
    after = cells.update_cells(means[keep], before[keep], 10)
    sizes = np.bincount(after)
    assert len(sizes) == 99 and sizes.min() >= 10
    moved = after != before[keep]
    from_last = before[keep] == 99
    assert moved[from_last].all() and moved[~from_last].sum() <= 10
    assert set(after[moved & ~from_last]) <= set(range(0, 100, 10))  # only into the short cells


def test_a_cell_whose_spots_all_left_is_closed_and_the_rest_stay_crowds() -> None:
    means = _look_alike_means(1000)
    before = cells.balanced_cells(means, 10)
    keep = np.flatnonzero(before != 5)
    after = cells.update_cells(means[keep], before[keep], 10)
    assert len(np.bincount(after)) == 99 and np.bincount(after).min() >= 10
    unchanged = before[keep] != 99
    assert np.array_equal(after[unchanged], before[keep][unchanged])  # only the last cell was renumbered
    assert (after[~unchanged] == 5).all()
