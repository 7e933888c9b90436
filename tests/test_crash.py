"""``kill -9`` at random moments of index writes: the index always loads and
serves one complete version, every SQLite file passes ``integrity_check``, and
the next write cleans up after the dead one.

Two kinds of victims: a churn loop that publishes back and forth as fast as it
can (so kills land inside the lock, the SQLite write, the renames and the
pruning), and the real ``enfpire-server index add|remove`` commands killed
anywhere from start-up to exit.
"""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from lite_server.api.updates import photo_rows, remove_spots
from lite_server.index.store import Index
from lite_server.search.backends import make_backend
from tests.conftest import copy_index, make_subset
from tools.live import LiveServer

CHURN = "import sys; from tests.test_crash import churn; churn(*sys.argv[1:])"


def churn(index_dir: str, source: str, spot_id: str) -> None:
    """Forever: publish the full ``source`` index into ``index_dir``, then remove ``spot_id``
    (the child the tests kill; a killed run may have left either state)."""
    from lite_server.index.store import publish

    full = Index.load(source)
    spots, rows, features = full.spots, photo_rows(full), np.asarray(full.features)
    manifest = {k: v for k, v in full.manifest.items() if k not in ("index_version", "created")}
    print("churning", flush=True)
    while True:
        publish(Path(index_dir), manifest, spots, rows, features)
        remove_spots(Path(index_dir), [spot_id])


def snapshot(index_dir: Path) -> tuple[frozenset[str], int]:
    index = Index.load(index_dir)
    return frozenset(s.id for s in index.spots), int(len(index.photo_spot))


def assert_valid(index_dir: Path, states: set[tuple[frozenset[str], int]], context: str) -> None:
    """``current`` is one of the complete ``states``, its features answer a search (row 0 finds
    itself), and nothing is corrupt."""
    index = Index.load(index_dir)
    state = (frozenset(s.id for s in index.spots), int(len(index.photo_spot)))
    assert state in states, f"{context}: current holds {len(state[0])} spots / {state[1]} photos"
    query = np.asarray(index.features[:1], np.float32)
    assert make_backend("numpy").add(np.asarray(index.features)).search(query, 3)[1][0][0] == 0, context
    for version in (index_dir / "versions").iterdir():
        if version.name.startswith("."):
            continue  # a temporary or trashed folder: never read, cleared by the next writer
        Index.load(version)
        db = sqlite3.connect(f"file:{version / 'spots.sqlite'}?mode=ro", uri=True)
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok", f"{context}: {version}"
        finally:
            db.close()


@pytest.fixture()
def crash_index(index_dir: Path, tmp_path: Path) -> Path:
    return copy_index(index_dir, tmp_path)


def _kill_churn(index_dir: Path, source: Path, spot_id: str, rounds: int, rng: random.Random,
                server: LiveServer | None = None) -> tuple[int, int]:
    """Kill the churn loop ``rounds`` times at random; (kills of a live writer, kills that left a
    half-written version behind, i.e. landed inside a publish)."""
    full = snapshot(source)
    states = {full, (full[0] - {spot_id}, full[1] - sum(1 for s, _ in photo_rows(Index.load(source))
                                                         if s == spot_id))}
    landed = debris = 0
    for n in range(rounds):
        child = subprocess.Popen([sys.executable, "-c", CHURN, str(index_dir), str(source), spot_id],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert child.stdout is not None and child.stdout.readline().strip() == b"churning"
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        landed += child.wait() == -signal.SIGKILL
        debris += any(p.name.startswith(".tmp-") for p in (index_dir / "versions").iterdir())
        assert_valid(index_dir, states, f"kill {n}")
        if server is not None:
            server.process.send_signal(signal.SIGHUP)
            assert requests.get(server.url + "/readyz", timeout=5).status_code == 200
    return landed, debris


def test_kill_9_during_publishing_never_corrupts(crash_index: Path, index_dir: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    spot = Index.load(crash_index).spots[3].id
    landed, _ = _kill_churn(crash_index, index_dir, spot, 4, random.Random(seed))
    assert landed == 4, f"seed {seed}"
    remove_spots(crash_index, [Index.load(crash_index).spots[0].id])  # the next writer works and cleans up
    assert not [p for p in (crash_index / "versions").iterdir() if p.name.startswith(".")]
    assert not list(crash_index.glob(".current-*"))


def _kill_cli(index_dir: Path, new_spots: Path, rounds: int, rng: random.Random) -> int:
    """Alternate real ``index add`` / ``index remove`` runs, killing each at a random moment."""
    base = snapshot(index_dir)
    new_ids = sorted(p.name for p in (new_spots / "images").iterdir())
    grown = (base[0] | set(new_ids), base[1] + sum(1 for _ in (new_spots / "images").glob("*/*.jpg")))
    states, landed, duration = {base, grown}, 0, 3.0
    for n in range(rounds):
        adding = snapshot(index_dir) == base
        command = ["add", str(index_dir), "--photos", str(new_spots / "images"), "--threads", "1"] if adding \
            else ["remove", str(index_dir), *new_ids]
        started = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", "lite_server.cli", "index", *command],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            child.wait(timeout=rng.uniform(0.0, duration))
            duration = max(duration, time.monotonic() - started)  # finished: aim later next time
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            landed += child.wait() == -signal.SIGKILL
        assert_valid(index_dir, states, f"cli kill {n} ({command[0]})")
    return landed


@pytest.fixture(scope="module")
def new_spots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_subset(tmp_path_factory.mktemp("crash-new"), spots=2, per_spot=3, first=40)


def test_kill_9_during_cli_add_and_remove(crash_index: Path, new_spots: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    _kill_cli(crash_index, new_spots, 2, random.Random(seed))


@pytest.mark.soak
def test_soak_many_kills_while_serving(crash_index: Path, index_dir: Path, new_spots: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Many kills of both kinds, with a server on the same index reloading after each one."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    server = LiveServer(crash_index)
    try:
        churned, inside = _kill_churn(crash_index, index_dir, Index.load(crash_index).spots[5].id, 60, rng, server)
        assert churned == 60, f"seed {seed}"
        cli = _kill_cli(crash_index, new_spots, 30, rng)
        assert requests.get(server.url + "/readyz", timeout=5).status_code == 200
    finally:
        server.stop()
    with capsys.disabled():
        print(f"\nCRASH: {churned} kills of the publish loop ({inside} inside a half-written version) + "
              f"{cli} kills of index add/remove "
              f"survived, every version valid, integrity_check ok (seed {seed})")
