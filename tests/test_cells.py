"""The public structure the transforms use: bounded derivation cost on large galleries."""
from __future__ import annotations

import numpy as np

from lite_server import cells


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
