"""The privacy receipt checked against the attacker, and the privacy floor as the attacker sees it.

Calibration: every default query's receipt states the probability of the
server's best guess (``server_top1_probability``, computed on the phone from
public data only, :mod:`edge_client.privacy.receipt`). Among queries whose
receipt says p, the strongest single-query attacker should be right about p
of the time. Queries are binned by deciles of the stated probability; per
bin the mean stated probability and the attacker's observed top-1 rate; the
*mean gap* is their absolute difference averaged over queries (each bin
weighted by its queries: the expected calibration error), with a
spot-clustered bootstrap interval. Target: mean gap <= 0.05.

The floor: a phone with ``privacy_floor`` sends a variable number of decoy
groups. The server knows the rule, the public document and its gallery, so
it can run the phone on its own photos and learn how often each number of
groups is sent (:func:`decoy_group_counts`); the Bayes attacker then sums
over that distribution, assuming the number is independent of the spot.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from edge_client.privacy import receipt
from edge_client.privacy.transforms import Transform
from edge_client.protocol.public import PublicParams
from tools.evaluate import intervals as iv
from tools.evaluate.testbed import Env

TARGET = 0.05
BINS = 10
#: Gallery photos the attacker runs the phone's floor on to learn the number of decoy groups.
FLOOR_SAMPLE = 300


def evaluate(public: PublicParams, transform: Transform, bodies: list[dict[str, Any] | None],
             said: list[dict[str, Any]], truth_ids: list[str], hits: np.ndarray, spots: np.ndarray) -> dict[str, Any]:
    """A run's receipt figures: ``receipt_calibration`` (the stated best-guess probability against the
    strongest attacker's per-query ``hits``), ``receipt_plausible_spots`` and ``receipt_timing``."""
    stated = [r.get("server_top1_probability", np.nan) if r.get("request_sent") else np.nan for r in said]
    plausible = plausible_summary(said)
    plausible["truth_within_plausible"] = truth_within_plausible(public, transform, bodies, said, truth_ids)
    return {"receipt_calibration": calibration(np.array(stated, np.float64), hits, spots),
            "receipt_plausible_spots": plausible, "receipt_timing": timing(public, transform, bodies)}


def _binned(stated: np.ndarray, hits: np.ndarray, weights: np.ndarray) -> tuple[list[dict[str, Any]], float]:
    """Per decile of ``stated``: queries, mean stated, observed hit rate; and the weighted mean gap."""
    bins = np.minimum((stated * BINS).astype(int), BINS - 1)
    rows, gap, total = [], 0.0, float(weights.sum())
    for b in range(BINS):
        w = weights * (bins == b)
        if w.sum() <= 0:
            continue
        said, seen = float(w @ stated / w.sum()), float(w @ hits / w.sum())
        rows.append({"bin": [b / BINS, (b + 1) / BINS], "queries": int(np.sum(bins == b)), "stated": said,
                     "observed": seen})
        gap += float(w.sum()) / total * abs(said - seen)
    return rows, gap


def calibration(stated: np.ndarray, hits: np.ndarray, clusters: np.ndarray) -> dict[str, Any]:
    """``default.receipt_calibration``: stated against observed over deciles of the stated probability,
    the mean gap and its spot-clustered 95% interval. Queries without a receipt (NaN) are left out."""
    stated, hits = np.asarray(stated, np.float64), np.asarray(hits, np.float64)
    kept = np.isfinite(stated)
    stated, hits, clusters = stated[kept], hits[kept], np.asarray(clusters)[kept]
    if not len(stated):
        return {"deciles": [], "mean_gap": None, "mean_gap_ci95": None, "queries": 0}
    deciles, gap = _binned(stated, hits, np.ones(len(stated)))
    return {"deciles": deciles, "mean_gap": gap,
            "mean_gap_ci95": iv.statistic_ci95(lambda w: _binned(stated, hits, w)[1], clusters),
            "queries": int(len(stated)), "mean_stated": float(stated.mean()), "attacker_top1": float(hits.mean()),
            "target": TARGET}


def plausible_summary(receipts: list[dict[str, Any]]) -> dict[str, Any]:
    """The receipts' plausible spots over the queries that were sent: mean, quartiles, and with a
    privacy floor the share of queries that reached it and the decoy groups sent."""
    sent = [r for r in receipts if r.get("request_sent")]
    values = np.array([r["plausible_spots"] for r in sent], np.float64)
    if not len(values):
        return {}
    out: dict[str, Any] = {"mean": float(values.mean()), "quartiles": np.percentile(values, [25, 50, 75]).tolist(),
                           "min": float(values.min())}
    if sent[0].get("privacy_floor"):
        out["privacy_floor"] = sent[0]["privacy_floor"]
        out["floor_reached"] = float(np.mean([r["floor_reached"] for r in sent]))
        out["mean_decoy_groups"] = float(np.mean([r["decoy_groups"] for r in sent]))
    return out


