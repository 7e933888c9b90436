"""Beyond one machine: the Ray build and Ray Serve, each on a real local Ray cluster that the
command itself starts (as an operator's one command would) and shuts down again.

- the Ray build of real photos (one unreadable) equals the local build bit for bit, although
  one worker is killed with SIGKILL while batches are in flight;
- ``serve --ray --replicas 2`` answers as waitress does, ``/readyz`` speaks for both replicas,
  and index swaps under 16 clients fail no request (``make soak``: Serve takes minutes to start here);
- without Ray, ``--ray`` is a clear error naming the extra.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import pytest
import requests

from edge_client.client import Client
from edge_client.config import ClientConfig
from edge_client.vision.extractor import Extractor
from lite_server.api.updates import photo_rows
from lite_server.index.store import Index, build_index
from tests.conftest import copy_index, make_subset
from tests.test_hygiene import ALLOWED_HEADERS
from tests.test_load import TOKEN, bodies, run_load, swapper  # noqa: F401  (bodies: a fixture)
from tools.live import LiveServer, free_port

pytest.importorskip("ray", reason="the ray extra is not installed")
ROOT = Path(__file__).resolve().parent.parent
TIMING = ("index_version", "created")


def _cli(*args: str, block_ray: bool = False) -> list[str]:
    """``enfpire-server ARGS`` in a fresh interpreter; ``block_ray`` makes ``import ray`` fail there."""
    prelude = "import sys; sys.modules['ray'] = None; " if block_ray else "import sys; "
    return [sys.executable, "-c", prelude + f"from lite_server.cli import main; sys.exit(main({list(args)!r}))"]


def _same_index(a: Index, b: Index) -> None:
    assert a.spots == b.spots
    assert photo_rows(a) == photo_rows(b)
    assert np.array_equal(np.asarray(a.features).view(np.uint16), np.asarray(b.features).view(np.uint16))
    assert {k: v for k, v in a.manifest.items() if k not in TIMING} == \
        {k: v for k, v in b.manifest.items() if k not in TIMING}


def _ray_workers(parent: psutil.Process) -> list[psutil.Process]:
    """The build's extraction actors among ``parent``'s descendants (its own local cluster)."""
    found = []
    for child in parent.children(recursive=True):
        try:
            if "ExtractBatch" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def test_ray_build_equals_local_build_though_a_worker_is_killed(tmp_path: Path, extractor: Extractor) -> None:
    data = make_subset(tmp_path / "data", spots=8)
    first = sorted((data / "images").iterdir())[0]
    (first / "zz-unreadable.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    local = build_index(data / "images", tmp_path / "local", extractor, data / "landmarks.csv")
    assert local.manifest["skipped"] == 1

    log = tempfile.TemporaryFile()
    build = subprocess.Popen(_cli("-v", "index", "build", "--photos", str(data / "images"), "--spots",
                                  str(data / "landmarks.csv"), "--out", str(tmp_path / "ray"), "--ray",
                                  "--batch-size", "8"), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    killed, cluster = None, []
    try:
        deadline = time.monotonic() + 240
        while killed is None and build.poll() is None and time.monotonic() < deadline:
            log.seek(0)
            if b"photos extracted" in log.read():  # batches are landing: the pool is mid-build
                workers = _ray_workers(psutil.Process(build.pid))
                cluster = psutil.Process(build.pid).children(recursive=True)
                if workers:
                    killed = workers[0].pid
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        assert build.wait(timeout=300) == 0
    finally:
        if build.poll() is None:
            build.terminate()
            build.wait(timeout=60)
        log.seek(0)
        output = log.read().decode(errors="replace")
    assert killed is not None, f"no worker to kill while the build ran: {output[-2000:]}"
    assert "skipped 1 undecodable photo(s)" in output
    _same_index(local, Index.load(tmp_path / "ray"))
    time.sleep(2)
    assert cluster and not [p.pid for p in cluster if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _recognitions(url: str, extractor: Extractor, photos: list[Path]) -> list[tuple[Any, ...]]:
    """What the phone's client answers for ``photos`` through the server at ``url`` (default
    transform, the cells query; no dummies, no cache): spot, ranked candidates, score."""
    with Client(ClientConfig(server=url, dummies=0, seed=2, cache=False), extractor=extractor) as client:
        answers = [client.recognize(photo) for photo in photos]
    return [(a.spot_id, [c.id for c in a.candidates], round(a.score, 3)) for a in answers]


@pytest.fixture(scope="module")
def ray_server(index_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path, str]]:
    """``serve --ray --replicas 2`` on a private copy of the suite's index, admin API on."""
    copy = copy_index(index_dir, tmp_path_factory.mktemp("ray-index"))
    admin_port = free_port()
    server = LiveServer(copy, "--ray", "--replicas", "2", ready_timeout=300.0,
                        env={"ENFPIRE_ADMIN_TOKEN": TOKEN, "ENFPIRE_ADMIN_PORT": str(admin_port)})
    yield server, copy, f"http://127.0.0.1:{admin_port}"
    output = server.stop()
    assert "Traceback" not in output, output[-3000:]
    assert not [c for c in psutil.Process().children(recursive=True) if c.pid == server.process.pid]


