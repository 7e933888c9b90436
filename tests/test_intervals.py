"""The spot-clustered bootstrap behind every ``<figure>_ci95`` of the evaluation."""
from __future__ import annotations

import numpy as np
import pytest

from tools.evaluate import intervals as iv


def test_all_ones_and_all_zeros_have_degenerate_intervals() -> None:
    spots = np.repeat(np.arange(20), 5)
    assert iv.mean_ci95(np.ones(100), spots) == [1.0, 1.0]
    assert iv.mean_ci95(np.zeros(100), spots) == [0.0, 0.0]
    assert iv.mean_ci95([], []) is None


def test_interval_contains_the_point_estimate_and_is_reproducible() -> None:
    rng = np.random.default_rng(3)
    spots = rng.integers(0, 40, 300)
    hits = rng.random(300) < 0.3
    lo, hi = iv.mean_ci95(hits, spots)  # type: ignore[misc]
    assert lo < hits.mean() < hi and hi - lo < 0.25
    assert iv.mean_ci95(hits, spots) == [lo, hi]  # a fixed seed: the same interval every run


def test_clustering_by_spot_widens_the_interval_when_spots_differ() -> None:
    # 30 spots of 10 queries: the attacker finds every query of a third of them and none of the rest.
    spots = np.repeat(np.arange(30), 10)
    hits = (spots % 3 == 0).astype(float)
    clustered = iv.mean_ci95(hits, spots)
    per_query = iv.mean_ci95(hits, np.arange(len(hits)))
    assert clustered is not None and per_query is not None
    assert clustered[0] <= hits.mean() <= clustered[1]
    assert clustered[1] - clustered[0] > 2 * (per_query[1] - per_query[0])


def test_resamples_draw_whole_spots_with_replacement() -> None:
    spots = np.array(["a", "a", "b", "c", "c", "c"])
    weights = iv.cluster_weights(spots, resamples=200)
    assert weights.shape == (200, 6)
    # A spot's queries always come together, and each resample draws as many spots as there are.
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 3] == weights[:, 5]).all()
    assert (weights[:, [0, 2, 3]].sum(axis=1) == 3).all()


def test_ratio_is_resampled_jointly() -> None:
    rng = np.random.default_rng(5)
    spots = rng.integers(0, 50, 400)
    base = (rng.random(400) < 0.8).astype(float)
    user = base * (rng.random(400) < 0.95)  # the user is right only where the baseline is
    lo, hi = iv.ratio_ci95(user, base, spots)  # type: ignore[misc]
    assert lo <= user.sum() / base.sum() <= hi <= 1.0
    assert iv.ratio_ci95(base, base, spots) == [1.0, 1.0]


def test_statistic_skips_resamples_where_it_is_undefined() -> None:
    devices = np.arange(10)

    def needs_two(weights: np.ndarray) -> float:
        if (weights > 0).sum() < 8:
            raise ValueError("too few devices")
        return float(weights[:5].sum() / weights.sum())

    interval = iv.statistic_ci95(needs_two, devices)
    assert interval is not None and 0.0 <= interval[0] <= 0.5 <= interval[1] <= 1.0


@pytest.mark.parametrize("value, at_most, word", [(0.30, True, "missed"), (0.22, True, "met"),
                                                  (0.90, False, "missed"), (0.98, False, "met")])
def test_verdict_names_missed_targets_with_their_interval(value: float, at_most: bool, word: str) -> None:
    bound = 0.25 if at_most else 0.95
    line = iv.verdict("server top-1", value, [value - 0.05, value + 0.05], bound, at_most)
    assert f": {word} (" in line and f"95% interval {value - 0.05:.3f}..{value + 0.05:.3f}" in line
    assert ("reaches past" in line) == (word == "met")  # every interval here reaches past the bound
