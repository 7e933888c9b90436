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
- Ray (``--only ray``, the ray extra; see ``tools.bench_ray``): a Ray index build
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
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edge_client import interpreter as tfl
from edge_client.client import Client
from edge_client.config import ClientConfig, default_model_path
from edge_client.dummies import PersonaGenerator
from edge_client.extractor import Extractor, l2_normalize
from edge_client.frame import Frame
from edge_client.scheduler import DummyScheduler
from edge_client.transforms import make_transform
from lite_server.backends import FaissBackend, QuantizedBackend, SklearnBackend
from lite_server.index import Index, base_manifest, publish
from tools.dataset import Dataset, features, load_dataset
from tools.bench_catalogue import TARGETS as CATALOGUE_TARGETS
from tools.bench_catalogue import plot_catalogue, run_catalogue
from tools.live import LiveRelay, LiveServer
from tools.timing import cells_bodies, interleaved, label, median_ms, post, save_plot, serve, timed

JITTER = 0.1
K_PRIVATE = 40
TARGETS = {  # key: (limit, "max" = at most / "min" = at least)
    "extract_ratio_224": 1.3, "extract_ratio_12mp": 3.0, "extract_ratio_camera_frame": 1.3,
    "lookup_ratio_vs_faiss_100k": 1.5,
    "http_p50_ms_100k": 30.0, "rss_mb_1m": 1500.0, "private_vs_plain_ratio": 1.5,
    "answer_added_latency_s": 0.5,
    "ohttp_vs_direct_ratio": 1.3,
    **CATALOGUE_TARGETS,
    "ray_build_ratio": (0.8, "min"), "ray_serve_p50_ratio": 1.5,
}
ONLY = ("answer-latency", "ohttp", "extract", "catalogue", "ray")


@dataclass(frozen=True)
class Plan:
    """How much to measure: gallery sizes, which get a server, repeats."""

    sizes: tuple[int, ...]
    served: tuple[int, ...]      # sizes measured through a real server (memory, HTTP)
    target: int                  # the size of the HTTP, throughput and private-query figures
    repeats: int
    sklearn_up_to: int           # the old default is slow: only up to this size
    photos_12mp: int             # real photos made 12 MP for the cosine figure
    load_seconds: float          # the 16-client throughput run
    clients: int = 16
    real_photos: int = 0         # 0 = every dataset photo; fewer skips extracting all 4,625 (smoke)
    spots: tuple[int, ...] = (1_000, 10_000, 100_000)  # synthetic catalogues (tools.bench_catalogue)


PLANS = {
    "full": Plan((10_000, 100_000, 1_000_000), (10_000, 100_000, 1_000_000), 100_000, 25, 100_000, 16, 10.0),
    # Under a minute: the 100k lookup in-process, the server only at 10k.
    "quick": Plan((10_000, 100_000), (10_000,), 10_000, 5, 10_000, 3, 3.0, spots=(1_000, 10_000)),
    "smoke": Plan((3_000,), (3_000,), 3_000, 3, 3_000, 1, 1.0, clients=4, real_photos=300, spots=(300,)),
}


# ---------------------------------------------------------------- phone side

def twelve_megapixel(photo: Path) -> bytes:
    """A real photo upscaled to 4000x3000 and saved as a JPEG, like a phone's."""
    big = Image.open(photo).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def camera_frames(photo: Path) -> dict[str, Any]:
    """The photo as a 640x480 camera hands it over: CameraX RGBA_8888 (the headline), NV21, a thumbnail JPEG."""
    scene = Image.open(photo).convert("RGB").resize((640, 480), Image.Resampling.BICUBIC)
    rgb = np.asarray(scene)
    y, cb, cr = (np.asarray(p) for p in scene.convert("YCbCr").split())
    vu = np.stack([np.asarray(Image.fromarray(c).reduce(2)) for c in (cr, cb)], -1)
    thumbnail = io.BytesIO()
    scene.save(thumbnail, "JPEG", quality=90)
    return {"frame": Frame(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]).tobytes(), 640, 480, "rgba"),
            "frame_nv21": Frame(y.tobytes() + vu.tobytes(), 640, 480, "nv21"), "thumbnail": thumbnail.getvalue()}


