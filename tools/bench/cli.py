"""``python -m tools.bench --out OUT [--quick | --smoke]``: phone and server speed,
each figure beside its peer measured in the same run.

- Phone: extraction of a 224x224 photo, of a 12-megapixel JPEG and of a 640x480
  camera frame (CameraX RGBA; NV21 and a thumbnail JPEG beside it) against the
  bare ``invoke()`` of the same model, and the cosine between the fast decode
  and the careful one (full-size decode, Lanczos) on real photos made 12 MP.
- Server: the default exact lookup against FAISS ``IndexFlatIP`` (and the old
  scikit-learn default) in-process; the real server (waitress, loopback) for
  ``/v1/candidates`` latency, throughput under 16 concurrent clients, resident
  memory, and a whole private query against a plain one.
- The user's wait: time until the answer with every default defence on (2
  dummies a request; the CLI's one-shot path and a long-lived scheduler)
  against the same with none, through the real client and server
  (``--only answer-latency`` measures just this, on the smallest gallery).
- Oblivious HTTP: the default (cells) query through the real client, sealed and
  sent via ``enfpire-relay`` to the server's gateway, against the same query
  direct (``--only ohttp`` measures just this, at the plan's target size).
- Ray (``--only ray``, the ray extra; see ``tools.bench.fleet``): a Ray index build
  against the local one on the same cores, and the cells query through
  ``serve --ray`` with 1 and 2 replicas against waitress.

Galleries of 10k, 100k and 1M features are the 4,625 real wa-landmarks
features tiled with a small per-coordinate jitter (log-normal, sigma 0.1,
which keeps them non-negative) and re-normalised; the JSON says so. Every
figure is a median over repeats after a warm-up, peers interleaved with the
subject so a busy machine slows both alike. Writes ``OUT/bench.json``,
``OUT/bench.md`` (the table) and ``OUT/scaling.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.config import default_model_path
from edge_client.vision.extractor import Extractor
from tools.bench.catalogue import plot_catalogue, run_catalogue
from tools.bench.galleries import limited, publish_gallery, queries
from tools.bench.lookup import bench_lookup
from tools.bench.phone import bench_extraction
from tools.bench.plan import JITTER, ONLY, PLANS, Plan
from tools.bench.report import machine, plot, table, verdicts
from tools.bench.server import bench_http, bench_ivf_server, bench_private, bench_throughput, spots_answered
from tools.bench.timing import label, serve, timed
from tools.bench.wait import bench_answer_latency, bench_ohttp
from tools.dataset import Dataset, features, load_dataset


def run_extract_only(plan: Plan, work: Path) -> dict[str, Any]:
    """``--only extract``: the phone's extraction figures alone (224, 12 MP, camera frame); no gallery."""
    extractor = Extractor(default_model_path())
    result: dict[str, Any] = {"machine": machine(), "plan": asdict(plan), "only": "extract"}
    result.update(bench_extraction(plan, extractor, limited(load_dataset(), max(plan.real_photos, 10 * plan.repeats))))
    result["targets"] = verdicts(result)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def run_ohttp_only(plan: Plan, work: Path) -> dict[str, Any]:
    """Just the Oblivious HTTP figure, on the plan's target gallery."""
    extractor = Extractor(default_model_path())
    dataset = limited(load_dataset(), plan.real_photos)
    real = features(dataset, extractor)
    qs = queries(real, 64)
    folder = work / f"index-{label(plan.target)}"
    publish_gallery(dataset, real, plan.target, extractor, folder)
    result: dict[str, Any] = {"machine": machine(), "plan": asdict(plan), "only": "ohttp"}
    server = serve(folder)
    try:
        result.update(bench_ohttp(plan, server, extractor, qs, label(plan.target)))
    finally:
        server.stop()
    result["targets"] = verdicts(result)
    return result


