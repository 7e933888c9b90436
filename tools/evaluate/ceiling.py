"""The open set's non-private ceiling: how well the phone's kind of evidence *could* tell a photo of
a held-out landmark from a photo of a known spot, with every spot a candidate and the weights
learnt on the evaluation's own answers.

The phone decides from a handful of terms (``edge_client.privacy.evidence``) over the candidates
its privacy lets it see, with weights and an operating point the server fitted on its gallery.
This module drops each of those limits at once, to say how far the feature itself goes: each
term and a lead over the crowd (the best score less the mean of the next nine spots') computed
over *every* spot's published looks; each term alone with its threshold set on the correct
answers themselves; and a logistic regression of all of them, cross-validated by spot (no spot's
photos in both its fit and its test). A figure the phone misses by far that this ceiling also
misses is out of the feature's reach, not the protocol's.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from edge_client.privacy.evidence import MARGIN_CAP, look_spread
from edge_client.privacy.recognizer import subspace
from edge_client.vision.extractor import l2_normalize
from tools.evaluate.testbed import Env, codec_scores, published_looks

#: The share of correct answers kept at which the ceiling's rejections are read (the issue's floor).
KEPT = 0.93
#: The spots after the best whose mean score is the crowd the lead is measured over.
CROWD = 9
#: Folds of the cross-validated combination (grouped by spot).
FOLDS = 5


def open_set(env: Env, known: list[tuple[str, int]], unknown: list[tuple[str, int]], kept: float = KEPT
             ) -> dict[str, Any] | None:
    """The ceiling for ``known`` (spot, feature row) photos of ``env``'s indexed spots against
    ``unknown`` (spot, row) photos of spots it lacks: per term and combined, the AUROC and the
    share of unknown photos rejected where ``kept`` of the correct answers are kept (None
    without a codec or without both kinds)."""
    rows = [r for _, r in known] + [r for _, r in unknown]
    found = evidence_terms(env, env.features[rows])
    if found is None:
        return None
    best, values = found
    ids = np.array([s.id for s in env.index.spots])
    correct = ids[best[:len(known)]] == np.array([s for s, _ in known])
    pick = np.r_[correct, np.ones(len(unknown), bool)]
    labels = np.r_[np.ones(int(correct.sum())), np.zeros(len(unknown))]
    if len(set(labels.tolist())) < 2:
        return None
    groups = np.array([s for s, _ in known] + [s for s, _ in unknown])[pick]
    terms = {name: v[pick] for name, v in values.items()}
    out = {name: figures(v, labels, kept) for name, v in terms.items()}
    combined = _cross_validated(np.column_stack(list(terms.values())), labels, groups)
    return {"kept": kept, "n_correct": int(labels.sum()), "n_outside": len(unknown), "terms": out,
            "combined": figures(combined, labels, kept)}


def evidence_terms(env: Env, features: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """Each photo's evidence over every spot: its best spot (index into ``env``'s spots) and the
    terms ``score``, ``margin`` (capped as the phone caps it), ``lead`` (over the crowd of the next
    :data:`CROWD`), ``coverage`` and ``spread`` (None without a codec)."""
    published = published_looks(env)
    scores = codec_scores(env, features, published) if published is not None else None
    if published is None or scores is None:
        return None
    looks, starts = published
    ends = np.append(starts[1:], len(looks))
    order = np.argsort(-scores, axis=1)
    ranked = np.take_along_axis(scores, order, axis=1)
    best = order[:, 0]
    second = ranked[:, 1] if ranked.shape[1] > 1 else ranked[:, 0] - MARGIN_CAP
    crowd = ranked[:, 1:1 + CROWD].mean(axis=1) if ranked.shape[1] > 1 else second
    lookup = env.lookup
    span = subspace(lookup.coverage_basis if lookup.coverage_basis is not None else lookup.codec.basis_)
    spreads = np.array([look_spread(looks[starts[s]:ends[s]]) for s in range(len(starts))])
    return best, {"score": ranked[:, 0],
                  "margin": np.minimum(MARGIN_CAP, ranked[:, 0] - second), "lead": ranked[:, 0] - crowd,
                  "coverage": np.linalg.norm(l2_normalize(np.asarray(features, np.float32)) @ span.T, axis=1),
                  "spread": spreads[best]}


def figures(values: np.ndarray, labels: np.ndarray, kept: float) -> dict[str, float]:
    """AUROC of ``values`` (higher: known) and the unknown share below the correct answers' ``1 - kept`` quantile."""
    from sklearn.metrics import roc_auc_score

    threshold = np.quantile(values[labels == 1], 1.0 - kept)
    return {"auroc": round(float(roc_auc_score(labels, values)), 4),
            "rejected": round(float(np.mean(values[labels == 0] < threshold)), 4)}


def _cross_validated(x: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Out-of-fold probabilities of a logistic regression of ``labels`` on standardised ``x``,
    folds grouped by spot."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = np.zeros(len(labels))
    folds = GroupKFold(n_splits=min(FOLDS, len(set(groups.tolist()))))
    for fit, test in folds.split(x, labels, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        if len(set(labels[fit].tolist())) < 2:
            out[test] = 0.5
            continue
        out[test] = model.fit(x[fit], labels[fit]).predict_proba(x[test])[:, 1]
    return out
