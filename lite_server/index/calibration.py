"""Open-set calibration: how the phone's evidence for a photo of a known spot is distributed,
and how to weigh its terms so that it tells a known landmark from an unknown one.

The phone turns its answer's evidence (:mod:`edge_client.privacy.evidence`: the best
candidate's score, its lead over the second, the photo's coverage, the best spot's
looks' spread) into a confidence, and answers "not a known spot" below an operating
point, on its own (the server learns nothing new). The server measures the terms on its
own gallery, in the phone's comparison space, for a fixed sample of gallery photos
projected with the published codec, each twice:

* *known*: against every spot's published looks, its own spot's recomputed without it
  (k-means centres, int8 codes, the phone's soft maximum), as the phone would score a
  new photo of that spot (kept when its spot comes first: an answer the phone gets right);
* *unknown*: with its own spot left out entirely, as the phone would score a photo of a
  landmark the catalogue lacks.

:func:`public` fits the weights of a logistic regression of known against unknown on
those rows (a deterministic function of the index, like the other public parameters)
and publishes them with the quantiles of the known rows' evidence in ``/v1/info``
under ``calibration``: a few hundred bytes, the same for every phone.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from edge_client.privacy.evidence import TERMS, look_spread, terms
from edge_client.privacy.recognizer import VOTE_TEMPERATURE, soft_max

from .cells import spherical_kmeans

#: Gallery photos scored leave-one-out (a fixed random sample): about a second of work at load.
SAMPLE = 800
#: The weights published when the gallery cannot fit any (too few rows of either kind): the
#: score plus half the coverage, chosen on wa-landmarks' tuning split against ie-tower photos.
FALLBACK = {"score": 1.0, "margin": 0.0, "coverage": 0.5, "spread": 0.0}
#: Rows of each kind (known, unknown) a fit needs.
MIN_ROWS = 20
#: Spots a fit needs. It learns what an unknown landmark looks like from each photo with its own spot
#: left out, scored against the nearest of the others; with few spots those are few and far, so the
#: fitted lead over the runner-up overstates how far a new photo of a known spot leads: on a 10-spot
#: index of wa-landmarks (tests/device) the fit left 3 of 10 held-out photos of known spots
#: unanswered where the fallback answered all of them.
MIN_SPOTS = 20
#: L2 penalty of the fit on standardised terms: the weights stay finite when the kinds separate.
RIDGE = 1.0
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
                         picks: np.ndarray) -> np.ndarray:
    """The phone's evidence terms for the gallery photos ``picks`` names (see :func:`sample`), as
    rows [kind, *terms] (:data:`edge_client.privacy.evidence.TERMS`): kind 1 for a photo scored
    leave-one-out that the phone would answer correctly, kind 0 for the same photo with its
    spot left out (a landmark the catalogue lacks).

    ``vectors`` are unit photo vectors in the codec space (``groups`` their rows per spot,
    ``coverage`` their coverage); ``looks`` the spots' published looks, which ``quantize``
    turns into what the phone decodes. Only the picked spots' ``groups`` are read.
    """
    if not len(picks) or not len(looks):
        return np.zeros((0, 1 + len(TERMS)), np.float32)
    spots = picks[:, 0]
    rows = np.array([groups[s][i] for s, i in picks])
    looked, starts = np.unique(look_spot, return_index=True)  # a spot without looks scores nothing
    column = np.full(len(groups), -1)
    column[looked] = np.arange(len(looked))
    published = _unit(quantize(looks))
    ends = np.append(starts[1:], len(published))
    out = []
    for start in range(0, len(picks), CHUNK):
        part = slice(start, start + CHUNK)
        rivals = _rivals(vectors[rows[part]] @ published.T, starts, column[spots[part]])
        for spot, row, (first, second, near) in zip(spots[part], rows[part], rivals):
            if np.isfinite(first):  # its spot left out: the phone's best is the nearest other spot
                spread = look_spread(published[starts[near]:ends[near]])
                out.append([0.0, *terms(first, second, coverage[row], spread)])
            rest = vectors[groups[spot][groups[spot] != row]]
            protos = _unit(quantize(spherical_kmeans(rest, per_spot, restarts=1) if len(rest) > per_spot else rest))
            own = soft_max(protos @ vectors[row])
            if own > first:
                out.append([1.0, *terms(own, first, coverage[row], look_spread(protos))])
    return np.asarray(out, np.float32).reshape(-1, 1 + len(TERMS))


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def _rivals(cosines: np.ndarray, starts: np.ndarray, own: np.ndarray) -> list[tuple[float, float, int]]:
    """For each row of ``cosines`` (a photo against every look, spots' runs of columns
    beginning at ``starts``), among the spots other than column ``own`` (-1: none is its
    own): the best and second best :func:`soft_max` and the best one's column (-inf and
    -1 when there is none).

    A spot's soft maximum lies between its best look and that plus ``T log(its looks)``,
    so only spots whose best look comes that close to the second best other spot's can be
    among the two; those few are scored exactly (exponentials of every look of a
    100,000-spot catalogue took most of the calibration's time).
    """
    ends = np.append(starts[1:], cosines.shape[1])
    peaks = np.maximum.reduceat(cosines, starts, axis=1)
    mine = np.flatnonzero(own >= 0)
    peaks[mine, own[mine]] = -np.inf
    slack = VOTE_TEMPERATURE * np.log(max(1, int((ends - starts).max(initial=1))))
    out = []
    for row, peak in zip(cosines, peaks):
        finite = peak[np.isfinite(peak)]
        if not len(finite):
            out.append((-np.inf, -np.inf, -1))
            continue
        runner_up = np.partition(finite, len(finite) - 2)[len(finite) - 2] if len(finite) > 1 else finite[0]
        near = np.flatnonzero(peak >= runner_up - slack)
        scored = sorted(((soft_max(row[starts[s]:ends[s]]), int(s)) for s in near), reverse=True)
        out.append((scored[0][0], scored[1][0] if len(scored) > 1 else -np.inf, scored[0][1]))
    return out


def public(rows: np.ndarray, ratio: float | None = None, spots: int | None = None) -> dict[str, Any]:
    """What ``/v1/info`` publishes from :func:`leave_one_out_scores`' ``rows``: the weights of
    the evidence terms (coverage at ``ratio`` times the score's, by default a PCA codec's:
    :func:`coverage_ratio`; the fallback for a catalogue of fewer than :data:`MIN_SPOTS` ``spots``)
    and the quantiles at :data:`LEVELS` of the known rows' evidence (empty without known rows)."""
    rows = np.asarray(rows, np.float64).reshape(-1, 1 + len(TERMS))
    known = rows[:, 0] == 1.0
    if not known.any():
        return {}
    ratio = COVERAGE_RATIO if ratio is None else ratio
    few = spots is not None and spots < MIN_SPOTS
    weights = _fallback(ratio) if few else fit_weights(rows[:, 1:], known, ratio)
    evidence = rows[known, 1:] @ np.array([weights[t] for t in TERMS])
    return {"kind": "leave_one_out_evidence", "n": int(known.sum()), "n_unknown": int((~known).sum()),
            "weights": weights, "levels": LEVELS.tolist(),
            "scores": [round(float(q), 4) for q in np.quantile(evidence, LEVELS)]}


def current(rows: np.ndarray) -> bool:
    """Whether stored calibration ``rows`` are :func:`leave_one_out_scores`' of this version."""
    return rows.ndim == 2 and rows.shape[1] == 1 + len(TERMS)


#: The terms the fit weighs (the others get 0, but coverage: see :data:`COVERAGE_RATIO`). Chosen on
#: the gallery-only tuning splits of wa-landmarks and ie-tower (20% of the spots held out, through the
#: real client, keep 0.95): held-out landmarks rejected 0.387 and 0.210 against the score + 0.5
#: coverage's 0.328 and 0.149; the score alone, or with the coverage, rejected fewer (docs/privacy.md).
FITTED = ("score", "margin", "spread")
#: The coverage term's weight relative to the score's. Not fitted: a gallery photo with its spot
#: left out has the same coverage as with it, so only photos of other domains (outside the codec's
#: subspace) could teach it, and the server has none. 1.0 on the same tuning splits: other-domain
#: photos rejected 0.663 on wa-landmarks (0.5: 0.548; the score + 0.5 coverage: 0.713), correct
#: answers kept 0.940 and 0.929 (1.25 kept 0.909 on ie-tower, whose gallery photos lie deeper in the
#: codec's subspace than its queries: more coverage weight, more of its queries fall short).
COVERAGE_RATIO = 1.0
#: The ratio per codec kind. A learned whitening's coverage is measured in the gallery's top 32
#: principal directions published beside it (``lite_server.index.structure.COVERAGE_DIM``), where a
#: photo's length is more spread than in 128 (gallery and other-domain medians 0.85 and 0.71 on
#: wa-landmarks, against 0.92 and 0.83), so it is weighed on its own. On the tuning splits (`--tune
#: --links "" --held-out 0`, keep 0.95), wa-landmarks' other-domain photos rejected at 0.5 / 1.0 /
#: 1.5 / 2.0 / 2.5 / 3.0 / 4.0: 0.696 / 0.746 / 0.782 / 0.802 / 0.825 / 0.809 / 0.729, correct
#: answers kept 0.95 to 0.97 throughout; ie-tower at 0.5 / 1.0 / 2.5 / 4.0 kept 0.923 / 0.927 /
#: 0.940 / 0.949 and rejected 0.997 or more.
COVERAGE_RATIOS = {"pca": COVERAGE_RATIO, "learned-whitening": 2.5}


def coverage_ratio(codec_kind: str) -> float:
    """The coverage term's weight relative to the score's for a codec of ``codec_kind``."""
    return COVERAGE_RATIOS.get(codec_kind, COVERAGE_RATIO)


def fit_weights(values: np.ndarray, known: np.ndarray, ratio: float = COVERAGE_RATIO) -> dict[str, float]:
    """The weights of a ridge-penalised logistic regression of ``known`` on the evidence terms
    ``values`` (rows, :data:`TERMS`), in the terms' own units, so that the phone's evidence is
    their weighted sum, coverage at ``ratio`` times the score's; :data:`FALLBACK` without
    :data:`MIN_ROWS` rows of each kind, or when the fit weighs the score negatively."""
    if min(known.sum(), (~known).sum()) < MIN_ROWS:
        return _fallback(ratio)
    used = [TERMS.index(t) for t in FITTED]
    x = values[:, used]
    centre, scale = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    z = np.column_stack([np.ones(len(x)), (x - centre) / scale])
    beta = _logistic(z, known.astype(np.float64))
    if "score" in FITTED and beta[1 + FITTED.index("score")] <= 0:
        return _fallback(ratio)  # a higher score never means an unknown spot: a gallery this odd is not trusted
    weights = dict.fromkeys(TERMS, 0.0)
    for i, w in zip(used, beta[1:] / scale):
        weights[TERMS[i]] = round(float(w), 4)
    weights["coverage"] = round(ratio * weights["score"], 4)
    return weights


def _fallback(ratio: float) -> dict[str, float]:
    """:data:`FALLBACK`, its coverage scaled as ``ratio`` scales the fitted one."""
    return {**FALLBACK, "coverage": FALLBACK["coverage"] * ratio / COVERAGE_RATIO}


def _logistic(z: np.ndarray, y: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Newton's method for the ridge-penalised logistic regression (intercept unpenalised)."""
    beta = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], RIDGE)
    penalty[0] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ beta, -30, 30)))
        gradient = z.T @ (p - y) + penalty * beta
        hessian = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty) + 1e-9 * np.eye(len(beta))
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if np.abs(step).max() < 1e-8:
            break
    return beta