def run_catalogue_only(plan: Plan, work: Path) -> dict[str, Any]:
    """``--only catalogue``: the figures that grow with the number of spots."""
    result: dict[str, Any] = {"machine": machine(), "plan": asdict(plan), "only": "catalogue"}
    result.update(run_catalogue(plan.spots, Extractor(default_model_path()), work, plan.repeats))
    result["targets"] = verdicts(result)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def run(plan: Plan, out: Path, work: Path) -> dict[str, Any]:
    """Every measurement of ``plan``; indexes are built under ``work``."""
    extractor = Extractor(default_model_path())
    dataset = limited(load_dataset(), plan.real_photos)
    real = features(dataset, extractor)
    qs = queries(real, 64)
    result: dict[str, Any] = {"machine": machine(), "plan": asdict(plan),
                              "gallery": f"{len(real)} real wa-landmarks features (MobileNetV2 1280-d), tiled "
                                         f"beyond that with per-coordinate log-normal jitter sigma {JITTER}, "
                                         "re-normalised; queries: jittered real features"}
    seconds: dict[str, float] = {}
    with timed(seconds, "extraction"):
        result.update(bench_extraction(plan, extractor, dataset))
    for n in plan.sizes:
        with timed(seconds, f"gallery_{label(n)}"):
            result.update(bench_size(plan, n, dataset, real, extractor, qs, work))
    result.update(run_catalogue(plan.spots, extractor, work, plan.repeats))
    result["section_seconds"] = {**seconds, **result.pop("catalogue_seconds")}
    result["targets"] = verdicts(result)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def run_answer_latency(plan: Plan, work: Path) -> dict[str, Any]:
    """``--only answer-latency``: the user's-wait figures alone, on the plan's smallest served gallery."""
    extractor = Extractor(default_model_path())
    dataset = limited(load_dataset(), plan.real_photos)
    real = features(dataset, extractor)
    n = min(plan.served)
    publish_gallery(dataset, real, n, extractor, work / f"index-{label(n)}")
    result: dict[str, Any] = {"machine": machine(), "plan": asdict(plan), "only": "answer-latency",
                              "gallery": f"{n} features: {len(real)} real wa-landmarks features, tiled"}
    server = serve(work / f"index-{label(n)}")
    try:
        result.update(bench_answer_latency(plan, server, extractor, dataset))
    finally:
        server.stop()
    result["targets"] = verdicts(result)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def bench_size(plan: Plan, n: int, dataset: Dataset, real: np.ndarray, extractor: Extractor,
               qs: np.ndarray, work: Path) -> dict[str, Any]:
    """The in-process lookup at size ``n``, and the server figures where the plan serves it."""
    folder = work / f"index-{label(n)}"
    index = publish_gallery(dataset, real, n, extractor, folder)
    result = bench_lookup(plan, index, qs)
    del index
    if n in plan.served:
        server = serve(folder)
        try:
            result.update(bench_http(plan, server, extractor, qs, label(n)))
            if n == plan.target:
                result.update(bench_throughput(plan, server, qs))
                result.update(bench_private(plan, server, extractor, qs))
                result.update(bench_answer_latency(plan, server, extractor, dataset))
                result.update(bench_ohttp(plan, server, extractor, qs, label(n)))
                exact = spots_answered(server, qs)
        finally:
            server.stop()
        if n == plan.target:
            result.update(bench_ivf_server(plan, folder, qs, exact, label(n)))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="lookup at 10k and 100k, the server at 10k, few repeats: under a minute")
    mode.add_argument("--smoke", action="store_true", help="one tiny gallery: checks the tool itself")
    parser.add_argument("--only", choices=ONLY, help="measure only this section (with the plan's repeats)")
    args = parser.parse_args(argv)
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="enfpire-bench-") as work:
        from tools.bench.fleet import run_ray_only

        runs = {"answer-latency": run_answer_latency, "ohttp": run_ohttp_only, "catalogue": run_catalogue_only,
                "ray": run_ray_only, "extract": run_extract_only}
        result = runs[args.only](plan, Path(work)) if args.only else run(plan, args.out, Path(work))
    result["seconds"] = round(time.monotonic() - started, 1)
    (args.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "bench.md").write_text(table(result))
    plot(result, args.out / "scaling.png")
    plot_catalogue(result, args.out / "catalogue.png")
    print(table(result))
    print(f"wrote {args.out / 'bench.json'}, bench.md and scaling.png in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
