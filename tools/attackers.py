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

from typing import Any, Callable

import numpy as np

from edge_client import wire
from edge_client.transforms import Transform
from lite_server.lookup import Lookup


def popularity(photo_spot: np.ndarray, n_spots: int) -> np.ndarray:
    """A spot's share of gallery photos: the server's prior of how often it is asked for."""
    counts = np.bincount(photo_spot, minlength=n_spots).astype(np.float64)
    return counts / counts.sum()


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
        n_spots = len(self.lookup.index.spots)
        out = np.zeros((len(bodies), n_spots))
        for i, body in enumerate(bodies):
            if "cells" in body:
                members = self.lookup.spots_in_cells(body["cells"])
                out[i, members] = self.prior_[members]
            else:
                ranked = self.lookup.nearest_spots(wire.decode(body["vector"]).reshape(1, -1), n_spots)[0]
                out[i, ranked] = np.linspace(1.0, 0.0, len(ranked), endpoint=False)
        return out


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


def summarize(ranks: np.ndarray) -> dict[str, float]:
    return {"top1": float(np.mean(ranks == 1)), "top5": float(np.mean(ranks <= 5)),
            "median_rank": float(np.median(ranks))}


AttackerFactory = Callable[[], SimulationAttacker]
