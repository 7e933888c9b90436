"""The real server on loopback: latency, throughput, memory, private against plain queries, FAISS IVF."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.client import Client
from edge_client.config import ClientConfig
from edge_client.privacy.transforms import make_transform
from edge_client.vision.extractor import Extractor
from tools.bench.plan import K_PRIVATE, Plan
from tools.bench.timing import cells_bodies, interleaved, median_ms, post, serve
from tools.live import LiveServer


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
