"""A curious server's attacks on the queries it receives (research tools, not the product).

Every attacker scores every spot for every received query body; the
evaluation keeps the strongest. They see only what a server has: its own
gallery (features and spot labels), the transform's code and its public
parameters, never the phone's random draws or its photo.

- :class:`NaiveAttacker`: the server's ordinary recognizer run on the query
  (a vector's nearest spots; for cell queries, the most popular spot of the
  cells it was sent).
- :class:`SimulationAttacker`: the transform-aware server. It runs the
  transform itself on its own gallery photos, several draws each, and trains
  a k-NN and a linear (logistic) classifier from "what arrives" to "which
  spot", which approximates the Bayes posterior p(spot | query).
"""
from __future__ import annotations

import functools
from typing import Any, Iterator

import numpy as np

from edge_client.privacy import posterior
from edge_client.privacy.transforms import Transform
from edge_client.protocol import wire
from lite_server.search.lookup import Lookup
from tools.evaluate.intervals import mean_ci95


def popularity(photo_spot: np.ndarray, n_spots: int) -> np.ndarray:
    """A spot's share of gallery photos: the server's prior of how often it is asked for."""
    counts = np.bincount(photo_spot, minlength=n_spots).astype(np.float64)
    return counts / counts.sum()


def spot_scores(queries: np.ndarray, gallery: np.ndarray, photo_spot: np.ndarray, n_spots: int) -> np.ndarray:
    """Each spot's best cosine with each query: the server's recognizer, batched."""
    out = np.full((len(queries), n_spots), -np.inf, np.float32)
    for start in range(0, len(queries), 256):
        block = queries[start:start + 256] @ gallery.T
        np.maximum.at(out[start:start + 256].T, photo_spot, block.T)
    return out


def encode_bodies(bodies: list[dict[str, Any]], dim: int, n_cells: int) -> np.ndarray:
    """Bodies as attacker inputs: a vector query's vector, a cells query's one-hot cells."""
    width = n_cells if bodies and "cells" in bodies[0] else dim
    out = np.zeros((len(bodies), width), np.float32)
    for i, body in enumerate(bodies):
        if "cells" in body:
            out[i, np.asarray(body["cells"], dtype=np.int64)] = 1.0
        else:
            out[i] = wire.decode(body["vector"]).reshape(-1)
    return out


class NaiveAttacker:
    """The server's own recognizer, unaware of any transform."""

    def __init__(self, lookup: Lookup):
        self.lookup = lookup
        self.prior_ = popularity(lookup.index.photo_spot, len(lookup.index.spots))

    def scores(self, bodies: list[dict[str, Any]]) -> np.ndarray:
        if bodies and "cells" in bodies[0]:
            out = np.zeros((len(bodies), len(self.prior_)))
            for i, body in enumerate(bodies):
                members = self.lookup.spots_in_cells(body["cells"])
                out[i, members] = self.prior_[members]
            return out
        queries = np.stack([wire.decode(b["vector"]).reshape(-1) for b in bodies])
        return spot_scores(queries, np.asarray(self.lookup.index.features, np.float32),
                           self.lookup.index.photo_spot, len(self.prior_))


