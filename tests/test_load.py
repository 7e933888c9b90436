"""Load against the production server (waitress in a subprocess, loopback):
no failed request, bounded memory, 503 + Retry-After when saturated, and
index swaps under load that no client notices."""
from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import psutil
import pytest
import requests

from edge_client.privacy.transforms import make_transform
from edge_client.vision.extractor import Extractor
from lite_server.api.app import create_app
from lite_server.api.updates import photo_rows, remove_spots
from lite_server.config import ServerConfig
from lite_server.index.store import Index, publish
from tests.conftest import copy_index
from tools.live import LiveServer, free_port

HEADERS = {"Content-Type": "application/json"}
TOKEN = "load-test-admin-token-0123"


@dataclass
class LoadResult:
    """What a load run saw: latencies of answered requests, failures, RSS samples, versions served."""

    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    versions: set[str] = field(default_factory=set)
    rss: list[int] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")

    def summary(self, clients: int, seconds: float) -> str:
        mb = [r / 2**20 for r in self.rss]
        return (f"{clients} clients x {seconds:.0f} s: {len(self.latencies)} requests, "
                f"{len(self.failures)} failed, p50 {self.percentile(50):.1f} ms, p99 {self.percentile(99):.1f} ms, "
                f"RSS {mb[0]:.1f} -> {mb[-1]:.1f} MB (max {max(mb):.1f})")


def _client_loop(url: str, bodies: list[bytes], stop: threading.Event, result: LoadResult,
                 lock: threading.Lock, ok: Callable[[requests.Response], bool]) -> None:
    """One client: a keep-alive session posting real queries back to back, no retries."""
    with requests.Session() as session:
        n = 0
        while not stop.is_set():
            body = bodies[n % len(bodies)]
            n += 1
            started = time.perf_counter()
            try:
                response = session.post(url + "/v1/candidates", data=body, headers=HEADERS, timeout=30)
                elapsed = time.perf_counter() - started
                good = ok(response)
                version = response.json().get("index_version") if response.status_code == 200 else None
            except (requests.RequestException, ValueError) as exc:
                with lock:
                    result.failures.append(type(exc).__name__)
                continue
            with lock:
                result.statuses[response.status_code] += 1
                if good:
                    result.latencies.append(elapsed)
                    if version:
                        result.versions.add(version)
                else:
                    result.failures.append(f"{response.status_code} {response.text[:80]}")