def bench_extraction(plan: Plan, extractor: Extractor, dataset: Dataset) -> dict[str, Any]:
    """Extraction against bare ``invoke()`` of a second interpreter of the same model."""
    photo = dataset.photos[0][1]
    jpeg = twelve_megapixel(photo)
    bare, _ = tfl.make_interpreter(str(extractor.model_path), extractor.num_threads)
    details = bare.get_input_details()[0]
    bare.set_tensor(details["index"], tfl.quantize_input(extractor.preprocess(photo), details, 128.0, 128.0))
    frames = camera_frames(photo)
    times = interleaved({"bare": bare.invoke, "224": lambda: extractor.extract(photo),
                         "12mp": lambda: extractor.extract(jpeg),
                         **{name: (lambda f=f: extractor.extract(f)) for name, f in frames.items()}}, plan.repeats * 2)
    cosines = [float(extractor.extract(big) @ extractor.extract(big, fast=False)) for big in
               (twelve_megapixel(p) for _, p in dataset.photos[::max(1, len(dataset.photos) // plan.photos_12mp)]
                [:plan.photos_12mp])]
    out = {"extract_threads": extractor.num_threads, "extract_bare_ms": median_ms(times["bare"]),
           "extract_224_ms": median_ms(times["224"]), "extract_12mp_ms": median_ms(times["12mp"]),
           "extract_12mp_jpeg_bytes": len(jpeg),
           "extract_cosine_fast_vs_careful_min": round(min(cosines), 5),
           "extract_cosine_fast_vs_careful_median": round(float(np.median(cosines)), 5),
           "extract_cosine_photos": len(cosines)}
    out["extract_ratio_224"] = round(out["extract_224_ms"] / out["extract_bare_ms"], 3)
    out["extract_ratio_12mp"] = round(out["extract_12mp_ms"] / out["extract_bare_ms"], 3)
    for name in frames:  # 640x480: a camera frame (RGBA, NV21) or a thumbnail JPEG
        out[f"extract_{name}_ms"] = median_ms(times[name])
    out["extract_ratio_camera_frame"] = round(out["extract_frame_ms"] / out["extract_bare_ms"], 3)
    return {**out, **bench_extract_many(plan, extractor, dataset)}


def bench_extract_many(plan: Plan, extractor: Extractor, dataset: Dataset) -> dict[str, Any]:
    """Index-build throughput: decode-ahead ``extract_many`` against one photo after another."""
    photos = [p for _, p in dataset.photos[:10 * plan.repeats]]
    start = time.perf_counter()
    for p in photos:
        extractor.extract(p)
    sequential = len(photos) / (time.perf_counter() - start)
    start = time.perf_counter()
    list(extractor.extract_many(photos))
    overlapped = len(photos) / (time.perf_counter() - start)
    return {"extract_sequential_photos_per_s": round(sequential, 1),
            "extract_many_photos_per_s": round(overlapped, 1)}


# ---------------------------------------------------------------- galleries

def limited(dataset: Dataset, photos: int) -> Dataset:
    """The first ``photos`` photos (0 = all) and only their spots."""
    if not photos:
        return dataset
    kept = dataset.photos[:photos]
    return Dataset(dataset.root, kept, {s: dataset.spots[s] for s in sorted({s for s, _ in kept})})


def tiled(real: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` float16 unit rows: the real features, then jittered copies of them."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, real.shape[1]), np.float16)
    for start in range(0, n, 50_000):
        rows = np.arange(start, min(n, start + 50_000))
        block = real[rows % len(real)]
        copies = rows >= len(real)
        block[copies] *= np.exp(JITTER * rng.standard_normal((int(copies.sum()), real.shape[1]), np.float32))
        out[rows] = l2_normalize(block)
    return out


def publish_gallery(dataset: Dataset, real: np.ndarray, n: int, extractor: Extractor, out: Path) -> Index:
    """An index directory the real server can load, of ``n`` tiled features."""
    spot_ids = sorted(dataset.spots)
    photo_rows = np.arange(n) % len(real)
    rows = ((dataset.photos[r][0], f"{dataset.photos[r][1].name}#{i}") for i, r in enumerate(photo_rows))
    manifest = {**base_manifest(extractor, len(spot_ids), n), "bench": f"tiled x{n / len(real):.1f}"}
    return publish(out, manifest, [dataset.spots[s] for s in spot_ids], rows, tiled(real, n))


def queries(real: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    """Jittered real features: near, never equal to, gallery rows."""
    rng = np.random.default_rng(seed)
    usable = np.flatnonzero(np.linalg.norm(real, axis=1) > 0)  # undecodable photos have zero rows
    picked = real[rng.choice(usable, count, replace=False)]
    return l2_normalize(picked * np.exp(JITTER * rng.standard_normal(picked.shape, np.float32)))


# ---------------------------------------------------------------- in-process lookup

def bench_lookup(plan: Plan, index: Index, qs: np.ndarray) -> dict[str, Any]:
    """Single-query top-160 (k=40 spots) of the default against FAISS flat IP (and sklearn)."""
    n, tag = len(index.features), label(len(index.features))
    ours = QuantizedBackend().add(np.asarray(index.features))
    peers: dict[str, Any] = {"faiss_flat": FaissBackend().add(np.asarray(index.features, np.float32))}
    if n <= plan.sklearn_up_to:
        peers["sklearn"] = SklearnBackend().add(np.asarray(index.features, np.float32))
    cycle = iter(range(10**9))
    one = lambda: qs[next(cycle) % len(qs)][None]  # noqa: E731 - a fresh query each call
    fns = {"ours": lambda: ours.search(one(), 4 * K_PRIVATE)}
    fns.update({name: (lambda b=b: b.search(one(), 4 * K_PRIVATE)) for name, b in peers.items()})
    times = interleaved(fns, plan.repeats if n < 1_000_000 else max(3, plan.repeats // 5))
    same = np.mean(ours.search(qs[:8], 4 * K_PRIVATE)[1] == peers["faiss_flat"].search(qs[:8], 4 * K_PRIVATE)[1])
    out = {f"lookup_ms_{tag}": median_ms(times["ours"]), f"faiss_flat_ms_{tag}": median_ms(times["faiss_flat"]),
           f"same_rows_as_faiss_{tag}": round(float(same), 4),
           f"rescored_rows_{tag}": int(np.median([len(ours._candidates(ours.approximate(q[None])[0], 1.0, 160))
                                                 for q in qs[:8]]))}
    if "sklearn" in times:
        out[f"sklearn_ms_{tag}"] = median_ms(times["sklearn"])
    out[f"lookup_ratio_vs_faiss_{tag}"] = round(out[f"lookup_ms_{tag}"] / out[f"faiss_flat_ms_{tag}"], 3)
    return {**out, **bench_batch(ours, qs, tag, times["ours"])}


def bench_batch(ours: QuantizedBackend, qs: np.ndarray, tag: str, single: list[float]) -> dict[str, Any]:
    """16 queries in one search against 16 single searches."""
    times = interleaved({"batch": lambda: ours.search(qs[:16], 4 * K_PRIVATE)}, 3, warmup=1)
    return {f"lookup_batch16_ms_{tag}": median_ms(times["batch"]),
            f"lookup_batch16_speedup_{tag}": round(16 * float(np.median(single)) / float(np.median(times["batch"])), 2)}


# ---------------------------------------------------------------- the real server

def private_bodies(qs: np.ndarray, k: int = K_PRIVATE) -> list[bytes]:
    """Noise-transformed query bodies: a vector query, the one that makes the server scan."""
    transform, rng = make_transform("noise", k=k), np.random.default_rng(2)
    return [json.dumps(transform.transform(q, rng), separators=(",", ":")).encode() for q in qs]


def bench_http(plan: Plan, server: LiveServer, extractor: Extractor, qs: np.ndarray, tag: str) -> dict[str, Any]:
    """Sequential round trips of vector (noise, k=40) and of cells queries, then memory."""
    import requests

    bodies = {"vector": private_bodies(qs), "cells": cells_bodies(server, extractor, qs)}
    sizes: dict[str, list[int]] = {name: [] for name in bodies}
    with requests.Session() as session:
        def one(name: str) -> None:
            sizes[name].append(post(session, server.url, bodies[name][len(sizes[name]) % len(qs)]))

        times = interleaved({name: (lambda n=name: one(n)) for name in bodies}, plan.repeats * 2)
    rss, peak = server.memory_mb()
    return {f"http_p50_ms_{tag}": median_ms(times["vector"]),
            f"http_p95_ms_{tag}": round(float(np.percentile(times["vector"], 95)) * 1e3, 3),
            f"http_p50_ms_cells_{tag}": median_ms(times["cells"]),
            f"response_bytes_k40_{tag}": int(np.median(sizes["vector"])), f"request_bytes_{tag}": len(bodies["vector"][0]),
            f"response_bytes_cells_{tag}": int(np.median(sizes["cells"])),
            f"rss_mb_{tag}": rss, f"rss_peak_mb_{tag}": peak}


def bench_throughput(plan: Plan, server: LiveServer, qs: np.ndarray, bodies: list[bytes] | None = None) -> dict[str, Any]:
    """``plan.clients`` clients posting private queries (``bodies``, default vector ones) back to
    back for ``plan.load_seconds``."""
    import requests

    bodies = bodies or private_bodies(qs)
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + plan.load_seconds

    def client(i: int) -> None:
        with requests.Session() as session:
            while time.monotonic() < stop:
                start = time.perf_counter()
                post(session, server.url, bodies[i % len(bodies)])
                with lock:
                    latencies.append(time.perf_counter() - start)
                i += plan.clients

    start = time.perf_counter()
    with ThreadPoolExecutor(plan.clients) as pool:
        list(pool.map(client, range(plan.clients)))
    elapsed = time.perf_counter() - start
    return {f"throughput_rps_{plan.clients}": round(len(latencies) / elapsed, 1),
            f"http_p50_ms_under_load_{plan.clients}": median_ms(latencies),
            f"http_p95_ms_under_load_{plan.clients}": round(float(np.percentile(latencies, 95)) * 1e3, 1)}


def bench_private(plan: Plan, server: LiveServer, extractor: Extractor, qs: np.ndarray) -> dict[str, Any]:
    """The whole private query (transform, request, response, local rerank; no dummies) of the
    default transform (cells) and of a vector one (noise, k=40), against a plain one (raw
    feature, k=1), all through the real client."""
    clients = {name: Client(ClientConfig(server=server.url, transform=name, seed=3, cache=False), extractor=extractor)
               for name in ("cells", "noise", "none")}
    cycle = iter(range(10**9))
    times = interleaved({name: (lambda c=c: c.ask(qs[next(cycle) % len(qs)])) for name, c in clients.items()},
                        plan.repeats * 2)
    answers = {name: c.ask(qs[0]) for name, c in clients.items()}
    for c in clients.values():
        c.close()
    out: dict[str, Any] = {"plain_ms": median_ms(times["none"]),
                           "plain_bytes_received": answers["none"][1].bytes_received}
    for name, key in (("cells", "private"), ("noise", "private_noise")):
        body, result = answers[name]
        out.update({f"{key}_ms": median_ms(times[name]), f"{key}_bytes_received": result.bytes_received,
                    f"{key}_candidates": len(result.candidates), f"{key}_k": body.get("k")})
        out[f"{key}_vs_plain_ratio"] = round(out[f"{key}_ms"] / out["plain_ms"], 3)
    return out


# ---------------------------------------------------------------- the user's wait

def answer_plain(url: str, extractor: Extractor, photo: Path) -> float:
    """Seconds to the answer with no defence: a fresh client (as a CLI run has), no dummies."""
    start = time.perf_counter()
    with Client(ClientConfig(server=url, dummies=0, cache=False), extractor=extractor) as client:
        client.recognize(photo)
        return time.perf_counter() - start


def answer_defended(url: str, extractor: Extractor, photo: Path) -> tuple[float, float]:
    """(seconds to the answer, seconds until the whole burst left) with every default defence,
    through the CLI's one-shot path: a fresh client, catalogue fetch, persona dummies, and an
    answer cache that misses (a new landmark: the cost of keeping its answer included)."""
    start = time.perf_counter()
    answered: list[float] = []
    with tempfile.TemporaryDirectory() as state, \
            Client(ClientConfig(server=url, state_dir=state), extractor=extractor) as client:
        scheduler = DummyScheduler(client, lambda: PersonaGenerator.from_client(client))
        scheduler.recognize_once(photo, lambda _: answered.append(time.perf_counter() - start))
    return answered[0], time.perf_counter() - start


def answer_long_lived(plan: Plan, url: str, extractor: Extractor, photos: list[Path]) -> dict[str, list[float]]:
    """The app's case: one running scheduler (and one warm client) for many photos. Without the
    answer cache: it would answer the repeated photos without a request and flatter the figure."""
    plain = Client(ClientConfig(server=url, dummies=0, cache=False), extractor=extractor)
    defended = Client(ClientConfig(server=url, cache=False), extractor=extractor)
    scheduler = DummyScheduler(defended, lambda: PersonaGenerator.from_client(defended)).start()
    cycle = iter(range(10**9))
    try:
        return interleaved({"none": lambda: plain.recognize(photos[next(cycle) % len(photos)]),
                            "defended": lambda: scheduler.recognize(photos[next(cycle) % len(photos)])},
                           plan.repeats * 2)
    finally:
        scheduler.stop(timeout=60)
        plain.close()
        defended.close()


def answer_cli(url: str, photo: Path, *flags: str) -> float:
    """Seconds from starting ``enfpire-client recognize`` until its answer line is out."""
    with tempfile.TemporaryDirectory() as state:  # an empty answer cache: this photo is news
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "edge_client.cli", "recognize", str(photo), "--server", url,
                                    "--json", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "ENFPIRE_STATE_DIR": state})
        line = process.stdout.readline() if process.stdout else ""
        took = time.perf_counter() - start
        _, errors = process.communicate(timeout=120)
    if process.returncode != 0 or "spot_id" not in line:
        raise RuntimeError(f"enfpire-client recognize {' '.join(flags)} failed: {line!r} {errors[-1000:]}")
    return took


def bench_answer_latency(plan: Plan, server: LiveServer, extractor: Extractor, dataset: Dataset) -> dict[str, Any]:
    """The user's added wait: p50 time to the answer with every default defence on minus
    the same with none, one-shot (library, as the CLI runs it; and the CLI itself) and long-lived."""
    photos = [p for _, p in dataset.photos[::max(1, len(dataset.photos) // 16)]][:16]
    times: dict[str, list[float]] = {"none": [], "defended": [], "burst": [], "cli_none": [], "cli_defended": []}
    for round_ in range(2 + plan.repeats * 2):
        photo = photos[round_ % len(photos)]
        plain, (answer, burst) = answer_plain(server.url, extractor, photo), answer_defended(server.url, extractor, photo)
        if round_ >= 2:
            times["none"].append(plain)
            times["defended"].append(answer)
            times["burst"].append(burst)
    for round_ in range(min(10, max(2, plan.repeats - 2))):
        times["cli_none"].append(answer_cli(server.url, photos[round_ % len(photos)], "--no-dummies"))
        times["cli_defended"].append(answer_cli(server.url, photos[round_ % len(photos)]))
    long = answer_long_lived(plan, server.url, extractor, photos)
    p50 = {name: float(np.median(values)) for name, values in {**times, **{f"long_{k}": v for k, v in long.items()}}.items()}
    out = {f"answer_{name}_p50_s": round(value, 4) for name, value in p50.items()}
    out["answer_added_latency_s"] = round(p50["defended"] - p50["none"], 4)
    out["answer_added_latency_p95_s"] = round(float(np.percentile(times["defended"], 95)) - p50["none"], 4)
    out["answer_added_latency_long_lived_s"] = round(p50["long_defended"] - p50["long_none"], 4)
    out["answer_added_latency_cli_s"] = round(p50["cli_defended"] - p50["cli_none"], 4)
    out["answer_latency_rounds"] = {"one_shot": len(times["none"]), "cli": len(times["cli_none"]),
                                    "long_lived": len(long["none"])}
    return out


def bench_ohttp(plan: Plan, server: LiveServer, extractor: Extractor, qs: np.ndarray, tag: str) -> dict[str, Any]:
    """The cells query through the real client: direct against client -> relay -> gateway, interleaved."""
    bodies = [json.loads(b) for b in cells_bodies(server, extractor, qs)]
    relay = LiveRelay(server, "127.0.0.2")
    try:
        with tempfile.TemporaryDirectory(prefix="enfpire-pins-") as state:
            clients = {"direct": Client(ClientConfig(server=server.url, seed=4), extractor=extractor),
                       "ohttp": Client(ClientConfig(server=server.url, seed=4, relay=relay.url, state_dir=state),
                                       extractor=extractor)}
            counters = {name: iter(range(10**9)) for name in clients}
            times = interleaved({name: (lambda n=name: clients[n].query(bodies[next(counters[n]) % len(bodies)]))
                                 for name in clients}, plan.repeats * 4)
            sizes = {name: c.query(bodies[0])[1:] for name, c in clients.items()}
            for c in clients.values():
                c.close()
    finally:
        relay.stop()
    out = {f"http_p50_ms_cells_client_{tag}": median_ms(times["direct"]),
           f"http_p50_ms_cells_ohttp_{tag}": median_ms(times["ohttp"]),
           "ohttp_bytes_sent": sizes["ohttp"][0], "ohttp_bytes_received": sizes["ohttp"][1],
           "direct_bytes_sent": sizes["direct"][0], "direct_bytes_received": sizes["direct"][1], "ohttp_size": tag}
    out["ohttp_vs_direct_ratio"] = round(out[f"http_p50_ms_cells_ohttp_{tag}"] / out[f"http_p50_ms_cells_client_{tag}"], 3)
    return out


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


# ---------------------------------------------------------------- run, report

def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


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


def spots_answered(server: LiveServer, qs: np.ndarray) -> list[list[str]]:
    """The candidate spot ids the server returns for each vector (noise, k=40) query."""
    import requests

    with requests.Session() as session:
        answers = [session.post(server.url + "/v1/candidates", data=body, headers={"Content-Type": "application/json"})
                   for body in private_bodies(qs)]
    return [[c["id"] for c in answer.json()["candidates"]] for answer in answers]


def bench_ivf_server(plan: Plan, folder: Path, qs: np.ndarray, exact: list[list[str]], tag: str) -> dict[str, Any]:
    """The same vector queries against a server on the approximate ``faiss-ivf`` backend:
    its latency, and how many of the exact default's candidate spots it still returns."""
    import requests

    bodies = private_bodies(qs)
    server = serve(folder, backend="faiss-ivf")
    try:
        cycle = iter(range(10**9))
        with requests.Session() as session:
            times = interleaved({"post": lambda: post(session, server.url, bodies[next(cycle) % len(bodies)])},
                                plan.repeats * 2)
        answered = spots_answered(server, qs)
    finally:
        server.stop()
    recall = np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(answered, exact)])
    return {f"http_p50_ms_faiss_ivf_{tag}": median_ms(times["post"]),
            f"faiss_ivf_spot_recall_{tag}": round(float(recall), 4)}


def verdicts(result: dict[str, Any]) -> dict[str, Any]:
    """Each issue target: its measured value, the limit, whether it is met (None: not measured)."""
    out = {}
    for key, target in TARGETS.items():
        limit, sense = target if isinstance(target, tuple) else (target, "max")
        value = result.get(key)
        met = None if value is None else bool(value >= limit if sense == "min" else value <= limit)
        out[key] = {"value": value, "limit": limit, "sense": sense, "met": met}
    return out


def table(result: dict[str, Any]) -> str:
    """The markdown table of targets for BENCHMARKS.md."""
    lines = ["| figure | measured | target | met |", "| --- | --- | --- | --- |"]
    for key, verdict in result["targets"].items():
        met = {True: "yes", False: "**no**", None: "not measured"}[verdict["met"]]
        sign = ">=" if verdict.get("sense") == "min" else "<="
        lines.append(f"| `{key}` | {verdict['value']} | {sign} {verdict['limit']} | {met} |")
    sections = result.get("section_seconds") or result.get("catalogue_seconds") or {}
    if sections:
        lines += ["", "Seconds by section: " + ", ".join(f"{name} {s}" for name, s in sections.items()) + "."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Lookup time and memory against gallery size, log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["plan"]["sizes"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, name in (("lookup_ms", "default (uint8 scan + exact re-score)"), ("faiss_flat_ms", "FAISS IndexFlatIP"),
                      ("sklearn_ms", "scikit-learn brute (old default)"),
                      ("http_p50_ms", "HTTP /v1/candidates, vector k=40"),
                      ("http_p50_ms_cells", "HTTP /v1/candidates, cells (default)")):
        points = [(n, result[f"{key}_{label(n)}"]) for n in sizes if f"{key}_{label(n)}" in result]
        if points:
            left.plot(*zip(*points), marker="o", label=name)
    left.set(xscale="log", yscale="log", xlabel="gallery size (features)", ylabel="ms per single query",
             title="Lookup time")
    points = [(n, result[f"rss_mb_{label(n)}"]) for n in sizes if f"rss_mb_{label(n)}" in result]
    if points:
        right.plot(*zip(*points), marker="o", label="server RSS (measured)")
    right.plot(sizes, [n * 1280 * 4 / 2**20 for n in sizes], "--", label="float32 matrix (FAISS flat)")
    right.plot(sizes, [n * 1280 / 2**20 for n in sizes], ":", label="uint8 codes")
    right.axhline(1500, color="red", linewidth=0.8, label="1.5 GB target")
    right.set(xscale="log", yscale="log", xlabel="gallery size (features)", ylabel="MB", title="Memory")
    save_plot(fig, (left, right), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools.bench", description=__doc__.splitlines()[0])
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
        from tools.bench_ray import run_ray_only

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
