"""Open-set evidence: how sure the phone is that its best candidate is the spot in the photo.

The phone answers "not a known spot" on its own (the server learns nothing new), from
what it holds after a rerank: its feature, the candidates' looks and scores, and the
public structure. A photo of a spot in the catalogue tends to score high against that
spot's looks, clearly above the next spot, and to lie inside the codec's subspace; a
photo of a landmark the catalogue lacks lands on its nearest look-alike with a smaller
lead over the runner-up. The evidence is a weighted sum of those terms (:data:`TERMS`);
the server fits the weights on its own gallery (photos of its spots scored
leave-one-out against photos whose spot is left out entirely) and publishes them with
the quantiles of the evidence of its correct answers, so that ``keep`` still means the
share of photos of known spots the phone answers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import BadResponseError

#: The evidence terms, in the order the published weights list them:
#: ``score``    the best candidate's rerank score (soft maximum of its looks' cosines);
#: ``margin``   its lead over the second candidate, at most :data:`MARGIN_CAP`;
#: ``coverage`` the length of the unit feature inside the codec's subspace;
#: ``spread``   the mean cosine between the best candidate's looks (1 for a single look).
TERMS = ("score", "margin", "coverage", "spread")
#: A lead this large is already decisive: capped so a lone candidate (no runner-up) stays in range.
MARGIN_CAP = 0.25


def terms(best: float, second: float | None, coverage: float, spread: float) -> np.ndarray:
    """The evidence terms (:data:`TERMS`) of an answer whose best candidate scores ``best``,
    the next ``second`` (None: no other candidate), from a photo of ``coverage``."""
    lead = MARGIN_CAP if second is None or not np.isfinite(second) else min(MARGIN_CAP, best - second)
    return np.array([best, lead, coverage, spread], np.float64)


def look_spread(looks: np.ndarray) -> float:
    """The mean cosine between distinct looks of one spot (rows, any length; 1.0 for one look):
    how alike a spot's photos are, so a score can be read against it."""
    looks = np.asarray(looks, np.float64)
    if len(looks) < 2:
        return 1.0
    unit = looks / np.maximum(np.linalg.norm(looks, axis=1, keepdims=True), 1e-12)
    gram = unit @ unit.T
    n = len(unit)
    return float((gram.sum() - np.trace(gram)) / (n * (n - 1)))


@dataclass(frozen=True)
class Calibration:
    """How photos of known spots show evidence (``/v1/info`` ``calibration``), for open-set answers.

    ``weights`` (one per :data:`TERMS`) make the evidence; ``scores`` are its quantiles at
    ``levels`` over gallery photos the phone would answer correctly. The phone maps its own
    evidence to a confidence, the share of those photos that show less, and answers "not a
    known spot" when fewer than ``1 - keep`` of them do. A calibration of the first kind
    (``coverage_weight`` alone) is the evidence score + coverage_weight * coverage.
    """

    levels: np.ndarray
    scores: np.ndarray
    weights: np.ndarray

    @classmethod
    def from_public(cls, public: Mapping[str, Any] | None) -> "Calibration | None":
        """The published calibration, checked (:class:`BadResponseError` when malformed), or
        None when the server publishes none."""
        if not public:
            return None
        try:
            levels = np.asarray(public["levels"], np.float64)
            scores = np.asarray(public["scores"], np.float64)
            weights = _weights(public)
        except (KeyError, TypeError, ValueError) as exc:
            raise BadResponseError(f"the server's calibration is malformed: {exc}") from None
        if (levels.ndim != 1 or levels.shape != scores.shape or len(levels) < 2 or not np.isfinite(scores).all()
                or not np.isfinite(levels).all() or np.any(np.diff(levels) <= 0) or np.any(np.diff(scores) < 0)):
            raise BadResponseError("the server's calibration must be increasing quantiles at increasing levels")
        if weights.shape != (len(TERMS),) or not np.isfinite(weights).all():
            raise BadResponseError(f"the server's calibration weights must be {len(TERMS)} finite numbers")
        return cls(levels, scores, weights)

    def evidence(self, values: np.ndarray) -> float:
        """The evidence of an answer's :func:`terms`."""
        return float(self.weights @ np.asarray(values, np.float64))

    def confidence(self, evidence: float) -> float:
        """The share of photos of known spots that show less ``evidence`` (0 to 1)."""
        return float(np.interp(evidence, self.scores, self.levels))

    def threshold(self, keep: float) -> float:
        """The evidence that ``keep`` of the photos of known spots reach."""
        return float(np.interp(1.0 - keep, self.levels, self.scores))


def _weights(public: Mapping[str, Any]) -> np.ndarray:
    """The published weights by term name; the first kind's ``coverage_weight`` as weights."""
    if "weights" not in public:
        return np.array([1.0, 0.0, float(public.get("coverage_weight", 0.0)), 0.0])
    named = public["weights"]
    if not isinstance(named, Mapping) or set(named) != set(TERMS):
        raise ValueError(f"weights must name exactly the terms {', '.join(TERMS)}")
    return np.array([float(named[t]) for t in TERMS], np.float64)
