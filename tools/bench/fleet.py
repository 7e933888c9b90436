"""``python -m tools.bench --out OUT --only ray``: Ray against one process on the same cores.

- Build: the same real photos built into an index locally (``build_index``, one
  interpreter with a thread per core, decode ahead) and on a local Ray cluster
  of those cores (``RayExtraction``: one single-thread interpreter per worker
  actor), interleaved; photos per second, their ratio, and whether the two
  indexes hold the same features bit for bit. The cluster's start is timed
  apart: a real cluster is up before a build.
- Serving: the default query (cells) through ``serve --ray`` with 1 and with 2
  replicas against waitress (``serve``) on the plan's gallery: sequential p50,
  interleaved with waitress, and throughput under the plan's clients.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.vision.extractor import Extractor
from lite_server.index.store import build_index
from tools.bench.timing import timed
from tools.dataset import Dataset

#: Photos per repeat of the plan in the build comparison (full plan: 1,000 photos).
BUILD_PHOTOS_PER_REPEAT = 40


def photo_tree(dataset: Dataset, count: int, dest: Path) -> Path:
    """A spot-folder tree of symlinks to the first ``count`` photos, as ``index build`` reads."""
    for spot, photo in dataset.photos[:count]:
        (dest / spot).mkdir(parents=True, exist_ok=True)
        (dest / spot / photo.name).symlink_to(photo.resolve())
    return dest


def bench_ray_build(plan: Any, dataset: Dataset, model: Path, work: Path) -> dict[str, Any]:
    """Local build against the Ray build of the same photos on the same cores."""
    from lite_server.fleet.build import RayExtraction
    from lite_server.fleet.cluster import cluster

    count = min(len(dataset.photos), BUILD_PHOTOS_PER_REPEAT * plan.repeats)
    photos = photo_tree(dataset, count, work / "build-photos")
    cores = os.cpu_count() or 1
    local_extractor, driver = Extractor(model, num_threads=cores), Extractor(model, num_threads=1)
    times: dict[str, list[float]] = {"local": [], "ray": []}
    start = time.perf_counter()
    with cluster(None, num_cpus=cores):
        started = time.perf_counter() - start
        for round_ in range(2 if plan.repeats >= 5 else 1):
            took: dict[str, float] = {}
            with timed(took, "local"):
                local = build_index(photos, work / f"local-{round_}", local_extractor)
            with timed(took, "ray"):
                ray = build_index(photos, work / f"ray-{round_}", driver, extract=RayExtraction())
            for name, seconds in took.items():
                times[name].append(seconds)
    same = bool(np.array_equal(np.asarray(local.features), np.asarray(ray.features)))
    local_rate, ray_rate = count / float(np.median(times["local"])), count / float(np.median(times["ray"]))
    return {"ray_build_photos": count, "ray_build_cores": cores, "ray_cluster_start_s": round(started, 1),
            "local_build_photos_per_s": round(local_rate, 1), "ray_build_photos_per_s": round(ray_rate, 1),
            "ray_build_ratio": round(ray_rate / local_rate, 3), "ray_build_same_features": same,
            "ray_build_rounds": len(times["ray"])}


def bench_ray_serve(plan: Any, folder: Path, extractor: Extractor, qs: np.ndarray, tag: str) -> dict[str, Any]:
    """The cells query through ``serve --ray`` (1 and 2 replicas) against waitress, same gallery."""
    import requests

    from tools.bench.server import bench_throughput
    from tools.bench.timing import cells_bodies, interleaved, median_ms, post, serve
    from tools.live import LiveServer

    waitress = serve(folder)
    out: dict[str, Any] = {"ray_serve_size": tag}
    try:
        bodies = cells_bodies(waitress, extractor, qs)
        out.update(_renamed(bench_throughput(plan, waitress, qs, bodies), "waitress"))
        for replicas in (1, 2):
            ray = LiveServer(folder, "--threads", "4", "--ray", "--replicas", str(replicas), ready_timeout=1800.0)
            try:
                cycle = iter(range(10**9))
                with requests.Session() as session:
                    times = interleaved({name: (lambda u=url: post(session, u, bodies[next(cycle) % len(bodies)]))
                                         for name, url in (("waitress", waitress.url), ("ray", ray.url))},
                                        plan.repeats * 2)
                out[f"http_p50_ms_cells_ray{replicas}_{tag}"] = median_ms(times["ray"])
                out[f"http_p50_ms_cells_waitress_vs_ray{replicas}_{tag}"] = median_ms(times["waitress"])
                out[f"ray_serve_p50_ratio_{replicas}"] = round(median_ms(times["ray"]) / median_ms(times["waitress"]), 3)
                out.update(_renamed(bench_throughput(plan, ray, qs, bodies), f"ray{replicas}"))
            finally:
                ray.stop()
    finally:
        waitress.stop()
    out["ray_serve_p50_ratio"] = max(out["ray_serve_p50_ratio_1"], out["ray_serve_p50_ratio_2"])
    return out


def _renamed(figures: dict[str, Any], server: str) -> dict[str, Any]:
    """``throughput_rps_16`` -> ``throughput_rps_16_cells_<server>``: the same figures per server."""
    return {f"{key}_cells_{server}": value for key, value in figures.items()}


def run_ray_only(plan: Any, work: Path) -> dict[str, Any]:
    """``--only ray``: the build and serving comparisons."""
    from edge_client.config import default_model_path
    from tools.bench.galleries import limited, publish_gallery, queries
    from tools.bench.report import machine, verdicts
    from tools.bench.timing import label
    from tools.dataset import features, load_dataset

    model = default_model_path()
    extractor = Extractor(model)
    dataset = limited(load_dataset(), plan.real_photos)
    result: dict[str, Any] = {"machine": machine(), "plan": asdict(plan), "only": "ray"}
    result.update(bench_ray_build(plan, dataset, model, Path(tempfile.mkdtemp(dir=work))))
    real = features(dataset, extractor)
    folder = work / f"index-{label(plan.target)}"
    publish_gallery(dataset, real, plan.target, extractor, folder)
    result.update(bench_ray_serve(plan, folder, extractor, queries(real, 64), label(plan.target)))
    result["targets"] = verdicts(result)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result
