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

from edge_client import wire
from edge_client.extractor import l2_normalize
from edge_client.recognizer import VOTE_TEMPERATURE, soft_max

from .cells import spherical_kmeans, spot_photos

#: Gallery photos scored leave-one-out (a fixed random sample): about a second of work at load.
SAMPLE = 800
#: Weight of a photo's coverage (see ``edge_client.recognizer.Calibration``) in its evidence.
#: Chosen on the gallery-only tuning split of wa-landmarks against a fixed sample of ie-tower
#: photos: at 93% of correct answers kept, 0.5 rejects 88% of those (the score alone 81%).
COVERAGE_WEIGHT = 0.5
#: Published quantile levels: every 1%.
LEVELS = np.round(np.linspace(0.0, 1.0, 101), 2)

Encoder = Callable[[np.ndarray], dict[str, Any]]
Projector = Callable[[np.ndarray], np.ndarray]


def leave_one_out_scores(features: np.ndarray, groups: list[np.ndarray], per_spot: int, encode: Encoder,
                         project: Projector, published: list[np.ndarray], coverage: Callable[[np.ndarray], float],
                         sample: int = SAMPLE, seed: int = 0) -> np.ndarray:
    """The phone's evidence (rerank score + weighted coverage) for sampled gallery photos it
    would answer correctly.

    Each photo is scored against every spot's ``published`` prototypes (decoded, as the phone
    gets them), its own spot's recomputed without it; it counts when its own spot comes first,
    as a correct answer the phone would give. Spots of one photo take no part (nothing is left).
    """
    owners = [(spot, i) for spot, rows in enumerate(groups) if len(rows) > 1 for i in range(len(rows))]
    if not owners:
        return np.zeros(0, np.float32)
    picks = np.sort(np.random.default_rng(seed).choice(len(owners), min(sample, len(owners)), replace=False))
    looked = [s for s, m in enumerate(published) if len(m)]  # a spot without looks scores nothing
    coded, starts = _unit_rows([published[s] for s in looked])
    position = {s: i for i, s in enumerate(looked)}
    scores, loaded, photos = [], -1, np.zeros(0, np.float32)
    for pick in picks:  # owners run spot by spot: each spot's photos are read once
        spot, i = owners[pick]
        if spot != loaded:
            loaded, photos = spot, l2_normalize(spot_photos(features, groups[spot]))
        rest = np.delete(photos, i, axis=0)
        protos = spherical_kmeans(rest, per_spot, restarts=1) if len(rest) > per_spot else rest
        query = project(photos[i])
        own = soft_max(_unit_rows([wire.decode(encode(protos)).reshape(len(protos), -1)])[0] @ query)
        others = np.delete(_spot_soft_max(coded @ query, starts), position[spot])
        if not len(others) or own > others.max():
            scores.append(own + COVERAGE_WEIGHT * coverage(photos[i]))
    return np.asarray(scores, np.float32)


def _unit_rows(matrices: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``matrices`` stacked and scaled to unit length, and where each matrix starts."""
    rows = np.concatenate(matrices).astype(np.float64)
    starts = np.cumsum([0] + [len(m) for m in matrices[:-1]])
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12), starts


def _spot_soft_max(cosines: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """:func:`soft_max` of every spot's run of ``cosines`` at once."""
    top = float(cosines.max())
    sums = np.add.reduceat(np.exp((cosines - top) / VOTE_TEMPERATURE), starts)
    return top + VOTE_TEMPERATURE * np.log(sums)


def public(scores: np.ndarray) -> dict[str, Any]:
    """What ``/v1/info`` publishes: the quantiles of the evidence ``scores`` at :data:`LEVELS`
    and the weight they were computed with (empty without scores)."""
    if not len(scores):
        return {}
    quantiles = np.quantile(scores, LEVELS)
    return {"kind": "leave_one_out_rerank", "n": int(len(scores)), "coverage_weight": COVERAGE_WEIGHT,
            "levels": LEVELS.tolist(),
            "scores": [round(float(q), 4) for q in quantiles]}
