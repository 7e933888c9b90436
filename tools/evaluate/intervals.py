"""Spot-clustered bootstrap intervals for the evaluation's figures, and target verdicts.

A figure is a mean over units (queries, linked phones, photos, devices), but
units of one spot are not independent: a spot the attacker finds, it finds
for all its photos. So the bootstrap resamples *clusters* (spots; devices for
the dummies) with replacement, every unit of a drawn cluster coming along,
and recomputes the figure: the 2.5th and 97.5th percentiles of 1,000 such
resamples are its 95% interval. The seed is fixed, so a figure's interval is
reproducible and figures over the same clusters share their resamples (a
ratio of two of them is resampled jointly with :func:`ratio_ci95`).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

RESAMPLES = 1000
SEED = 27
LEVEL = 0.95

Interval = list[float]


def cluster_weights(clusters: Sequence[object] | np.ndarray, resamples: int = RESAMPLES,
                    seed: int = SEED) -> np.ndarray:
    """[resamples, units]: how often each unit is in each resample, its cluster being drawn
    that often among ``len(set(clusters))`` draws with replacement."""
    _, codes = np.unique(np.asarray(clusters), return_inverse=True)
    n = int(codes.max()) + 1
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    offsets = (draws + n * np.arange(resamples)[:, None]).ravel()
    counts = np.bincount(offsets, minlength=resamples * n).reshape(resamples, n)
    return counts[:, codes.reshape(-1)].astype(np.float64)


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> Interval | None:
    """[lo, hi] of the finite ``samples`` (None if there are none), widened outwards to 4 decimals."""
    finite = np.asarray(samples, np.float64)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return None
    lo, hi = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return [math.floor(lo * 1e4) / 1e4, math.ceil(hi * 1e4) / 1e4]


def mean_ci95(values: Sequence[float] | np.ndarray, clusters: Sequence[object] | np.ndarray) -> Interval | None:
    """95% interval of the mean of ``values`` (one per unit), resampling ``clusters``."""
    values = np.asarray(values, np.float64)
    if not len(values):
        return None
    weights = cluster_weights(clusters)
    return percentile_interval(weights @ values / weights.sum(axis=1))


def ratio_ci95(numerator: Sequence[float] | np.ndarray, denominator: Sequence[float] | np.ndarray,
               clusters: Sequence[object] | np.ndarray) -> Interval | None:
    """95% interval of sum(numerator) / sum(denominator), both resampled together: a precision
    (found / claimed per device) or a figure relative to the baseline on the same queries."""
    numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    if not len(numerator):
        return None
    weights = cluster_weights(clusters)
    below = weights @ denominator
    with np.errstate(divide="ignore", invalid="ignore"):
        return percentile_interval(np.where(below > 0, (weights @ numerator) / below, np.nan))


def statistic_ci95(statistic: Callable[[np.ndarray], float],
                   clusters: Sequence[object] | np.ndarray) -> Interval | None:
    """95% interval of any ``statistic(unit_weights)`` (e.g. an AUC with sample weights); a
    resample where it is undefined (NaN, or raising ValueError) is left out."""
    values = []
    for weights in cluster_weights(clusters):
        try:
            values.append(statistic(weights))
        except ValueError:
            values.append(np.nan)
    return percentile_interval(np.array(values))


def verdict(label: str, value: float, interval: Interval | None, bound: float, at_most: bool,
            unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
    """One report line: "``label`` <= bound: met (value, 95% lo..hi)" or "... missed (...)";
    a point estimate that meets the bound while its interval reaches past it says so."""
    met = value <= bound if at_most else value >= bound
    shown = f"{value / scale:.{digits}f}{unit}"
    if interval is not None:
        lo, hi = (v / scale for v in interval)
        shown += f", 95% interval {lo:.{digits}f}..{hi:.{digits}f}{unit}"
        crosses = interval[1] > bound if at_most else interval[0] < bound
    else:
        crosses = False
    note = "; the interval reaches past the target" if met and crosses else ""
    return (f"- {label} {'<=' if at_most else '>='} {round(bound / scale, 3):g}{unit}: "
            f"{'met' if met else 'missed'} ({shown}){note}")