@pytest.mark.soak  # a Ray cluster and Serve start take a minute or more on two busy cores
def test_serve_ray_answers_as_waitress_does(ray_server: tuple[LiveServer, Path, str], live_server: LiveServer,
                                            bodies: list[bytes], extractor: Extractor,  # noqa: F811
                                            held_out: list[tuple[str, Path]]) -> None:
    """Same recognitions, candidates, public document and /v1/info."""
    server, _, _ = ray_server
    ready = requests.get(server.url + "/readyz", timeout=10).json()
    assert ready["replicas"] == {"wanted": 2, "ready": 2} and len(ready["index_versions"]) == 1
    photos = [photo for _, photo in held_out[:10]]
    assert _recognitions(server.url, extractor, photos) == _recognitions(live_server.url, extractor, photos)
    with requests.Session() as ray_session, requests.Session() as waitress:
        assert ray_session.get(server.url + "/openapi.json").json() == waitress.get(live_server.url + "/openapi.json").json()
        # The public structure is derived once, stored in the index version and loaded by every
        # process: the public document and /v1/info are the same to the byte.
        for path in ("/v1/public", "/v1/info"):
            answers = [s.get(url + path) for s, url in ((ray_session, server.url), (waitress, live_server.url))]
            assert [a.status_code for a in answers] == [200, 200] and answers[0].content == answers[1].content, path
        for body in bodies[:12]:
            answers = [s.post(url + "/v1/candidates", data=body, headers={"Content-Type": "application/json"})
                       for s, url in ((ray_session, server.url), (waitress, live_server.url))]
            assert [a.status_code for a in answers] == [200, 200]
            # Ray's proxy adds an X-Request-ID to every answer; ours takes it off again.
            assert {h.lower() for h in answers[0].headers} <= ALLOWED_HEADERS, answers[0].headers
            assert [[c["id"] for c in a.json()["candidates"]] for a in answers] == \
                [[c["id"] for c in answers[1].json()["candidates"]]] * 2
        bad = ray_session.post(server.url + "/v1/candidates", data=b"{", headers={"Content-Type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_json"
        assert ray_session.get(server.url + "/admin/v1/status").status_code == 404  # admin only on its listener


@pytest.mark.soak
def test_serve_ray_swaps_index_under_16_clients_without_a_failed_request(
        ray_server: tuple[LiveServer, Path, str], bodies: list[bytes],  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    server, index_dir, admin_url = ray_server
    result = run_load(server, bodies, clients=16, seconds=4, during=swapper(server, index_dir, admin_url, 4, 0.6))
    assert not result.failures, result.failures[:5]
    assert len(result.versions) >= 4, result.versions
    current = Index.load(index_dir).version
    deadline = time.monotonic() + 30
    while (ready := requests.get(server.url + "/readyz", timeout=10).json())["index_versions"] != [current]:
        assert time.monotonic() < deadline, ready
        time.sleep(0.2)
    assert ready["replicas"] == {"wanted": 2, "ready": 2}
    with capsys.disabled():
        print(f"\nRAY SWAP: 2 replicas, 4 swaps, {len(result.versions)} versions served, {result.summary(16, 4)}")


@pytest.mark.parametrize("command", [("index", "build", "--photos", "P", "--out", "O", "--ray"),
                                     ("serve", "--index", "I", "--ray", "--replicas", "2")])
def test_without_ray_the_error_names_the_extra(command: tuple[str, ...], index_dir: Path, subset: Path,
                                               tmp_path: Path) -> None:
    args = [{"P": str(subset / "images"), "O": str(tmp_path / "out"), "I": str(index_dir)}.get(a, a) for a in command]
    done = subprocess.run(_cli(*args, block_ray=True), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "pip install 'enfpire[ray]'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