def run_load(server: LiveServer, bodies: list[bytes], clients: int, seconds: float,
             during: Callable[[], None] | None = None,
             ok: Callable[[requests.Response], bool] = lambda r: r.status_code == 200) -> LoadResult:
    """``clients`` threads for ``seconds`` (after a one-second warm-up that is not counted),
    and with ``during`` for as long as it runs too."""
    result, lock, stop = LoadResult(), threading.Lock(), threading.Event()
    process = psutil.Process(server.process.pid)
    threads = [threading.Thread(target=_client_loop, args=(server.url, bodies, stop, result, lock, ok))
               for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    with lock:
        result.latencies.clear()
        result.statuses.clear()
        result.failures.clear()
    deadline = time.monotonic() + seconds
    if during is not None:
        side = threading.Thread(target=during)
        side.start()
    while time.monotonic() < deadline or (during is not None and side.is_alive()):  # swaps all under load
        result.rss.append(process.memory_info().rss)
        time.sleep(0.5 if during is not None else min(0.5, max(0.0, deadline - time.monotonic())))
    result.rss.append(process.memory_info().rss)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    if during is not None:
        side.join(timeout=120)
    return result


@pytest.fixture(scope="module")
def bodies(extractor: Extractor, held_out: list[tuple[str, Path]]) -> list[bytes]:
    """Real transformed queries, as the phone sends them (noise, k=10)."""
    transform, rng = make_transform("noise", 1.0, 10), np.random.default_rng(0)
    return [json.dumps(transform.transform(extractor.extract(photo), rng), separators=(",", ":")).encode()
            for _, photo in held_out]


def assert_memory_flat(result: LoadResult, slack_mb: float) -> None:
    """Resident memory of the last third of the run is not above the first third's by more than ``slack_mb``."""
    third = max(1, len(result.rss) // 3)
    early, late = np.median(result.rss[:third]), np.median(result.rss[-third:])
    assert (late - early) / 2**20 < slack_mb, result.rss


def test_short_load_no_failures_flat_memory(live_server: LiveServer, bodies: list[bytes],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    result = run_load(live_server, bodies, clients=8, seconds=5)
    assert not result.failures and len(result.latencies) > 50
    assert_memory_flat(result, slack_mb=160)  # a coarse guard: 5 s are mostly allocator and thread warm-up; the 60 s soak is the real check
    with capsys.disabled():
        print(f"\nLOAD (short): {result.summary(8, 5)}")


def test_saturated_request_gets_503_with_retry_after(index_dir: Path) -> None:
    """Deterministic: every lookup slot taken and no waiting room, the next request is refused."""
    app = create_app(ServerConfig(index=str(index_dir), threads=1, max_pending=0))
    admission = app.extensions["enfpire.admission"]
    client = app.test_client()
    body = {"vector": {"dtype": "float16", "shape": [1280], "data": ""}, "k": 1}
    admission.enter()  # the only slot
    try:
        busy = client.post("/v1/candidates", json=body)
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
        assert busy.get_json()["error"]["code"] == "busy"
        assert client.get("/readyz").status_code == 200  # health never waits for a slot
    finally:
        admission.leave()
    assert client.post("/v1/candidates", json=body).status_code == 400  # admitted, then judged


def test_waiting_room_times_out_with_503(index_dir: Path) -> None:
    app = create_app(ServerConfig(index=str(index_dir), threads=1, max_pending=1, queue_timeout=0.05))
    admission = app.extensions["enfpire.admission"]
    admission.enter()
    try:
        response = app.test_client().post("/v1/candidates", json={"k": 1})
        assert response.status_code == 503 and "Retry-After" in response.headers
        assert admission.waiting == 0
    finally:
        admission.leave()


def test_flooded_live_server_refuses_instead_of_queueing(index_dir: Path, bodies: list[bytes]) -> None:
    """One lookup thread, one waiting seat, 16 clients: the rest get 503 + Retry-After, nothing else fails."""
    server = LiveServer(index_dir, env={"ENFPIRE_THREADS": "1", "ENFPIRE_MAX_PENDING": "1",
                                        "ENFPIRE_QUEUE_TIMEOUT": "0.5"})
    try:
        def answered(response: requests.Response) -> bool:
            if response.status_code == 503:
                return response.headers.get("Retry-After") == "1" and response.json()["error"]["code"] == "busy"
            return response.status_code == 200
        result = run_load(server, bodies, clients=16, seconds=3, ok=answered)
        assert requests.get(server.url + "/readyz", timeout=5).status_code == 200
    finally:
        server.stop()
    assert not result.failures, result.failures[:5]
    assert result.statuses[503] > 0 and result.statuses[200] > 0
    assert max(result.latencies) < 5.0  # a refusal or an answer, never a long queue


@pytest.fixture()
def swap_server(index_dir: Path, tmp_path: Path) -> Iterator[tuple[LiveServer, Path, str]]:
    copy = copy_index(index_dir, tmp_path)
    admin_port = free_port()
    server = LiveServer(copy, env={"ENFPIRE_ADMIN_TOKEN": TOKEN, "ENFPIRE_ADMIN_PORT": str(admin_port)})
    yield server, copy, f"http://127.0.0.1:{admin_port}"
    server.stop()


def swapper(server: LiveServer, index_dir: Path, admin_url: str, swaps: int, pause: float) -> Callable[[], None]:
    """Alternately drop a spot and restore the full index, switching by SIGHUP and by admin call."""
    full = Index.load(index_dir)
    spots, rows, features = full.spots, photo_rows(full), np.asarray(full.features)
    manifest = {k: v for k, v in full.manifest.items() if k not in ("index_version", "created")}

    def run() -> None:
        for n in range(swaps):
            if n % 2 == 0:
                version = remove_spots(index_dir, [spots[n % len(spots)].id]).version
                server.process.send_signal(signal.SIGHUP)
            else:
                version = publish(index_dir, manifest, spots, rows, features).version
                reply = requests.post(admin_url + "/admin/v1/reload", timeout=60,
                                      headers={"Authorization": f"Bearer {TOKEN}"})
                assert reply.status_code == 200 and reply.json()["switched"]
            _wait_serving(server, version)
            time.sleep(pause)
    return run


def _wait_serving(server: LiveServer, version: str, timeout: float = 60.0) -> None:
    """Until the server answers with ``version`` (a reload builds the new lookup first)."""
    deadline = time.monotonic() + timeout
    while requests.get(server.url + "/readyz", timeout=10).json()["index_version"] != version:
        assert time.monotonic() < deadline, f"the server never switched to {version}"
        time.sleep(0.05)


def test_index_swaps_under_load_fail_no_request(swap_server: tuple[LiveServer, Path, str],
                                                bodies: list[bytes], capsys: pytest.CaptureFixture[str]) -> None:
    server, index_dir, admin_url = swap_server
    result = run_load(server, bodies, clients=4, seconds=4, during=swapper(server, index_dir, admin_url, 4, 0.6))
    assert not result.failures, result.failures[:5]
    assert len(result.versions) >= 4, result.versions  # the clients really saw the swaps
    with capsys.disabled():
        print(f"\nSWAP (short): 4 swaps, {len(result.versions)} versions served, {result.summary(4, 4)}")


@pytest.mark.soak
def test_soak_32_clients_60_seconds_with_swaps(swap_server: tuple[LiveServer, Path, str], bodies: list[bytes],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    server, index_dir, admin_url = swap_server
    steady = run_load(server, bodies, clients=32, seconds=60)
    swapped = run_load(server, bodies, clients=32, seconds=30,
                       during=swapper(server, index_dir, admin_url, 10, 2.0))
    with capsys.disabled():
        print(f"\nLOAD (soak): {steady.summary(32, 60)}, statuses {dict(steady.statuses)}")
        print(f"SWAP (soak): 10 swaps under load, {len(swapped.versions)} versions served, "
              f"{swapped.summary(32, 30)}, statuses {dict(swapped.statuses)}")
    assert not steady.failures, Counter(steady.failures).most_common(5)
    assert_memory_flat(steady, slack_mb=20)
    assert not swapped.failures, Counter(swapped.failures).most_common(5)
    assert len(swapped.versions) >= 10
