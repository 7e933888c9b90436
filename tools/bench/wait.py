"""The user's wait: time to the answer with every defence on against none, direct and through Oblivious HTTP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.client import Client
from edge_client.config import ClientConfig
from edge_client.dummies.generator import PersonaGenerator
from edge_client.dummies.scheduler import DummyScheduler
from edge_client.vision.extractor import Extractor
from tools.bench.plan import Plan
from tools.bench.timing import cells_bodies, interleaved, median_ms
from tools.dataset import Dataset
from tools.live import LiveRelay, LiveServer


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
