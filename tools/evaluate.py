"""Measure privacy and utility of the transforms on a real dataset.

    python -m tools.evaluate privacy --dataset DIR --out OUT [--transform NAME --strength S --k K]
                                     [--sweep] [--server URL] [--seed N]

Split: per spot, about 20% of its photos (at least one, chosen by a hash of
the file name) are queries and never in the gallery; spots with fewer than 5
photos are left out and counted. The gallery is indexed (features cached per
dataset and model) and every query goes through the real client code
(transform, request, JSON, rerank) against the real server code: in-process
through a WSGI adapter by default, over HTTP with ``--server``.

Writes OUT/metrics.json, OUT/report.md and OUT/curves.png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.client import Client
from edge_client.config import ClientConfig
from edge_client.extractor import Extractor
from edge_client.transforms import DEFAULT_TRANSFORM, Transform, make_transform
from lite_server.app import create_app
from lite_server.config import ServerConfig, load_config
from lite_server.index import BadIndexError, Index
from lite_server.lookup import Lookup
from tools import attackers as atk
from tools import dataset as ds
from tools.inprocess import mount

log = logging.getLogger(__name__)

#: Strengths swept per family (the default setting is always evaluated too).
SWEEPS: dict[str, list[tuple[float, int]]] = {
    "noise": [(1.0, 40), (2.0, 40), (4.0, 48), (6.0, 48)],
    "mix": [(0.4, 40), (0.6, 40), (0.8, 48)],
    "cells": [(0.0, 2), (1.0, 2), (1.0, 3), (2.0, 2), (3.0, 2)],
}
#: EnfPire's published point, as fractions of its non-private accuracy (99.8%).
PAPER = {"user": 0.869 / 0.998, "server": 0.414 / 0.998}


@dataclass
class Env:
    """Everything one evaluation run shares: data, split, features, the served index."""

    data: ds.Dataset
    gallery: np.ndarray
    queries: np.ndarray
    left_out: int
    features: np.ndarray
    extractor: Extractor
    index: Index
    lookup: Lookup
    server_url: str | None = None

    @property
    def truth(self) -> np.ndarray:
        """Each query's spot as a row of ``index.spots``."""
        rows = {s.id: i for i, s in enumerate(self.index.spots)}
        return np.array([rows[self.data.photos[q][0]] for q in self.queries])

    def client(self, transform: Transform, seed: int) -> Client:
        if self.server_url:
            return Client(ClientConfig(server=self.server_url, seed=seed), self.extractor, transform)
        client = Client(ClientConfig(seed=seed), self.extractor, transform)
        url = mount(client.session, self.app)
        client.config = ClientConfig(server=url, seed=seed)
        return client

    @property
    def app(self) -> Any:
        if not hasattr(self, "_app"):
            self._app = create_app(lookup=self.lookup)
        return self._app


def prepare(dataset: Path, server_url: str | None = None, tune: bool = False, cache: Path = ds.CACHE,
            config: ServerConfig | None = None) -> Env:
    """Load, split, extract (cached) and index. ``tune`` evaluates on the gallery
    alone, split again, so settings are chosen without ever seeing a query."""
    data = ds.load_dataset(dataset)
    gallery, queries, left_out = ds.split(data)
    if tune:
        gallery, queries, _ = ds.split(data, rows=gallery, min_photos=1)
    extractor = Extractor(ClientConfig().model_path())
    features = ds.features(data, extractor, cache)
    key = hashlib.sha256(f"{dataset.resolve()}|{extractor.sha256}|{len(gallery)}".encode()).hexdigest()[:16]
    index_dir = cache / f"eval-index-{key}"
    try:
        index = Index.load(index_dir)
    except BadIndexError:
        index = ds.build_from_features(data, gallery, features, extractor, index_dir)
    lookup = Lookup(index, config or load_config(ServerConfig))
    return Env(data, gallery, queries, left_out, features, extractor, index, lookup, server_url)


