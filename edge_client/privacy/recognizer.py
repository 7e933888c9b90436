"""Choosing the answer on the device: the server's candidates are compared with
the phone's own, untransformed feature, so the pick never leaves the phone."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import BadResponseError
from ..protocol import wire
from ..vision.extractor import l2_normalize
from .evidence import Calibration, look_spread, terms

Projector = Callable[[np.ndarray], np.ndarray]


def projector(basis: np.ndarray | None) -> tuple[Projector, int | None]:
    """The map into the space candidate features travel in, and that space's dimension.

    With a codec (its ``basis`` is in the public document, ``edge_client.protocol.public``: the
    gallery's PCA or its learned whitening, either way a ``[dim, D]`` matrix) the phone projects its
    own feature on it and L2-normalises; otherwise features compare as they are.
    """
    if basis is None:
        return (lambda feature: feature), None
    basis = np.asarray(basis, np.float32)
    if basis.ndim != 2:
        raise BadResponseError("the server's codec basis must be a matrix")
    return (lambda feature: l2_normalize(basis @ feature)), int(basis.shape[0])


@dataclass(frozen=True)
class Candidate:
    """A spot the server proposed, scored on the device."""

    id: str
    name: str
    lat: float | None
    lon: float | None
    info: dict[str, Any]
    score: float
    spread: float = 1.0  # the mean cosine between its looks (edge_client.privacy.evidence.look_spread)


@dataclass(frozen=True)
class Recognition:
    """The device's answer. ``spot_id`` is None ("not a known spot") when the best candidate
    scores below the operating point; the ranked ``candidates`` are listed either way.

    ``confidence`` is the share of photos of known spots that score lower than this one, from the
    server's published calibration (None when the server publishes none).

    ``privacy`` is the query's privacy receipt (:mod:`edge_client.privacy.receipt`), computed on the
    phone and never sent: ``plausible_spots``, ``server_top1_probability``, ``answer_probability``,
    ``cells_sent``, ``request_sent`` (False for an answer from the phone's cache: nothing was sent).
    None for transforms that send a vector, which have no posterior the phone can compute.
    """

    spot_id: str | None
    name: str | None
    info: dict[str, Any]
    score: float
    lat: float | None = None
    lon: float | None = None
    candidates: list[Candidate] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    confidence: float | None = None
    evidence: float | None = None  # what ``confidence`` was read from (edge_client.privacy.evidence)
    privacy: dict[str, Any] | None = None  # the privacy receipt (edge_client.privacy.receipt); never sent

    @property
    def best(self) -> str | None:
        """The best candidate's id whether or not it was answered (the closed-set answer)."""
        return self.candidates[0].id if self.candidates else None

    def to_dict(self) -> dict[str, Any]:
        return {"spot_id": self.spot_id, "name": self.name, "score": self.score, "confidence": self.confidence,
                "evidence": self.evidence, "lat": self.lat, "lon": self.lon, "info": self.info,
                "candidates": [c.id for c in self.candidates], "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received, "privacy": self.privacy}


def coverage(basis: np.ndarray | None) -> Callable[[np.ndarray], float]:
    """The length of a unit feature inside the codec basis' row space (1.0 without a codec)."""
    if basis is None:
        return lambda feature: 1.0
    span = subspace(basis)
    return lambda feature: float(np.linalg.norm(span @ l2_normalize(feature)))


def subspace(basis: np.ndarray) -> np.ndarray:
    """Orthonormal rows spanning the rows of ``basis`` (``[dim, D]``): the subspace a coverage is
    measured in. A PCA basis is its own (up to float16 rounding); a learned whitening's rows are
    not orthonormal, so their length alone would measure the whitening's gains, not the subspace."""
    q, _ = np.linalg.qr(np.asarray(basis, np.float64).T)
    return q.T.astype(np.float32)


def lifter(basis: np.ndarray) -> np.ndarray:
    """The ``[dim, D]`` matrix taking codec-space rows back to feature space (``rows @ lifter``):
    the least-norm feature whose projection is the row, ``(B B^T)^-1 B``. For a PCA basis (orthonormal
    rows) that is the basis itself; a learned whitening needs the inverse of its Gram matrix."""
    basis = np.asarray(basis, np.float64)
    return np.linalg.solve(basis @ basis.T, basis).astype(np.float32)


#: Softness of the vote of a candidate's features (cosine units). Chosen on the gallery-only tuning
#: splits of wa-landmarks and ie-tower: a spot whose several looks are close to the photo beats one
#: with a single lucky look (top-1 0.752 -> 0.767 and 0.387 -> 0.402 against the hard maximum).
VOTE_TEMPERATURE = 0.03


def score_candidates(feature: np.ndarray, candidates: list[dict[str, Any]], dim: int) -> list[Candidate]:
    """Each candidate scored against ``feature``, best first (ties keep server order).

    The score is a soft maximum of the cosines of the candidate's features: the best cosine plus
    at most ``VOTE_TEMPERATURE * log(features)`` for other looks nearly as close.
    """
    scored = []
    for raw in candidates:
        try:
            features = wire.decode(raw["features"], expect_dim=dim).reshape(-1, dim)
            spot_id, name = str(raw["id"]), str(raw["name"])
            lat, lon, info = raw.get("lat"), raw.get("lon"), dict(raw.get("info") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise BadResponseError(f"malformed candidate: {exc}") from None
        norms = np.linalg.norm(features, axis=1)
        scored.append(Candidate(spot_id, name, _coord(lat), _coord(lon), info,
                                soft_max((features @ feature) / np.maximum(norms, 1e-12)), look_spread(features)))
    return sorted(scored, key=lambda c: -c.score)


def soft_max(cosines: np.ndarray, temperature: float = VOTE_TEMPERATURE) -> float:
    """``temperature * log(sum(exp(cosines / temperature)))``, computed from the maximum (no overflow)."""
    if not len(cosines):
        return -1.0
    best = float(cosines.max())
    return best + temperature * float(np.log(np.exp((cosines - best) / temperature).sum()))


def _coord(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def rerank(feature: np.ndarray, candidates: list[dict[str, Any]], dim: int, threshold: float | None = None,
           calibration: Calibration | None = None, keep: float = 1.0, coverage: float = 1.0) -> Recognition:
    """The best candidate for ``feature`` (projected), or "not a known spot": below an explicit
    score ``threshold``, or else when fewer than ``1 - keep`` of the photos of known spots show
    less evidence (``calibration``; ``coverage`` is the unprojected feature's, see
    :mod:`edge_client.privacy.evidence`)."""
    ranked = score_candidates(feature, candidates, dim)
    score = ranked[0].score if ranked else 0.0
    evidence = confidence = None
    if calibration is not None and ranked:
        second = ranked[1].score if len(ranked) > 1 else None
        evidence = calibration.evidence(terms(score, second, coverage, ranked[0].spread))
        confidence = calibration.confidence(evidence)
    if threshold is not None:
        unknown = score < threshold
    else:
        unknown = calibration is not None and evidence is not None and keep < 1.0 \
            and evidence < calibration.threshold(keep)
    if not ranked or unknown:
        return Recognition(None, None, {}, score, candidates=ranked, confidence=confidence, evidence=evidence)
    top = ranked[0]
    return Recognition(top.id, top.name, top.info, top.score, top.lat, top.lon, ranked, confidence=confidence,
                       evidence=evidence)