def truth_within_plausible(public: PublicParams, transform: Transform, bodies: list[dict[str, Any] | None],
                           receipts: list[dict[str, Any]], truth_ids: list[str]) -> dict[str, float] | None:
    """Does "plausible" behave? Over the sent queries, the share whose true spot is among the
    receipt posterior's ceil(plausible spots) most likely ("observed"), against the mass the
    posterior itself puts there ("promised"): equal when the posterior is calibrated."""
    model = receipt.model_for(public.digest, transform, public.popularity)
    inside, promised = [], []
    for body, said, spot in zip(bodies, receipts, truth_ids):
        rows = np.flatnonzero(public.ids == spot)
        if body is None or not said.get("request_sent") or not len(rows):
            continue
        post = model.posterior(tuple(body["cells"]), said.get("decoy_groups"))
        top = int(np.ceil(said["plausible_spots"]))
        inside.append(1 + int(np.sum(post > post[rows[0]])) <= top)
        promised.append(float(np.sort(post)[::-1][:top].sum()))
    return {"observed": float(np.mean(inside)), "promised": float(np.mean(promised))} if inside else None


def timing(public: PublicParams, transform: Transform, bodies: list[dict[str, Any] | None]) -> dict[str, Any]:
    """What receipts cost on this machine: a fresh model of the document (no spot simulated yet),
    then every sent message's receipt in order, in milliseconds (one thread: the caller limits BLAS)."""
    messages = [tuple(b["cells"]) for b in bodies if b is not None and "cells" in b]
    started = time.perf_counter()
    model = receipt.ReceiptModel(transform, public.popularity)
    built = time.perf_counter() - started
    spent = []
    for message in messages:
        started = time.perf_counter()
        model.receipt(message)
        spent.append(time.perf_counter() - started)
    ms = np.array(spent) * 1000
    return {"model_ms": built * 1000, "first_ms": float(ms[0]), "mean_ms": float(ms.mean()),
            "median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_after_20_ms": float(ms[20:].mean()) if len(ms) > 20 else None, "receipts": len(ms)}


def report(run: dict[str, Any]) -> list[str]:
    """The calibration's report.md section, its target met or missed."""
    cal = run.get("receipt_calibration")
    if not cal or cal.get("mean_gap") is None:
        return []
    rows = [f"| {d['bin'][0]:.1f}-{d['bin'][1]:.1f} | {d['queries']} | {d['stated']:.3f} | {d['observed']:.3f} |"
            for d in cal["deciles"]]
    return ["## Privacy receipt calibration", "",
            "Each query's receipt (computed on the phone from public data) states the probability of the "
            "server's best guess; the strongest single-query attacker's top-1 rate among queries that stated "
            f"about that ({run['strongest_attacker']}). Mean gap: |stated - observed| averaged over queries.", "",
            iv.verdict("receipt calibration: mean gap", cal["mean_gap"], cal.get("mean_gap_ci95"), TARGET,
                       at_most=True), "", *_plausible_line(run.get("receipt_plausible_spots") or {}),
            "| stated | queries | mean stated | attacker top-1 |", "|" + "---|" * 4, *rows, "",
            *_timing_line(run.get("receipt_timing") or {})]


def _timing_line(t: dict[str, Any]) -> list[str]:
    if not t:
        return []
    return [f"Time per receipt (this machine, one thread): the document's model {t['model_ms']:.0f} ms, the first "
            f"receipt {t['first_ms']:.0f} ms, then a mean of {t['mean_ms']:.2f} ms (median {t['median_ms']:.2f}, "
            f"95th percentile {t['p95_ms']:.2f}) over {t['receipts']} receipts.", ""]


def _plausible_line(summary: dict[str, Any]) -> list[str]:
    if not summary:
        return []
    line = (f"Plausible spots per receipt: mean {summary['mean']:.1f}, quartiles "
            + ", ".join(f"{q:.1f}" for q in summary["quartiles"]) + f", least {summary['min']:.1f}.")
    within = summary.get("truth_within_plausible")
    if within:
        line += (f" The true spot is among the receipt's ceil(plausible) most likely spots for "
                 f"{within['observed']:.3f} of the queries; the receipts promised {within['promised']:.3f}.")
    if "privacy_floor" in summary:
        line += (f" Privacy floor {summary['privacy_floor']:g}: reached by {summary['floor_reached']:.3f} of the "
                 f"queries, {summary['mean_decoy_groups']:.2f} decoy groups a query.")
    return [line, ""]


def decoy_group_counts(env: Env, transform: Transform, seed: int) -> dict[int, float] | None:
    """How often a phone with a privacy floor sends each number of decoy groups, learned as a server
    would: the phone's own code run on up to :data:`FLOOR_SAMPLE` gallery photos (None without a floor)."""
    if not getattr(transform, "extra_groups", 0):
        return None
    rows = np.random.default_rng(seed).permutation(env.gallery)[:FLOOR_SAMPLE]
    counts: dict[int, float] = {}
    with env.client(transform, seed + 1) as client:
        client.check_model()
        for row in rows:
            groups = client.message(env.features[row])[1]
            counts[groups] = counts.get(groups, 0.0) + 1.0 / len(rows)
    return counts
