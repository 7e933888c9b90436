"""The public spot catalogue served at ``GET /v1/spots``: what a phone needs to
send dummy requests that look like a tourist's.

Per spot: its public fields, its popularity (share of gallery photos: the
prior of how often it is asked about) and the same representative features a
candidates answer carries for it (so nothing new is disclosed). Once for the
index: the spread of real photos around their spot, measured leave-one-out
(each gallery photo against the mean of the *other* photos of its spot, as a
new photo would be), so synthetic photos can be calibrated to it.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

from .lookup import Lookup

_cache: "weakref.WeakKeyDictionary[Lookup, dict[str, Any]]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def catalogue(lookup: Lookup) -> dict[str, Any]:
    """The catalogue of ``lookup``'s index, computed once per loaded index."""
    with _lock:
        cached = _cache.get(lookup)
    if cached is None:
        cached = _build(lookup)
        with _lock:
            _cache[lookup] = cached
    return cached


def _build(lookup: Lookup) -> dict[str, Any]:
    index = lookup.index
    counts = np.bincount(index.photo_spot, minlength=len(index.spots))
    share = counts / max(1, counts.sum())
    spots = [{**lookup.candidate(row), "popularity": round(float(share[row]), 6)} for row in range(len(index.spots))]
    return {"index_version": index.version, "dim": index.dim, "spots": spots, "spread": spread(lookup)}


def spread(lookup: Lookup) -> dict[str, float]:
    """Leave-one-out photo-to-spot spread: ``cos_median`` of a photo with its spot's
    L2-normalised mean, and ``log_tan_sigma``, the standard deviation of the log
    tangent of that angle (how much photos differ in how typical they are)."""
    index = lookup.index
    labels = np.asarray(index.photo_spot)
    sums = np.zeros((len(index.spots), index.dim), np.float64)
    cos = []
    for start in range(0, len(labels), 4096):  # bounded memory on big indexes
        np.add.at(sums, labels[start:start + 4096], np.asarray(index.features[start:start + 4096], np.float64))
    counts = np.bincount(labels, minlength=len(index.spots))
    for start in range(0, len(labels), 4096):
        rows = np.arange(start, min(start + 4096, len(labels)))
        rows = rows[counts[labels[rows]] > 1]
        x = np.asarray(index.features[rows], np.float64)
        others = sums[labels[rows]] - x
        cos.append((x * others).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(others, axis=1), 1e-12))
    values = np.clip(np.concatenate(cos) if cos else np.zeros(0), 1e-3, 1 - 1e-6)
    if len(values) < 2:
        return {"cos_median": 0.8, "log_tan_sigma": 0.25, "n": int(len(values))}
    log_tan = np.log(np.sqrt(1 - values ** 2) / values)
    return {"cos_median": round(float(np.median(values)), 4), "log_tan_sigma": round(float(log_tan.std()), 4),
            "n": int(len(values))}
