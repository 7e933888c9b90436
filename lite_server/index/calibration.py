"""Open-set calibration: how the phone's rerank score of a photo of a known spot is distributed.

The phone turns its best candidate's score into a confidence, and answers
"not a known spot" below an operating point, on its own (the server learns
nothing new). To do that it needs to know what genuine scores look like for
this index. The server measures them leave-one-out on its own gallery, in
the phone's comparison space: a gallery photo, projected with the published
codec, against every spot's published prototypes, its own spot's recomputed
without it (k-means centres, int8 codes, the phone's soft maximum), as the
phone would score a new photo of that spot. The quantiles of the scores of
the photos it would answer correctly go into ``/v1/info`` under
``calibration``: a few hundred bytes, the same for every phone, a
deterministic function of the index like the other public parameters.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from edge_client.privacy.recognizer import VOTE_TEMPERATURE, soft_max

from .cells import spherical_kmeans

#: Gallery photos scored leave-one-out (a fixed random sample): about a second of work at load.
SAMPLE = 800
#: Weight of a photo's coverage (see ``edge_client.privacy.recognizer.Calibration``) in its evidence.
#: Chosen on the gallery-only tuning split of wa-landmarks against a fixed sample of ie-tower
#: photos: at 93% of correct answers kept, 0.5 rejects 88% of those (the score alone 81%).
COVERAGE_WEIGHT = 0.5
#: The weight per codec kind. A learned whitening's row space is not where the gallery's photos lie
#: (it favours directions photos of one spot share, however faint), so coverage there tells other
#: places apart badly: offline on wa-landmarks' tuning split against ie-tower photos, 93% kept, the
#: score alone rejects 0.830 of them, with that coverage at 0.5 0.803; it publishes weight 0.
COVERAGE_WEIGHTS = {"pca": COVERAGE_WEIGHT, "learned-whitening": 0.0}


def coverage_weight(codec_kind: str) -> float:
    """The coverage weight of a codec of ``codec_kind`` (:data:`COVERAGE_WEIGHT` for an unknown one)."""
    return COVERAGE_WEIGHTS.get(codec_kind, COVERAGE_WEIGHT)
#: Published quantile levels: every 1%.
LEVELS = np.round(np.linspace(0.0, 1.0, 101), 2)

#: Queries scored against every look at once (bounded memory on a national catalogue).
CHUNK = 64

Quantizer = Callable[[np.ndarray], np.ndarray]


def sample(sizes: np.ndarray, count: int = SAMPLE, seed: int = 0) -> np.ndarray:
    """The gallery photos scored, as [P, 2] (spot, position in the spot's rows): a fixed random
    ``count`` of the photos of spots with more than one (a spot of one photo has nothing left
    to leave out). An index update uses it to project only the spots it needs."""
    sizes = np.asarray(sizes, np.int64)
    eligible = np.flatnonzero(sizes > 1)
    owner = np.repeat(eligible, sizes[eligible])
    total = len(owner)
    picks = np.sort(np.random.default_rng(seed).choice(total, min(count, total), replace=False))
    first = np.cumsum(sizes[eligible]) - sizes[eligible]  # each eligible spot's first slot
    position = picks - np.repeat(first, sizes[eligible])[picks]
    return np.stack([owner[picks], position], axis=1) if total else np.zeros((0, 2), np.int64)


def leave_one_out_scores(vectors: np.ndarray, groups: list[np.ndarray], coverage: np.ndarray,
                         looks: np.ndarray, look_spot: np.ndarray, per_spot: int, quantize: Quantizer,
                         picks: np.ndarray, weight: float = COVERAGE_WEIGHT) -> np.ndarray:
    """The phone's evidence (rerank score + ``weight`` x coverage) for the gallery photos ``picks``
    names (see :func:`sample`) that it would answer correctly.

    ``vectors`` are unit photo vectors in the codec space (``groups`` their rows per spot,
    ``coverage`` their coverage); ``looks`` the spots' published looks, which ``quantize``
    turns into what the phone decodes. Each photo is scored against every spot's looks, its
    own spot's recomputed without it; it counts when its own spot comes first, as a correct
    answer the phone would give. Only the picked spots' ``groups`` are read.
    """
    if not len(picks) or not len(looks):
        return np.zeros(0, np.float32)
    spots = picks[:, 0]
    rows = np.array([groups[s][i] for s, i in picks])
    looked, starts = np.unique(look_spot, return_index=True)  # a spot without looks scores nothing
    column = np.full(len(groups), -1)
    column[looked] = np.arange(len(looked))
    published = _unit(quantize(looks))
    scores = []
    for start in range(0, len(picks), CHUNK):
        part = slice(start, start + CHUNK)
        rivals = _rivals(vectors[rows[part]] @ published.T, starts, column[spots[part]])
        for spot, row, rival in zip(spots[part], rows[part], rivals):
            rest = vectors[groups[spot][groups[spot] != row]]
            protos = spherical_kmeans(rest, per_spot, restarts=1) if len(rest) > per_spot else rest
            own = soft_max(_unit(quantize(protos)) @ vectors[row])
            if own > rival:
                scores.append(own + weight * coverage[row])
    return np.asarray(scores, np.float32)


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def _rivals(cosines: np.ndarray, starts: np.ndarray, own: np.ndarray) -> np.ndarray:
    """For each row of ``cosines`` (a photo against every look, spots' runs of columns
    beginning at ``starts``), the best :func:`soft_max` of a spot other than column ``own``
    (-1: none is its own); -inf when there is no other spot.

    A spot's soft maximum lies between its best look and that plus ``T log(its looks)``,
    so only spots whose best look comes that close to the best other spot's can be the
    rival; those few are scored exactly (exponentials of every look of a 100,000-spot
    catalogue took most of the calibration's time).
    """
    ends = np.append(starts[1:], cosines.shape[1])
    peaks = np.maximum.reduceat(cosines, starts, axis=1)
    mine = np.flatnonzero(own >= 0)
    peaks[mine, own[mine]] = -np.inf
    slack = VOTE_TEMPERATURE * np.log(max(1, int((ends - starts).max(initial=1))))
    rivals = np.full(len(cosines), -np.inf)
    for i, (row, peak) in enumerate(zip(cosines, peaks)):
        near = np.flatnonzero(peak >= peak.max(initial=-np.inf) - slack) if np.isfinite(peak).any() else []
        rivals[i] = max((soft_max(row[starts[s]:ends[s]]) for s in near), default=-np.inf)
    return rivals


def public(scores: np.ndarray, weight: float = COVERAGE_WEIGHT) -> dict[str, Any]:
    """What ``/v1/info`` publishes: the quantiles of the evidence ``scores`` at :data:`LEVELS`
    and the coverage ``weight`` they were computed with (empty without scores)."""
    if not len(scores):
        return {}
    quantiles = np.quantile(scores, LEVELS)
    return {"kind": "leave_one_out_rerank", "n": int(len(scores)), "coverage_weight": weight,
            "levels": LEVELS.tolist(),
            "scores": [round(float(q), 4) for q in quantiles]}