class SimulationAttacker:
    """Transform-aware: learns p(spot | received query) from simulated queries."""

    def __init__(self, draws: int = 2, neighbours: int = 10, seed: int = 12345):
        self.draws, self.neighbours, self.seed = draws, neighbours, seed

    def fit(self, transform: Transform, features: np.ndarray, labels: np.ndarray, n_spots: int,
            n_cells: int = 0) -> "SimulationAttacker":
        rng = np.random.default_rng(self.seed)
        bodies = [transform.transform(f, rng) for _ in range(self.draws) for f in features]
        self.n_spots_, self.dim_, self.n_cells_ = n_spots, features.shape[1], n_cells
        self.X_ = encode_bodies(bodies, self.dim_, n_cells)
        self.y_ = np.tile(labels, self.draws)
        self._fit_linear()
        return self

    def _fit_linear(self) -> None:
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        # PCA keeps the linear model fast on 1280-d inputs; cells are already small.
        steps = [PCA(n_components=min(128, self.X_.shape[1]), random_state=0)] if self.X_.shape[1] > 128 else []
        self.linear_ = make_pipeline(*steps, LogisticRegression(max_iter=300, C=1.0))
        self.linear_.fit(self.X_, self.y_)

    def scores(self, bodies: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Per attacker ("knn", "linear"), an [n_bodies, n_spots] score matrix."""
        X = encode_bodies(bodies, self.dim_, self.n_cells_)
        linear = np.zeros((len(X), self.n_spots_))
        linear[:, self.linear_.classes_] = self.linear_.predict_proba(X)
        return {"knn": self._knn(X), "linear": linear}

    def _knn(self, X: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(self.X_, axis=1) * np.linalg.norm(X, axis=1)[:, None]
        sims = (X @ self.X_.T) / np.maximum(norms, 1e-12)
        k = min(self.neighbours, sims.shape[1])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        out = np.zeros((len(X), self.n_spots_))
        rows = np.repeat(np.arange(len(X)), k)
        # Ties (identical simulated cell queries) share the vote, so cells get a frequency posterior.
        np.add.at(out, (rows, self.y_[top].reshape(-1)), np.take_along_axis(sims, top, axis=1).reshape(-1))
        return out


def rank_of_truth(scores: np.ndarray, truth: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """1-based rank of the true spot in each score row; ties broken at random (never in the attacker's favour by luck of order)."""
    rng = rng or np.random.default_rng(0)
    jitter = rng.random(scores.shape) * 1e-9
    noisy = scores + jitter
    true_scores = noisy[np.arange(len(truth)), truth]
    return (noisy > true_scores[:, None]).sum(axis=1) + 1


def summarize(ranks: np.ndarray, clusters: np.ndarray | None = None) -> dict[str, Any]:
    """top-1, top-5 and median rank of the truth; with ``clusters`` (each unit's spot) the
    top-1's and top-5's spot-clustered 95% intervals too."""
    out: dict[str, Any] = {"top1": float(np.mean(ranks == 1)), "top5": float(np.mean(ranks <= 5)),
                           "median_rank": float(np.median(ranks))}
    if clusters is not None:
        out["top1_ci95"] = mean_ci95(ranks == 1, clusters)
        out["top5_ci95"] = mean_ci95(ranks <= 5, clusters)
    return out




class CellsBayesAttacker:
    """The exact posterior for the cells transform: p(spot | cells sent).

    p(msg | s) = Σ_R L(s, R) · P(decoy groups complete msg | R), where R
    ranges over the subsets of the message that could be the real group (any
    size the phone's rule can name), L(s, R) is how often the phone's own
    rule names R for a photo of s (simulated on the server's gallery with
    prototypes rebuilt without the photos being simulated, k-fold), and the
    decoy-group distribution comes from running the public decoy procedure
    many times. The posterior is that times the prior.

    For a set of linked messages (one device, one spot) :meth:`linked_scores`
    multiplies their likelihoods; ``cache_aware`` also uses that a phone with
    an answer cache only asks when its best cell was in no earlier answer,
    and ``dedupe`` counts identical messages once (stable decoys make a
    repeat carry no new draw).
    """

    #: The number of decoy groups as a distribution {d: probability}, for a phone with a privacy floor
    #: (set after :meth:`fit`); None = always ``d_``, the transform's strength.
    decoy_groups_: dict[int, float] | None = None

    def __init__(self, folds: int = 5, decoy_draws: int = 20000, alpha: float = 0.2, seed: int = 7):
        self.folds, self.decoy_draws, self.alpha, self.seed = folds, decoy_draws, alpha, seed

    def fit(self, transform: Any, lookup: Lookup) -> "CellsBayesAttacker":
        index, n_spots = lookup.index, len(lookup.index.spots)
        self.d_ = int(round(transform.strength_))
        self.sizes_ = range(min(transform.min_cells, transform.k_), transform.k_ + 1)
        self.prior_ = popularity(index.photo_spot, n_spots)
        counts: dict[tuple[int, ...], np.ndarray] = {}
        for row, (best, *rest) in self.simulate(transform, lookup):
            # Keyed best cell first, then the rest sorted: a cache hit turns on the best cell.
            counts.setdefault((best, *sorted(rest)), np.zeros(n_spots))[index.photo_spot[row]] += 1
        totals = np.bincount(index.photo_spot, minlength=n_spots).astype(float)
        self.groups_ = counts
        self.floor_ = self.alpha / max(1, len(counts))
        self.totals_ = totals + self.alpha
        rng = np.random.default_rng(self.seed)
        decoys: dict[tuple[int, ...], float] = {}
        for _ in range(self.decoy_draws):
            group = tuple(sorted(transform.choose(transform.decoy(rng))))
            decoys[group] = decoys.get(group, 0.0) + 1.0
        self.decoys_ = {g: n / self.decoy_draws for g, n in decoys.items()}
        return self

    def simulate(self, transform: Any, lookup: Lookup) -> Iterator[tuple[int, tuple[int, ...]]]:
        """(gallery row, the real cells the phone's rule names for that photo, best first) for
        every gallery photo, with prototypes rebuilt k-fold: each fold's photos are simulated on
        prototypes of every spot fitted without them."""
        from lite_server.index import cells as public

        index, n_spots = lookup.index, len(lookup.index.spots)
        features = np.asarray(index.features, np.float32)
        fold = np.arange(len(features)) % self.folds
        for f in range(self.folds):
            train = fold != f
            groups = public.spot_groups(index.photo_spot[train], n_spots)
            # The server's own k-means starts (it knows the configuration): the folds' prototypes
            # differ from the published ones only by the photos held out.
            protos, owner = public.prototypes(lookup.project(features[train]), groups,
                                              lookup.config.prototypes_per_spot, lookup.config.structure_seed)
            simulated = _refit(transform, lookup, protos, owner)
            for row in np.flatnonzero(~train):
                yield int(row), simulated.real_cells(features[row])

    def _likelihood(self, group: tuple[int, ...], cached: frozenset[int]) -> np.ndarray:
        """p(the phone names ``group`` | spot), summed over which of its cells was the best one;
        a best cell in ``cached`` is ruled out (the phone would have answered from its cache)."""
        total = np.zeros_like(self.totals_)
        for best in group:
            if best in cached:
                continue
            found = self.groups_.get((best, *(c for c in group if c != best)))
            total += (found if found is not None else 0.0) + self.floor_ / len(group)
        return total / self.totals_

    def scores(self, bodies: list[dict[str, Any]]) -> np.ndarray:
        return np.array([self.prior_ * self.message_likelihood(tuple(b["cells"])) for b in bodies])

    def linked_scores(self, linked: list[list[dict[str, Any]]], cache_aware: bool = False,
                      dedupe: bool = False) -> np.ndarray:
        """One score row per set of linked bodies (in the order they were sent)."""
        out = []
        for bodies in linked:
            log_post = np.log(self.prior_)
            seen: set[int] = set()
            messages = [tuple(b["cells"]) for b in bodies]
            for i, message in enumerate(messages):
                if dedupe and message in messages[:i]:
                    continue
                exclude = frozenset(seen) if cache_aware else frozenset()
                likelihood = self.message_likelihood(message, exclude)
                log_post = log_post + np.log(np.maximum(likelihood, 1e-300))
                seen |= set(message)
            out.append(log_post)
        return np.array(out)

    @functools.lru_cache(maxsize=65536)
    def message_likelihood(self, message: tuple[int, ...], cached: frozenset[int] = frozenset()) -> np.ndarray:
        """p(message | spot) for every spot; real groups whose best cell is in ``cached`` are
        ruled out, as a phone with an answer cache would have answered them itself. The sum over
        real groups and decoy completions is the phone's own (:mod:`edge_client.privacy.posterior`)."""
        groups = self.decoy_groups_ if self.decoy_groups_ is not None else self.d_
        return posterior.message_likelihood(message, lambda group: self._likelihood(group, cached), self.decoys_,
                                            self.sizes_, groups, len(self.prior_))


def bayes_attackers(transform: Any, lookup: Lookup, **settings: Any) -> dict[str, CellsBayesAttacker]:
    """The cells transform's Bayes attackers by name, fitted: ``bayes`` (prototypes rebuilt
    k-fold) and ``bayes_loo`` (leave-one-out on the published structure); ``settings`` go to both."""
    return {"bayes": CellsBayesAttacker(**settings).fit(transform, lookup),
            "bayes_loo": LeaveOneOutBayesAttacker(**settings).fit(transform, lookup)}


def _refit(transform: Any, lookup: Lookup, protos: np.ndarray, owner: np.ndarray) -> Any:
    """A copy of the phone's cells transform fitted on other prototypes (same cells, same codec)."""
    import copy

    from edge_client.privacy.recognizer import projector

    codes = wire.decode(lookup.encode(protos)).reshape(len(protos), -1)
    project = projector(lookup.codec.basis_ if lookup.codec else None)[0]
    return copy.copy(transform).fit_arrays(project, codes, owner, lookup.spot_cell, lookup.n_cells, lookup.popularity)


class LeaveOneOutBayesAttacker(CellsBayesAttacker):
    """:class:`CellsBayesAttacker` with every gallery photo simulated leave-one-out: on the
    *published* structure, only its own spot's prototypes refitted without it.

    A query photo meets exactly that: every prototype the phone holds is the
    published one, none fitted on it. The k-fold variant also rebuilds every
    other spot's prototypes without a fifth of the photos, which moves cells
    the query's phone never sees move. Refitting is one small k-means a photo
    (the server's own starts: ``prototypes_per_spot`` and ``structure_seed``),
    the rest of the phone's fitted arrays reused as they are.
    """

    def simulate(self, transform: Any, lookup: Lookup) -> Iterator[tuple[int, tuple[int, ...]]]:
        from lite_server.index import cells as public

        index, n_spots = lookup.index, len(lookup.index.spots)
        # The photos each spot's published prototypes were fitted on (the derivation's sample).
        fitted = public.sample_groups(public.spot_groups(index.photo_spot, n_spots))
        published = np.bincount(transform.prototype_spot_, minlength=n_spots)
        for spot, rows in enumerate(public.spot_groups(index.photo_spot, n_spots)):
            features = np.asarray(index.features[rows], np.float32)
            sample = np.isin(rows, fitted[spot])
            vectors = lookup.project(features[sample])
            at = np.cumsum(sample) - 1  # each sampled photo's row in ``vectors``
            for i, row in enumerate(rows):
                if not sample[i]:  # not among the photos the published prototypes saw
                    yield int(row), transform.real_cells(features[i])
                    continue
                others = np.delete(np.arange(len(vectors)), at[i])
                protos, _ = public.prototypes(vectors, [others], lookup.config.prototypes_per_spot,
                                              lookup.config.structure_seed)
                # As many as the document published of the spot (its budget may keep the heaviest few).
                protos = protos[:published[spot]]
                yield int(row), with_spot(transform, lookup, spot, protos).real_cells(features[i])


def with_spot(transform: Any, lookup: Lookup, spot: int, protos: np.ndarray) -> Any:
    """A copy of the phone's fitted cells transform whose prototypes of ``spot`` are ``protos``
    (codec-space vectors, sent through the wire's codes as published ones are); every other
    fitted array is shared. Only what naming real cells reads is replaced: the decoys' draw
    stays the published one."""
    import copy

    codes = wire.decode(lookup.encode(protos)).reshape(len(protos), -1) if len(protos) else \
        np.zeros((0, transform.prototypes_.shape[1]), np.float32)
    keep = transform.prototype_spot_ != spot
    prototypes = np.concatenate([transform.prototypes_[keep], codes.astype(np.float32)])
    owner = np.concatenate([transform.prototype_spot_[keep], np.full(len(codes), spot, np.int64)])
    cell_of = np.asarray(lookup.spot_cell, np.int64)[owner]
    order = np.argsort(cell_of, kind="stable")
    out = copy.copy(transform)
    out.by_cell_ = prototypes[order]
    out.cell_starts_ = np.searchsorted(cell_of[order], np.arange(transform.n_cells_))
    return out


class ExplainAwayAttacker:
    """For mixing: remove the public-pool components a query is made of, then recognise the rest.

    Greedy orthogonal matching pursuit picks the ``atoms`` pool vectors that
    explain most of the query, a least-squares fit removes them, and the
    server's recognizer runs on the residual.
    """

    def __init__(self, pool: np.ndarray, lookup: Lookup, atoms: int = 3):
        self.pool, self.lookup, self.atoms = pool, lookup, atoms

    def scores(self, bodies: list[dict[str, Any]]) -> np.ndarray:
        residuals = np.stack([self._residual(wire.decode(b["vector"]).reshape(-1)) for b in bodies])
        index = self.lookup.index
        return spot_scores(residuals, np.asarray(index.features, np.float32), index.photo_spot, len(index.spots))

    def _residual(self, query: np.ndarray) -> np.ndarray:
        chosen: list[int] = []
        residual = query
        for _ in range(self.atoms):
            chosen.append(int(np.argmax(np.abs(self.pool @ residual))))
            atoms = self.pool[chosen].T
            coef, *_ = np.linalg.lstsq(atoms, query, rcond=None)
            residual = query - atoms @ coef
        return residual
