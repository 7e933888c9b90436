"""Measure privacy and utility of the transforms on a real dataset.

    python -m tools.evaluate privacy --dataset DIR --out OUT [--transform NAME --strength S --k K]
                                     [--sweep] [--server URL] [--seed N] [--links 1,2,3,5] [--phones 5]
                                     [--structure-seeds N] [--server-config FILE] [--cell-min-spots N]
                                     [--client-config FILE] [--cache-dir DIR]
                                     [--min-photos 5] [--query-fraction 0.2]

Split: per spot, about 20% (``--query-fraction``) of its photos (at least one,
never all, chosen by a hash of the file name) are queries and never in the
gallery; spots with fewer than 5 (``--min-photos``) photos are left out and
counted. The gallery is indexed (features cached per dataset and model) and
every query goes through the real client code (transform, request, JSON,
rerank) against the real server code: in-process through a WSGI adapter by
default, over HTTP with ``--server``.

Everything an evaluation writes goes under ``--out`` and ``--cache-dir`` (the
checkout's ``.cache`` by default: features, indexes, the evaluated phones'
state_dir, matplotlib's font cache), never under ``~/.enfpire``, where a real
client on the same machine keeps its own.

For the cells default it also measures linked photos (``tools.evaluate.linked``): m
photos of one spot from one phone, with and without the phone's defences; and
``linked_distinct``: per spot up to ``--phones`` phones each taking m distinct
query photos of it, every phone weighing the same (the target's figure).

It also measures open-set answers (``tools.evaluate.openset``): the correct answers
the phone keeps at its default operating point and the photos of other
datasets and the sample photos it declines (``open_set``); and, with a part of
the spots (``--held-out``) left out of a second index, the photos of those
held-out landmarks it declines (``open_set_landmarks``).

With ``--structure-seeds N`` the default setting also runs on structures
derived with the N - 1 k-means seeds after the server's (``structure_seed``,
0 by default; it seeds the looks, prototypes and cells): each figure's mean
and standard error over the seeds say how much of a difference between two
versions the starts alone can make.

The in-process server runs with ``--server-config`` (a JSON file of
``ServerConfig`` fields, as ``enfpire-server --config`` takes) and
``--cell-min-spots``; the phones with ``--client-config`` (``ClientConfig``
fields: their privacy floors, for instance, or ``model``, whose features then
index the gallery too). A phone whose floors refuse the
server's public document sends nothing: the run then reports the refusal
(``refused`` in metrics.json, with the floor and its message) and no figures.

Every figure has a spot-clustered bootstrap 95% interval beside it
(``<figure>_ci95``, tools.evaluate.intervals); report.md says of every target
whether it is met or missed, with the interval.

Writes OUT/metrics.json, OUT/report.md, OUT/curves.png, OUT/open_set.png and OUT/linked.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.config import read_settings
from edge_client.errors import EnfPireError, PrivacyFloorError
from edge_client.privacy.recognizer import Recognition
from edge_client.privacy.transforms import DEFAULT_TRANSFORM, Transform, make_transform
from lite_server.config import ServerConfig, load_config
from lite_server.search.lookup import Lookup
from tools import dataset as ds
from tools.evaluate import attackers as atk
from tools.evaluate import history, linked, openset, receipts
from tools.evaluate import intervals as iv
from tools.evaluate.testbed import Env, baseline, baseline_hits, learned_hits, prepare

__all__ = ["Env", "attack", "baseline", "prepare", "privacy", "run_setting"]

log = logging.getLogger(__name__)

#: Strengths swept per family (the default setting is always evaluated too).
SWEEPS: dict[str, list[tuple[float, int]]] = {
    "noise": [(1.0, 40), (2.0, 40), (4.0, 48), (6.0, 48)],
    "mix": [(0.4, 40), (0.6, 40), (0.8, 48)],
    "cells": [(0.0, 2), (1.0, 2), (1.0, 3), (2.0, 2), (3.0, 2)],
}
#: EnfPire's published point, as fractions of its non-private accuracy (99.8%).
PAPER = {"user": 0.869 / 0.998, "server": 0.414 / 0.998}


def run_setting(env: Env, name: str, strength: float | None, k: int | None, seed: int = 0,
                answers: list[tuple[str, Recognition]] | None = None,
                base_hits: np.ndarray | None = None, calibrate: bool = False) -> dict[str, Any]:
    """One transform setting over all queries: the phone's and the server's accuracy, and bytes,
    each with its spot-clustered 95% interval (``<figure>_ci95``).

    The user's top-1 is the closed-set one (the best candidate, answered or not); ``answers``
    collects (true spot, answer) of every query for the open-set figures. With ``base_hits``
    (the baseline's per-query hits) the user's and the aware server's top-1 relative to the
    baseline get intervals too, resampled with the baseline's. With ``calibrate`` the privacy
    receipts' stated probabilities are checked against the strongest attacker
    (``receipt_calibration``, :mod:`tools.evaluate.receipts`), and the floor's figures are added.
    """
    started = time.monotonic()
    transform = make_transform(name, strength, k)
    truth_ids = [env.data.photos[q][0] for q in env.queries]
    bodies, hits, recalled, sizes, counts, receipt = [], [], [], [], [], []
    with env.client(transform, seed) as client:
        for row, spot in zip(env.queries, truth_ids):
            body, result = client.ask(env.features[row])
            bodies.append(body)
            receipt.append(result.privacy or {})
            hits.append(result.best == spot)
            if answers is not None:
                answers.append((spot, result))
            recalled.append(any(c.id == spot for c in result.candidates))
            sizes.append(result.bytes_sent + result.bytes_received)
            counts.append(len(result.candidates))
        public = client.public() if calibrate and any(receipt) else None
    strongest_hits: list[np.ndarray] = []
    attacks = attack(env, transform, bodies, base_hits, strongest_hits, seed)
    spots = env.truth
    out = {"transform": transform.name, "strength": transform.strength_, "k": transform.k_,
           "user_top1": float(np.mean(hits)), "user_top1_ci95": iv.mean_ci95(hits, spots),
           "candidate_recall": float(np.mean(recalled)), "candidate_recall_ci95": iv.mean_ci95(recalled, spots),
           "mean_candidates": float(np.mean(counts)),
           "bytes_per_query": float(np.mean(sizes)), "bytes_per_query_ci95": iv.mean_ci95(sizes, spots),
           "bytes_max": int(np.max(sizes)), **attacks, "seconds": round(time.monotonic() - started, 1)}
    if base_hits is not None:
        out["user_top1_x_baseline_ci95"] = iv.ratio_ci95(hits, base_hits, spots)
    if calibrate and any(receipt):
        out.update(receipts.evaluate(public, transform, bodies, receipt, truth_ids, strongest_hits[0], spots))
    log.info("%s", out)
    return out


def attack(env: Env, transform: Transform, bodies: list[dict[str, Any]], base_hits: np.ndarray | None = None,
           strongest_hits: list[np.ndarray] | None = None, seed: int = 0) -> dict[str, Any]:
    """Naive and transform-aware attackers, each figure with its spot-clustered interval; the
    aware figures are the strongest attacker's (its per-query hits appended to ``strongest_hits``).
    Against a privacy floor the Bayes attacker sums over the number of decoy groups it learned
    by running the phone on its gallery (:func:`tools.evaluate.receipts.decoy_group_counts`)."""
    truth = env.truth
    ranks = {"naive": atk.rank_of_truth(atk.NaiveAttacker(env.lookup).scores(bodies), truth)}
    index = env.index
    simulated = atk.SimulationAttacker().fit(transform, np.asarray(index.features, np.float32),
                                             index.photo_spot, len(index.spots), env.lookup.n_cells)
    ranks.update({name: atk.rank_of_truth(s, truth) for name, s in simulated.scores(bodies).items()})
    if transform.name == "mix":
        ranks["explain_away"] = atk.rank_of_truth(atk.ExplainAwayAttacker(transform.pool_, env.lookup).scores(bodies),
                                                  truth)
    assumed = None
    if transform.name == "cells":
        assumed = receipts.decoy_group_counts(env, transform, seed)
        for name, bayes in atk.bayes_attackers(transform, env.lookup).items():
            bayes.decoy_groups_ = assumed
            ranks[name] = atk.rank_of_truth(bayes.scores(bodies), truth)
    results = {name: atk.summarize(r, truth) for name, r in ranks.items()}
    strongest = max(results, key=lambda a: (results[a]["top1"], results[a]["top5"]))
    best, naive = results[strongest], results["naive"]
    out = {"server_top1_naive": naive["top1"], "server_top1_naive_ci95": naive["top1_ci95"],
           "server_top1_aware": best["top1"], "server_top1_aware_ci95": best["top1_ci95"],
           "server_top5_aware": best["top5"], "server_top5_aware_ci95": best["top5_ci95"],
           "server_median_rank_aware": best["median_rank"], "strongest_attacker": strongest, "attackers": results}
    if base_hits is not None:
        out["server_top1_aware_x_baseline_ci95"] = iv.ratio_ci95(ranks[strongest] == 1, base_hits, truth)
    if assumed:
        out["decoy_groups_assumed"] = {str(d): p for d, p in sorted(assumed.items())}
    if strongest_hits is not None:
        strongest_hits.append(np.asarray(ranks[strongest] == 1))
    return out


def privacy(args: argparse.Namespace) -> dict[str, Any]:
    server = load_config(ServerConfig, getattr(args, "server_config", None),
                         cell_min_spots=getattr(args, "cell_min_spots", None))
    env = prepare(args.dataset, args.server, args.tune, cache=args.cache_dir, config=server,
                  client_settings=read_settings(args.client_config) if getattr(args, "client_config", None) else {},
                  min_photos=args.min_photos, query_fraction=args.query_fraction)
    base_hits = baseline_hits(env)
    answers: list[tuple[str, Recognition]] = []
    metrics: dict[str, Any] = {
        "dataset": str(args.dataset), "n_spots": len(env.index.spots), "n_queries": int(len(env.queries)),
        "n_gallery": int(len(env.gallery)), "spots_left_out": env.left_out, "min_photos": args.min_photos,
        "query_fraction": args.query_fraction, "baseline_top1": float(np.mean(base_hits)),
        "baseline_top1_ci95": iv.mean_ci95(base_hits, env.truth),
        **learned_baseline(env),
        "intervals": {"method": "spot-clustered percentile bootstrap", "level": iv.LEVEL,
                      "resamples": iv.RESAMPLES, "seed": iv.SEED},
        "seed": args.seed, "split": "tuning (gallery only)" if args.tune else "queries",
        "server": {"cell_min_spots": server.cell_min_spots, "n_cells": env.lookup.n_cells,
                   "structure_seed": server.structure_seed},
        "client": env.client_settings,
    }
    try:
        metrics["default"] = run_setting(env, args.transform or DEFAULT_TRANSFORM, args.strength, args.k,
                                         args.seed, answers, base_hits, calibrate=True)
    except PrivacyFloorError as exc:  # the phone refused the document: nothing was sent, nothing to measure
        metrics["refused"] = {"floor": exc.floor, "value": exc.value, "required": exc.required,
                              "message": str(exc)}
        log.warning("%s", exc)
        return metrics
    transform = make_transform(args.transform or DEFAULT_TRANSFORM, args.strength, args.k)
    if args.outside is not None:
        others = openset.other_datasets(args.dataset) if args.outside == "auto" else \
            [Path(p) for p in args.outside.split(",") if p]
        metrics["default"]["open_set"] = openset.evaluate(env, transform, answers, others, args.seed)
    if args.held_out > 0:
        metrics["default"]["open_set_landmarks"] = openset.landmarks(env, transform, args.seed, args.held_out)
    if metrics["default"]["transform"] == "cells" and args.links:
        transform = make_transform(DEFAULT_TRANSFORM if not args.transform else args.transform, args.strength, args.k)
        result = linked.evaluate(env, transform, args.seed, tuple(args.links), base_hits=base_hits,
                                 phones=getattr(args, "phones", linked.PHONES))
        metrics["default"]["linked"] = result["defended"]
        metrics["default"]["linked_undefended"] = result["undefended"]
        metrics["default"]["linked_distinct"] = with_baseline(result["distinct"], metrics["baseline_top1"])
    if args.structure_seeds > 1:
        name = args.transform or DEFAULT_TRANSFORM
        metrics["structure_seeds"] = structure_spread(env, metrics["default"], args.structure_seeds, name,
                                                      args.strength, args.k, args.seed)
    if args.sweep:
        metrics["sweep"] = [run_setting(env, name, s, k, args.seed, base_hits=base_hits)
                            for name, values in SWEEPS.items() for s, k in values]
    return metrics


#: The default setting's figures compared across structure seeds.
SPREAD_KEYS = ("user_top1", "candidate_recall", "server_top1_aware", "bytes_per_query")


def structure_spread(env: Env, first: dict[str, Any], seeds: int, name: str, strength: float | None = None,
                     k: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Setting ``name`` on ``env``'s index with structures derived with the ``seeds`` - 1 structure
    seeds after its own (``first`` is its run on ``env`` itself): per figure the values, their
    mean and its standard error."""
    own = env.lookup.config.structure_seed
    runs = [first]
    for structure_seed in range(own + 1, own + seeds):
        config = replace(env.lookup.config, structure_seed=structure_seed)
        runs.append(run_setting(replace(env, lookup=Lookup(env.index, config)), name, strength, k, seed))
    out: dict[str, Any] = {"seeds": list(range(own, own + seeds)), "strongest": [r["strongest_attacker"] for r in runs]}
    for key in SPREAD_KEYS:
        values = np.array([r[key] for r in runs], np.float64)
        out[key] = {"values": values.tolist(), "mean": float(values.mean()),
                    "sem": float(values.std(ddof=1) / np.sqrt(len(values)))}
    return out


def spread_report(metrics: dict[str, Any]) -> list[str]:
    spread = metrics.get("structure_seeds")
    if not spread:
        return []
    rows = [f"| {seed} | " + " | ".join(_cell(key, spread[key]["values"][i]) for key in SPREAD_KEYS)
            + f" | {spread['strongest'][i]} |" for i, seed in enumerate(spread["seeds"])]
    mean = " | ".join(f"{_cell(key, spread[key]['mean'])} ± {_cell(key, spread[key]['sem'])}" for key in SPREAD_KEYS)
    return ["## Structure seeds", "",
            "The default setting on structures derived with other k-means seeds "
            f"(the server's is {spread['seeds'][0]}).", "",
            "| seed | user top-1 | recall | server aware | KiB/query | strongest |", "|" + "---|" * 6,
            *rows, f"| mean ± s.e. | {mean} | |", ""]


def _cell(key: str, value: float) -> str:
    return f"{value / 1024:.1f}" if key == "bytes_per_query" else f"{value:.3f}"


def write_outputs(metrics: dict[str, Any], out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "report.md").write_text(report(metrics, command))
    if "refused" in metrics:
        return
    plot(metrics, out / "curves.png")
    if "open_set" in metrics["default"]:
        openset.plot(metrics, out / "open_set.png")
    if "linked" in metrics["default"]:
        plot_linked(metrics, out / "linked.png")


def _row(run: dict[str, Any], base: float) -> str:
    return (f"| {run['transform']} | {run['strength']:g} | {run['k']} | {run['user_top1']:.3f}"
            f"{_ci(run.get('user_top1_ci95'))} ({run['user_top1'] / base:.2f}x) | {run['candidate_recall']:.3f} | "
            f"{run['mean_candidates']:.0f} | {run['server_top1_naive']:.3f} | {run['server_top1_aware']:.3f}"
            f"{_ci(run.get('server_top1_aware_ci95'))} ({run['server_top1_aware'] / base:.2f}x) | "
            f"{run['server_top5_aware']:.3f} | {run['server_median_rank_aware']:.0f} | "
            f"{run['strongest_attacker']} | {run['bytes_per_query'] / 1024:.1f} |")


def targets_report(metrics: dict[str, Any]) -> list[str]:
    """The default setting's targets, each met or missed with its 95% interval (figures relative
    to the baseline are resampled jointly with it)."""
    d, base = metrics["default"], metrics["baseline_top1"]
    return [iv.verdict("user top-1 / baseline", d["user_top1"] / base, d.get("user_top1_x_baseline_ci95"),
                       0.95, at_most=False, unit="x", digits=2),
            iv.verdict("transform-aware server top-1 / baseline", d["server_top1_aware"] / base,
                       d.get("server_top1_aware_x_baseline_ci95"), 0.25, at_most=True, unit="x", digits=2),
            iv.verdict("bytes a query", d["bytes_per_query"], d.get("bytes_per_query_ci95"), 64 * 1024,
                       at_most=True, unit=" KiB", scale=1024, digits=1)]


def _ci(interval: list[float] | None) -> str:
    return f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""


def report(metrics: dict[str, Any], command: str) -> str:
    base = metrics["baseline_top1"]
    if "refused" in metrics:
        return "\n".join([
            "# Privacy evaluation", "", f"Command: `{command}`", "",
            f"Dataset {metrics['dataset']}: {metrics['n_spots']} spots; the server's cells: "
            f"cell_min_spots {metrics['server']['cell_min_spots']}, {metrics['server']['n_cells']} cells.", "",
            f"**Refused by the phone** (floor `{metrics['refused']['floor']}`): {metrics['refused']['message']}.",
            "No candidates request was sent, so there is nothing for the server to attack.", ""])
    head = ("| transform | strength | k | user top-1 | recall | candidates | server naive | server aware | "
            "aware top-5 | median rank | strongest | KiB/query |\n|" + "---|" * 12)
    runs = [metrics["default"]] + metrics.get("sweep", [])
    return "\n".join([
        "# Privacy evaluation", "", f"Command: `{command}`", "",
        f"Dataset {metrics['dataset']}: {metrics['n_spots']} spots, {metrics['n_gallery']} gallery photos, "
        f"{metrics['n_queries']} queries ({metrics['spots_left_out']} spots with < "
        f"{metrics.get('min_photos', ds.MIN_PHOTOS)} photos left out; "
        f"{metrics.get('query_fraction', ds.QUERY_FRACTION):g} of each spot's photos are queries).",
        f"Non-private baseline (server top-1 on the raw feature): {base:.3f}{_ci(metrics.get('baseline_top1_ci95'))}.",
        *([f"The codec space's own non-private ceiling ({metrics.get('codec_kind')}; the phone's rerank with every "
           f"spot a candidate): {metrics['baseline_top1_codec']:.3f}{_ci(metrics.get('baseline_top1_codec_ci95'))}."]
          if "baseline_top1_codec" in metrics else []),
        "", "Intervals: 95%, spot-clustered bootstrap (a spot's queries resampled together, "
        f"{iv.RESAMPLES} resamples, seed {iv.SEED}).", "",
        "Targets of the default setting:", "", *targets_report(metrics), "",
        "First row: the default setting.", "", head, *(_row(r, base) for r in runs), "",
        *receipts.report(metrics["default"]), *openset.report(metrics["default"]),
        *openset.landmarks_report(metrics["default"]), *linked_report(metrics["default"], base),
        *linked_distinct_report(metrics["default"], base), *spread_report(metrics)])


def learned_baseline(env: Env) -> dict[str, Any]:
    """``baseline_top1_codec`` (and its interval): the codec space's own non-private ceiling, the
    phone's rerank with every spot a candidate (:func:`testbed.learned_hits`); empty without a codec."""
    hits = learned_hits(env)
    if hits is None:
        return {}
    kind = env.lookup.codec.kind if env.lookup.codec is not None else "none"
    return {"baseline_top1_codec": float(np.mean(hits)), "baseline_top1_codec_ci95": iv.mean_ci95(hits, env.truth),
            "codec_kind": kind}


def with_baseline(runs: dict[str, dict[str, Any]], base: float) -> dict[str, dict[str, Any]]:
    """Each m's top-1 relative to the per-query baseline, with its interval: the top-1's scaled
    by the baseline, held fixed (phones and queries are different units, so they cannot be
    resampled jointly)."""
    for run in runs.values():
        if "top1" in run and base > 0:
            run["top1_x_baseline"] = run["top1"] / base
            ci = run.get("top1_ci95")
            run["top1_x_baseline_ci95"] = [ci[0] / base, ci[1] / base] if ci else None
    return runs


def linked_distinct_report(run: dict[str, Any], base: float) -> list[str]:
    """The linked-distinct table (m distinct photos per phone, up to P phones per spot, each
    phone weighing the same) and issue 27's targets at m = 5, met or missed."""
    if "linked_distinct" not in run:
        return []
    rows, verdicts = [], []
    for m, d in run["linked_distinct"].items():
        if "top1" not in d:
            rows.append(f"| {m} | - | - | - | 0 ({d['spots_without_phone']} spots with fewer photos) |")
            continue
        at_five = d.get("top5_attacker", d["attacker"])
        rows.append(f"| {m} | {d['top1']:.3f}{_ci(d.get('top1_ci95'))} ({d['top1'] / base:.2f}x) | "
                    f"{d['top5']:.3f}{_ci(d.get('top5_ci95'))} | {d['attacker']}"
                    f"{'' if at_five == d['attacker'] else f' (top-5: {at_five})'} | "
                    f"{d['phones']} ({d['spots_with_phones']} spots; {d['spots_without_phone']} without) |")
    d = run["linked_distinct"].get("5", {})
    if "top1" in d:
        verdicts = [iv.verdict("m = 5 distinct: server top-1 / baseline", d["top1"] / base,
                               d.get("top1_x_baseline_ci95"), 0.25, at_most=True, unit="x", digits=2),
                    iv.verdict("m = 5 distinct: server top-5", d["top5"], d.get("top5_ci95"), 0.50, at_most=True), ""]
    return ["## Linked distinct photos", "",
            "Per spot up to P phones (the default phone: answer cache, stable decoys), each taking m distinct "
            "query photos of it; every phone weighs the same; each figure by its strongest linked attacker "
            "(count-then-Bayes and the leave-one-out posteriors among them). The interval of top-1 / baseline holds the baseline fixed.", "", *verdicts,
            "| m | server top-1 (/ baseline) | top-5 | strongest | phones |", "|" + "---|" * 5, *rows, ""]


def linked_report(run: dict[str, Any], base: float) -> list[str]:
    """The linked-photo table: m photos of one spot from one phone, with and without its defences."""
    if "linked" not in run:
        return []
    rows, verdicts = [], []
    for m, d in run["linked"].items():
        u = run["linked_undefended"][m]
        rows.append(f"| {m} | {d['top1']:.3f} ({d['top1'] / base:.2f}x) | {d['top5']:.3f} | {d['median_rank']:.0f} | "
                    f"{d['attacker']} | {d['requests_per_photo']:.2f} | {d['user_top1']:.3f} | "
                    f"{u['top1']:.3f} ({u['top1'] / base:.2f}x) | {u['top5']:.3f} | {u['median_rank']:.0f} |")
    if "5" in run["linked"]:
        d = run["linked"]["5"]
        verdicts = [iv.verdict("m = 5: server top-1 / baseline", d["top1"] / base, d.get("top1_x_baseline_ci95"),
                               0.25, at_most=True, unit="x", digits=2),
                    iv.verdict("m = 5: server top-5", d["top5"], d.get("top5_ci95"), 0.50, at_most=True), ""]
    return ["## Linked photos", "",
            "m photos of one spot from one phone, linked by the server; the default phone (answer cache, "
            "stable decoys) against one without those defences.", "", *verdicts,
            "| m | server top-1 | top-5 | median rank | strongest | requests/photo | user top-1 | "
            "undefended top-1 | undefended top-5 | undefended median rank |", "|" + "---|" * 10, *rows, ""]


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
    ax.set_title("Utility against privacy (upper left is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_linked(metrics: dict[str, Any], path: Path) -> None:
    """Server top-1 and top-5 against the number of linked photos, with and without the phone's defences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = metrics["baseline_top1"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, label, style in (("linked", "default phone", "-"), ("linked_undefended", "no cache, fresh decoys", ":")):
        runs = metrics["default"][key]
        ms = [int(m) for m in runs]
        ax.plot(ms, [runs[str(m)]["top1"] / base for m in ms], style, marker="o", c="C0", label=f"top-1 / baseline, {label}")
        ax.plot(ms, [runs[str(m)]["top5"] for m in ms], style, marker="s", c="C1", label=f"top-5, {label}")
    ax.axhline(0.25, ls="--", c="C0", lw=0.8)
    ax.axhline(0.50, ls="--", c="C1", lw=0.8)
    ax.set_xticks([int(m) for m in metrics["default"]["linked"]])
    ax.set_xlabel("photos of one spot linked by the server (m)")
    ax.set_ylabel("strongest linked attacker")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Linked photos: {Path(metrics['dataset']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _links(text: str) -> list[int]:
    return [int(m) for m in text.split(",") if m.strip()]


def _phones(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"--phones must be at least 1, got {text}")
    return value


def _min_photos(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("a spot needs at least 2 photos: one query, one in the gallery")
    return value


def _held_out(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"--held-out must be in [0, 1), got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"the query fraction must be in (0, 1), got {text}")
    return value


def add_hygiene_options(p: argparse.ArgumentParser) -> None:
    """Where an evaluation writes, and its split: shared by every sub-command."""
    p.add_argument("--cache-dir", type=Path, default=ds.CACHE,
                   help="features, indexes and the evaluated phones' state (default: the checkout's .cache); "
                        "nothing is ever written under ~/.enfpire")
    p.add_argument("--min-photos", type=_min_photos, default=ds.MIN_PHOTOS,
                   help=f"spots with fewer photos are left out (default {ds.MIN_PHOTOS})")
    p.add_argument("--query-fraction", type=_fraction, default=ds.QUERY_FRACTION,
                   help=f"share of each spot's photos that are queries, at least one (default {ds.QUERY_FRACTION:g})")


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
    p.add_argument("--links", type=_links, default=list(linked.LINKS),
                   help="linked photos per phone to evaluate, e.g. 1,2,3,5 (empty: skip)")
    p.add_argument("--phones", type=_phones, default=linked.PHONES,
                   help=f"linked_distinct: phones per spot at most (default {linked.PHONES})")
    p.add_argument("--outside", default="auto",
                   help="out-of-catalogue datasets for the open-set figures, comma-separated "
                        "(auto: the datasets beside --dataset; empty: only the sample photos)")
    p.add_argument("--held-out", type=_held_out, default=openset.HELD_OUT, metavar="SHARE",
                   help="open set against held-out landmarks: the share of spots left out of a second index "
                        f"(default {openset.HELD_OUT:g}; 0: skip)")
    p.add_argument("--structure-seeds", type=int, default=1, metavar="N",
                   help="also run the default setting on structures derived with the N-1 k-means seeds "
                        "after the server's structure_seed and report each figure's mean and standard "
                        "error (in-process server only)")
    p.add_argument("--server-config", type=Path, metavar="FILE",
                   help="JSON file of ServerConfig fields for the in-process server (e.g. cell_min_spots)")
    p.add_argument("--cell-min-spots", type=int, metavar="N",
                   help="the in-process server's cell_min_spots (overrides --server-config)")
    p.add_argument("--client-config", type=Path, metavar="FILE",
                   help="JSON file of ClientConfig fields for every phone (e.g. its privacy floors; "
                        "its model indexes the gallery too)")
    p.add_argument("-v", "--verbose", action="store_true")
    add_hygiene_options(p)
    add_hygiene_options(history.add_parser(sub, ds.DEFAULT_DATASET))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    # matplotlib keeps its font cache under ~/.cache or ~/.config unless told otherwise.
    os.environ.setdefault("MPLCONFIGDIR", str(args.cache_dir / "matplotlib"))
    if args.command == "dummies":
        return history.main(args, "python -m tools.evaluate " + " ".join(argv or sys.argv[1:]))
    if args.structure_seeds > 1 and args.server:
        parser.error("--structure-seeds derives structures in-process: it cannot vary a --server's")
    if args.server and (args.server_config or args.cell_min_spots is not None):
        parser.error("--server-config and --cell-min-spots set the in-process server: not a --server's")
    from threadpoolctl import threadpool_limits

    # Thousands of small products: BLAS threads only fight each other (about 5x slower here).
    with threadpool_limits(limits=1):
        try:
            metrics = privacy(args)
        except EnfPireError as exc:  # a bad setting or file: one line, as the other CLIs say it
            print(f"error: {exc}", file=sys.stderr)
            return 2
    write_outputs(metrics, args.out, "python -m tools.evaluate " + " ".join(argv or sys.argv[1:]))
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
