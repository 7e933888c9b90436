"""Timing helpers shared by the benchmarks: labels, medians, interleaved repeats,
the real server on loopback, the default query's bodies, and how their plots are finished."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from edge_client.client import Client
from edge_client.config import ClientConfig
from edge_client.protocol.public import PublicParams, parse
from edge_client.vision.extractor import Extractor
from tools.live import LiveServer


def label(n: int) -> str:
    """10000 -> "10k", 1000000 -> "1m"."""
    for unit, name in ((1_000_000, "m"), (1_000, "k")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{name}"
    return str(n)


def median_ms(samples: list[float]) -> float:
    return round(float(np.median(samples)) * 1e3, 3)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each call, ``repeats`` rounds of all of them in turn, after ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


@contextmanager
def timed(into: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall seconds of the ``with`` body as ``into[name]``: where a run's time goes
    (the full plan must fit in 15 minutes)."""
    started = time.monotonic()
    try:
        yield
    finally:
        into[name] = round(time.monotonic() - started, 3)


def serve(index: Path, backend: str | None = None) -> LiveServer:
    """The real server on ``index`` with 4 threads; a 1M index may take minutes to load."""
    return LiveServer(index, "--threads", "4", *(["--backend", backend] if backend else []), ready_timeout=1800.0)


def get_public(server: LiveServer) -> tuple[PublicParams, int]:
    """The server's public document as a phone receives it: parsed, and its bytes on the wire (gzipped)."""
    import requests

    response = requests.get(server.url + "/v1/public", headers={"Accept-Encoding": "gzip"}, timeout=600)
    response.raise_for_status()
    if response.headers.get("Content-Encoding") != "gzip":
        raise RuntimeError("the server sent its public document without gzip")
    return parse(response.json()), int(response.headers["Content-Length"])


def post(session: Any, url: str, body: bytes) -> int:
    """One candidates round trip; the response's bytes."""
    response = session.post(url + "/v1/candidates", data=body, headers={"Content-Type": "application/json"})
    response.raise_for_status()
    return len(response.content)


def cells_bodies(server: LiveServer, extractor: Extractor, qs: np.ndarray) -> list[bytes]:
    """Bodies of the default transform (cells), fitted to the server's public parameters."""
    with Client(ClientConfig(server=server.url, transform="cells", seed=2, cache=False), extractor=extractor) as client:
        client.check_model()
        return [json.dumps(client.transform.transform(q, client.rng), separators=(",", ":")).encode() for q in qs]


def save_plot(fig: Any, panels: tuple[Any, ...], path: Path) -> None:
    """Grid and legend on every panel, then the figure written to ``path`` and closed."""
    import matplotlib.pyplot as plt

    for axes in panels:
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
