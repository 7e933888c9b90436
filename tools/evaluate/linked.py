"""Linked photos: what a server learns from all the requests one phone sends about one spot.

A tourist takes several photos of one landmark, and a curious server links
the requests that come from one address a minute apart. For every query
photo, a fresh phone (its own answer cache and device secret) photographs
its spot ``m`` times: that photo and ``m - 1`` other query photos of the same
spot (reused in turn where the spot has fewer). Every photo goes through the
real client with every phone-side defence it has on (answer cache, stable
decoys); whatever it actually sends is what the server gets. Dummy requests
are left out, so the attacker knows which requests are real: the figures are
a bound on what it can do with dummies riding along.

A second design, :func:`distinct_sets` (``linked_distinct`` in the metrics),
is the one a sceptic asks for: per spot up to ``phones`` phones, each taking
``m`` *distinct* query photos of it (a spot with fewer than ``m`` has no phone
for that ``m``, and is counted), every phone weighing the same. Reusing
photos, and weighting every query photo alike, lets popular spots with many
photos dominate the figure; this does neither.

The attacker is the exact Bayes posterior of the cells transform extended to
a set of messages (the product of likelihoods), in three variants: plain,
counting identical messages once, and also knowing that a phone with a cache
only asks when its best cell was in no earlier answer; plus a
count of how many messages name each spot's cell (popularity breaking ties),
and count-then-Bayes: the same count, ties broken by the Bayes posterior
(identical messages once; or the cache-aware product; or the mean of the
messages' own posteriors). Every Bayes variant runs with the k-fold and the
leave-one-out posterior (``*_loo``, :class:`tools.evaluate.attackers.LeaveOneOutBayesAttacker`).
Each figure is its strongest attacker's (top-1 and top-5 may be different ones).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Union

import numpy as np

from edge_client.privacy.cache import AnswerCache
from edge_client.privacy.transforms import Transform
from lite_server.search.publication import document
from tools.evaluate import attackers as atk
from tools.evaluate import intervals as iv
from tools.evaluate import receipts
from tools.evaluate.testbed import Env

log = logging.getLogger(__name__)
LINKS = (1, 2, 3, 5)
PHONES = 5  # linked_distinct: phones per spot at most
#: One Bayes attacker, or several by name ("bayes", "bayes_loo": their posteriors' variants are all tried).
Bayes = Union[atk.CellsBayesAttacker, Mapping[str, atk.CellsBayesAttacker]]


def photo_sets(env: Env, m: int) -> list[np.ndarray]:
    """Per query photo: it and ``m - 1`` other query photos of its spot, in turn."""
    by_spot: dict[int, list[int]] = {}
    for row, spot in zip(env.queries, env.truth):
        by_spot.setdefault(int(spot), []).append(int(row))
    sets = []
    for row, spot in zip(env.queries, env.truth):
        rows = by_spot[int(spot)]
        at = rows.index(int(row))
        others = rows[at + 1:] + rows[:at] or [int(row)]  # the next ones first, wrapping round
        sets.append(np.array([row] + [others[i % len(others)] for i in range(m - 1)]))
    return sets


def distinct_sets(env: Env, m: int, phones: int = PHONES) -> tuple[list[np.ndarray], np.ndarray, int]:
    """(per phone its ``m`` distinct query photos, each phone's spot (a row of ``index.spots``),
    spots without a phone): a spot with ``n >= m`` query photos gets ``min(phones, n)`` phones,
    phone ``j`` taking its photos ``j, j + 1, ..., j + m - 1`` (wrapping round), so no phone
    photographs one photo twice and phones of a spot start from different photos."""
    by_spot: dict[int, list[int]] = {}
    for row, spot in zip(env.queries, env.truth):
        by_spot.setdefault(int(spot), []).append(int(row))
    sets, spots, without = [], [], 0
    for spot, rows in sorted(by_spot.items()):
        if len(rows) < m:
            without += 1
            continue
        for j in range(min(phones, len(rows))):
            sets.append(np.array([rows[(j + i) % len(rows)] for i in range(m)]))
            spots.append(spot)
    return sets, np.array(spots, dtype=np.int64), without


def run_phones(env: Env, transform: Transform, sets: list[np.ndarray], defended: bool,
               seed: int) -> tuple[list[list[dict[str, Any]]], np.ndarray, float]:
    """(bodies each phone sent, per set how many of its photos the user got right (closed
    set), requests per photo)."""
    sent: list[list[dict[str, Any]]] = []
    right: list[int] = []
    total = 0
    for i, rows in enumerate(sets):
        # A phone without defences keeps no answers; both start with the server's /v1/info.
        cache = AnswerCache(None, max_entries=32 if defended else 0)
        cache.store_info(env.info)
        with env.client(transform, seed * 1_000_003 + i, cache, stable_decoys=defended) as client:
            bodies, mine = [], 0
            for row in rows:
                body, result = client.ask(env.features[row])
                mine += result.best == env.data.photos[row][0]  # closed set: the best candidate
                total += 1
                if body is not None:
                    bodies.append(body)
        sent.append(bodies)
        right.append(mine)
    return sent, np.array(right), sum(map(len, sent)) / total


def attack_sets(bayes: Bayes, sent: list[list[dict[str, Any]]], truth: np.ndarray,
                spot_cell: np.ndarray, base_hits: np.ndarray | None = None) -> dict[str, Any]:
    """Every linked attacker's summary, and the strongest one's figures, with spot-clustered
    intervals (top-1 and median rank the strongest at top-1's, ``attacker``; top-5 the strongest
    at top-5's, ``top5_attacker``); with ``base_hits`` (the baseline's hits on the sets' first photos) the top-1
    relative to the baseline too. ``bayes``: one Bayes attacker, or several by name
    (:func:`tools.evaluate.attackers.bayes_attackers`), each lending its posterior to every
    variant (``bayes_loo``'s are named ``product_loo``, ``count_bayes_loo``, ...)."""
    named = bayes if isinstance(bayes, Mapping) else {"bayes": bayes}
    results = {"count": count_scores(sent, spot_cell, next(iter(named.values())).prior_)}
    for name, attacker in named.items():
        suffix = name.removeprefix("bayes")
        dedupe = attacker.linked_scores(sent, dedupe=True)
        cache_aware = attacker.linked_scores(sent, cache_aware=True, dedupe=True)
        results.update({
            f"product{suffix}": attacker.linked_scores(sent),
            f"product_dedupe{suffix}": dedupe,
            f"product_cache_aware{suffix}": cache_aware,
            f"count_bayes{suffix}": count_bayes_scores(sent, spot_cell, dedupe),
            f"count_bayes_cache_aware{suffix}": count_bayes_scores(sent, spot_cell, cache_aware),
            f"count_mean_posterior{suffix}": count_bayes_scores(sent, spot_cell, mean_posterior(attacker, sent)),
        })
    ranks = {name: atk.rank_of_truth(scores, truth) for name, scores in results.items()}
    summaries = {name: atk.summarize(r, truth) for name, r in ranks.items()}
    strongest = max(summaries, key=lambda a: (summaries[a]["top1"], summaries[a]["top5"]))
    # Each figure by its own strongest attacker: the best at top-1 need not be the best at top-5.
    at_five = max(summaries, key=lambda a: (summaries[a]["top5"], summaries[a]["top1"]))
    out = {**summaries[strongest], "attacker": strongest, "attackers": summaries,
           "top5": summaries[at_five]["top5"], "top5_attacker": at_five}
    if "top5_ci95" in summaries[at_five]:
        out["top5_ci95"] = summaries[at_five]["top5_ci95"]
    if base_hits is not None:
        out["top1_x_baseline_ci95"] = iv.ratio_ci95(ranks[strongest] == 1, base_hits, truth)
    return out


def mean_posterior(bayes: atk.CellsBayesAttacker, sent: list[list[dict[str, Any]]]) -> np.ndarray:
    """[phones, spots]: the mean over a phone's messages of each one's own posterior. Less sure
    than the product, so one message the model explains badly cannot sink the true spot."""
    out = np.zeros((len(sent), len(bayes.prior_)))
    for i, bodies in enumerate(sent):
        for body in bodies:
            posterior = bayes.prior_ * bayes.message_likelihood(tuple(body["cells"]))
            out[i] += posterior / max(float(posterior.sum()), 1e-300) / len(bodies)
    return out


def naming_counts(sent: list[list[dict[str, Any]]], spot_cell: np.ndarray) -> np.ndarray:
    """[phones, spots]: how many of a phone's messages name each spot (its cell is in the message)."""
    out = np.zeros((len(sent), len(spot_cell)))
    for i, bodies in enumerate(sent):
        for body in bodies:
            out[i] += np.isin(spot_cell, body["cells"])
    return out


def count_scores(sent: list[list[dict[str, Any]]], spot_cell: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """How many of a phone's messages name each spot's cell; popularity breaks ties."""
    return naming_counts(sent, spot_cell) + prior / (prior.max() * 2)


def count_bayes_scores(sent: list[list[dict[str, Any]]], spot_cell: np.ndarray, posterior: np.ndarray) -> np.ndarray:
    """Count-then-Bayes: spots ranked by how many messages named them, ties broken by
    ``posterior`` (any monotone score, e.g. a log posterior): its rank within the row,
    scaled below 1, is added to the whole-number count."""
    from scipy.stats import rankdata

    # Equal posteriors share their rank: the evaluation's jitter, not spot order, breaks those ties.
    order = rankdata(posterior, axis=1) if len(posterior) else posterior
    return naming_counts(sent, spot_cell) + order / (posterior.shape[1] + 1)


def distinct(env: Env, transform: Transform, bayes: Bayes, m: int, phones: int = PHONES,
             seed: int = 0, base_hits: np.ndarray | None = None) -> dict[str, Any]:
    """``linked_distinct`` figures for ``m``: every phone of :func:`distinct_sets` through the
    real client with its defences on, attacked; means over phones, intervals over their spots.
    With ``base_hits`` (per query) also ``baseline_top1_phones``: the non-private server's top-1
    on the same photos, weighted the same way (per phone, not per photo)."""
    sets, spots, without = distinct_sets(env, m, phones)
    counts = {"phones": len(sets), "spots_with_phones": int(len(set(spots.tolist()))), "spots_without_phone": without}
    if not sets:
        return counts
    sent, user, per_photo = run_phones(env, transform, sets, True, seed)
    figures = attack_sets(bayes, sent, spots, env.lookup.spot_cell)
    if base_hits is not None:
        hit = dict(zip(env.queries.tolist(), np.asarray(base_hits, np.float64).tolist()))
        per_phone = np.array([np.mean([hit[int(r)] for r in rows]) for rows in sets])
        counts["baseline_top1_phones"] = float(per_phone.mean())
    return {**figures, **counts, "user_top1": float(np.mean(user / m)),
            "user_top1_ci95": iv.mean_ci95(user / m, spots), "requests_per_photo": per_photo}


def evaluate(env: Env, transform: Transform, seed: int = 0, links: tuple[int, ...] = LINKS,
             bayes: Bayes | None = None, base_hits: np.ndarray | None = None,
             phones: int = PHONES) -> dict[str, Any]:
    """``{"defended": {m: figures}, "undefended": {m: figures}, "distinct": {m: figures}}`` for
    a cells ``transform`` (``distinct``: :func:`distinct`, ``phones`` per spot at most);
    ``base_hits``: the baseline's per-query hits, for top-1 relative to it with an interval."""
    with env.client(transform, seed):  # the phones' decoy floors (their ClientConfig) set on the transform
        pass
    transform.fit(document(env.lookup))  # as every phone does; the attacker knows the same parameters
    if bayes is None:
        bayes = atk.bayes_attackers(transform, env.lookup)
        # Against a privacy floor the number of decoy groups varies: the attackers learn how often each
        # occurs as the single-query one does, so a floor is never judged by a model that ignores it.
        assumed = receipts.decoy_group_counts(env, transform, seed)
        for attacker in bayes.values():
            attacker.decoy_groups_ = assumed
    out: dict[str, Any] = {"defended": {}, "undefended": {}, "distinct": {}}
    for m in links:
        out["distinct"][str(m)] = distinct(env, transform, bayes, m, phones, seed, base_hits)
        log.info("linked distinct m=%d: %s", m, {k: v for k, v in out["distinct"][str(m)].items() if k != "attackers"})
        sets = photo_sets(env, m)
        for mode in ("defended", "undefended"):
            sent, user, per_photo = run_phones(env, transform, sets, mode == "defended", seed)
            figures = attack_sets(bayes, sent, env.truth, env.lookup.spot_cell, base_hits)
            # Every set has m photos: the share over photos, and its interval over sets (of spots).
            out[mode][str(m)] = {**figures, "user_top1": int(user.sum()) / (m * len(sets)),
                                 "user_top1_ci95": iv.mean_ci95(user / m, env.truth), "requests_per_photo": per_photo}
            log.info("linked m=%d %s: %s", m, mode, {k: v for k, v in out[mode][str(m)].items() if k != "attackers"})
    return out