def run_setting(env: Env, name: str, strength: float | None, k: int | None, seed: int = 0) -> dict[str, Any]:
    """One transform setting over all queries: the phone's and the server's accuracy, and bytes."""
    started = time.monotonic()
    transform = make_transform(name, strength, k)
    truth_ids = [env.data.photos[q][0] for q in env.queries]
    bodies, right, recalled, sizes, counts = [], 0, 0, [], []
    with env.client(transform, seed) as client:
        for row, spot in zip(env.queries, truth_ids):
            body, result = client.ask(env.features[row])
            bodies.append(body)
            right += result.spot_id == spot
            recalled += any(c.id == spot for c in result.candidates)
            sizes.append(result.bytes_sent + result.bytes_received)
            counts.append(len(result.candidates))
    attacks = attack(env, transform, bodies)
    n = len(env.queries)
    out = {"transform": transform.name, "strength": transform.strength_, "k": transform.k_,
           "user_top1": right / n, "candidate_recall": recalled / n, "mean_candidates": float(np.mean(counts)),
           "bytes_per_query": float(np.mean(sizes)), "bytes_max": int(np.max(sizes)), **attacks,
           "seconds": round(time.monotonic() - started, 1)}
    log.info("%s", out)
    return out


def attack(env: Env, transform: Transform, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """Naive and transform-aware attackers; the aware figures are the strongest attacker's."""
    truth = env.truth
    naive = atk.summarize(atk.rank_of_truth(atk.NaiveAttacker(env.lookup).scores(bodies), truth))
    index = env.index
    simulated = atk.SimulationAttacker().fit(transform, np.asarray(index.features, np.float32),
                                             index.photo_spot, len(index.spots), env.lookup.n_cells)
    results = {"naive": naive, **{name: atk.summarize(atk.rank_of_truth(s, truth))
                                  for name, s in simulated.scores(bodies).items()}}
    if transform.name == "mix":
        scores = atk.ExplainAwayAttacker(transform.pool_, env.lookup).scores(bodies)
        results["explain_away"] = atk.summarize(atk.rank_of_truth(scores, truth))
    if transform.name == "cells":
        bayes = atk.CellsBayesAttacker().fit(transform, env.lookup)
        results["bayes"] = atk.summarize(atk.rank_of_truth(bayes.scores(bodies), truth))
    strongest = max(results, key=lambda a: (results[a]["top1"], results[a]["top5"]))
    return {"server_top1_naive": naive["top1"], "server_top1_aware": results[strongest]["top1"],
            "server_top5_aware": results[strongest]["top5"],
            "server_median_rank_aware": results[strongest]["median_rank"],
            "strongest_attacker": strongest, "attackers": results}


def baseline(env: Env) -> float:
    """The non-private server: its own top-1 on the raw feature."""
    bodies = [make_transform("none").transform(env.features[q], np.random.default_rng(0)) for q in env.queries]
    scores = atk.NaiveAttacker(env.lookup).scores(bodies)
    return atk.summarize(atk.rank_of_truth(scores, env.truth))["top1"]


def privacy(args: argparse.Namespace) -> dict[str, Any]:
    env = prepare(args.dataset, args.server, args.tune)
    base = baseline(env)
    metrics: dict[str, Any] = {
        "dataset": str(args.dataset), "n_spots": len(env.index.spots), "n_queries": int(len(env.queries)),
        "n_gallery": int(len(env.gallery)), "spots_left_out": env.left_out, "baseline_top1": base,
        "seed": args.seed, "split": "tuning (gallery only)" if args.tune else "queries",
        "default": run_setting(env, args.transform or DEFAULT_TRANSFORM, args.strength, args.k, args.seed),
    }
    if args.sweep:
        metrics["sweep"] = [run_setting(env, name, s, k, args.seed) for name, values in SWEEPS.items()
                            for s, k in values]
    return metrics


def write_outputs(metrics: dict[str, Any], out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "report.md").write_text(report(metrics, command))
    plot(metrics, out / "curves.png")


def _row(run: dict[str, Any], base: float) -> str:
    return (f"| {run['transform']} | {run['strength']:g} | {run['k']} | {run['user_top1']:.3f} "
            f"({run['user_top1'] / base:.2f}x) | {run['candidate_recall']:.3f} | {run['mean_candidates']:.0f} | "
            f"{run['server_top1_naive']:.3f} | {run['server_top1_aware']:.3f} ({run['server_top1_aware'] / base:.2f}x) | "
            f"{run['server_top5_aware']:.3f} | {run['server_median_rank_aware']:.0f} | "
            f"{run['strongest_attacker']} | {run['bytes_per_query'] / 1024:.1f} |")


def report(metrics: dict[str, Any], command: str) -> str:
    base = metrics["baseline_top1"]
    head = ("| transform | strength | k | user top-1 | recall | candidates | server naive | server aware | "
            "aware top-5 | median rank | strongest | KiB/query |\n|" + "---|" * 12)
    runs = [metrics["default"]] + metrics.get("sweep", [])
    return "\n".join([
        "# Privacy evaluation", "", f"Command: `{command}`", "",
        f"Dataset {metrics['dataset']}: {metrics['n_spots']} spots, {metrics['n_gallery']} gallery photos, "
        f"{metrics['n_queries']} queries ({metrics['spots_left_out']} spots with < 5 photos left out).",
        f"Non-private baseline (server top-1 on the raw feature): {base:.3f}.", "",
        "Target: user >= 0.95x baseline, transform-aware server <= 0.25x baseline, <= 64 KiB a query.", "",
        "First row: the default setting.", "", head, *(_row(r, base) for r in runs), ""])


def plot(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = metrics["baseline_top1"]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    runs = metrics.get("sweep", []) or [metrics["default"]]
    for family in sorted({r["transform"] for r in runs}):
        points = sorted((r["server_top1_aware"] / base, r["user_top1"] / base) for r in runs if r["transform"] == family)
        ax.plot(*zip(*points), marker="o", label=family)
    d = metrics["default"]
    ax.scatter([d["server_top1_aware"] / base], [d["user_top1"] / base], marker="*", s=250, c="gold",
               edgecolors="k", zorder=5, label=f"default ({d['transform']})")
    ax.scatter([PAPER["server"]], [PAPER["user"]], marker="X", s=120, c="red", zorder=5, label="EnfPire paper")
    ax.axvline(0.25, ls="--", c="grey", lw=0.8)
    ax.axhline(0.95, ls="--", c="grey", lw=0.8)
    ax.set_xlabel("transform-aware server top-1 / baseline")
    ax.set_ylabel("user top-1 / baseline")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Utility against privacy (lower right is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("privacy", help="user accuracy against what the server can infer")
    p.add_argument("--dataset", type=Path, default=ds.DEFAULT_DATASET)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--transform", default="")
    p.add_argument("--strength", type=float)
    p.add_argument("--k", type=int)
    p.add_argument("--sweep", action="store_true", help="also sweep every family's strength")
    p.add_argument("--server", help="run the queries over HTTP against this live server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tune", action="store_true", help="gallery-only split: for choosing settings")
    p.add_argument("-v", "--verbose", action="store_true")
    from tools import history

    history.add_parser(sub, ds.DEFAULT_DATASET)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.command == "dummies":
        return history.main(args, "python -m tools.evaluate " + " ".join(argv or sys.argv[1:]))
    from threadpoolctl import threadpool_limits

    # Thousands of small products: BLAS threads only fight each other (about 5x slower here).
    with threadpool_limits(limits=1):
        metrics = privacy(args)
    write_outputs(metrics, args.out, "python -m tools.evaluate " + " ".join(argv or sys.argv[1:]))
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
