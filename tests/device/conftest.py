"""The device test run (``make test-device``): Python 3.10, numpy 1.x, no interpreter, no server
packages, as inside a Chaquopy app. Run with ``--confcutdir=tests/device`` so the main suite's
conftest (its extractor and server fixtures) is never loaded; the main suite ignores this folder.

What needs the server side (building an index, extracting features, serving) is run by the main
``.venv``'s Python, named by ``ENFPIRE_SERVER_PYTHON`` (default ``.venv/bin/python``).
"""
from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.homes import private_home, use_private_home  # noqa: F401  (an autouse fixture)
from tools.live import LiveServer

ROOT = Path(__file__).resolve().parents[2]
DATASET = ROOT.parent / "shared" / "datasets" / "wa-landmarks"
SPOTS = 10  # a handful of real spots keeps the run short; 10 make the one cell the phone's default floor accepts


def pytest_configure(config: pytest.Config) -> None:
    use_private_home("enfpire-device-home-")


def server_python() -> str:
    python = os.environ.get("ENFPIRE_SERVER_PYTHON") or str(ROOT / ".venv" / "bin" / "python")
    if not Path(python).is_file():
        raise RuntimeError(f"{python} does not exist: run 'make setup' (the device run needs the main .venv)")
    return python


def _run(*args: str) -> str:
    done = subprocess.run([server_python(), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args} failed: {done.stderr[-2000:]}"
    return done.stdout


@dataclass(frozen=True)
class Query:
    spot_id: str
    feature_json: str   # as an app would hand it over: a JSON list of floats
    model_sha256: str


@dataclass(frozen=True)
class DeviceData:
    index: Path
    queries: list[Query]


@pytest.fixture(scope="session")
def device_data(tmp_path_factory: pytest.TempPathFactory) -> DeviceData:
    """An index of the first spots without their first photo, built by the main venv, and the
    held-out first photos' features as the app's own model would compute them."""
    root = tmp_path_factory.mktemp("device-data")
    folders = sorted(p for p in (DATASET / "images").iterdir() if p.is_dir())[:SPOTS]
    for folder in folders:
        (root / "images" / folder.name).mkdir(parents=True)
        for photo in sorted(folder.glob("*.jpg"))[1:]:
            (root / "images" / folder.name / photo.name).symlink_to(photo)
    lines = (DATASET / "landmarks.csv").read_text().splitlines()
    names = {f.name for f in folders}
    (root / "landmarks.csv").write_text("\n".join([lines[0]] + [l for l in lines[1:] if l.split(",")[0] in names]) + "\n")
    held_out = [(f.name, sorted(f.glob("*.jpg"))[0]) for f in folders]
    with ThreadPoolExecutor(4) as pool:
        build = pool.submit(_run, "-m", "lite_server.cli", "index", "build", "--photos", str(root / "images"),
                            "--spots", str(root / "landmarks.csv"), "--out", str(root / "index"), "--threads", "2")
        outputs = list(pool.map(lambda item: _run("-m", "edge_client.cli", "extract", "--json", str(item[1])),
                                held_out))
        build.result()
    queries = []
    for (spot, _), output in zip(held_out, outputs):
        extracted = json.loads(output)
        queries.append(Query(spot, json.dumps(extracted["feature"]), extracted["model_sha256"]))
    return DeviceData(root / "index", queries)


@pytest.fixture(scope="session")
def live_server(device_data: DeviceData):  # type: ignore[no-untyped-def]
    server = LiveServer(device_data.index, python=server_python())
    yield server
    server.stop()
