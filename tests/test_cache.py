"""The phone's defences for linked photos: the answer cache, stable decoys and the device secret.

Real model, real photos, the real server code (in-process, so every request can be counted).
"""
from __future__ import annotations

import base64
import gzip
import json
import os
import stat
import types
from pathlib import Path

import numpy as np
import pytest

from edge_client.cli import main as client_main
from edge_client.client import Client, cache_path
from edge_client.config import ClientConfig
from edge_client.privacy.cache import AnswerCache
from edge_client.privacy.transforms import make_transform
from edge_client.protocol import wire
from edge_client.state import DAY, decoy_seed, device_secret
from edge_client.vision.extractor import Extractor
from lite_server.api.app import create_app
from lite_server.config import ServerConfig
from tools.inprocess import mount


@pytest.fixture(scope="module")
def fine_app(index_dir: Path):  # type: ignore[no-untyped-def]
    """The test index in cells of 3 spots (8 cells), so decoys have room to differ."""
    return create_app(ServerConfig(index=str(index_dir), cell_min_spots=3))


URL = "http://enfpire.invalid"


class Phone:
    """A client on the in-process server that counts the requests it sends; its privacy floor
    lowered to the test index's cells of 3."""

    def __init__(self, app, extractor: Extractor, state: Path, **settings):  # type: ignore[no-untyped-def]
        settings = {"min_cell_spots": 3, **settings}
        self.client = Client(ClientConfig(server=URL, state_dir=str(state), **settings), extractor,
                             make_transform("cells"))
        mount(self.client.session, app, URL)
        self.requests: list[str] = []
        self.client.session.hooks["response"].append(lambda r, *a, **k: self.requests.append(r.request.path_url))

    def ask(self, photo: Path):  # type: ignore[no-untyped-def]
        return self.client.ask(self.client._extractor().extract(photo))


def test_a_repeated_photo_is_answered_on_the_phone_with_no_request(
        fine_app, extractor: Extractor, held_out, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spot, photo = held_out[0]
    phone = Phone(fine_app, extractor, tmp_path)
    body, first = phone.ask(photo)
    assert body is not None and phone.requests == ["/v1/info", "/v1/public", "/v1/candidates"]
    body, again = phone.ask(photo)
    assert body is None and phone.requests == ["/v1/info", "/v1/public", "/v1/candidates"]  # nothing more left the phone
    assert again.spot_id == first.spot_id and again.bytes_sent == 0
    # A new process (an app restart) reads the cache file: no request at all, not even /v1/info.
    restarted = Phone(fine_app, extractor, tmp_path)
    assert restarted.ask(photo)[0] is None and restarted.requests == []
    # --no-cache (cache=False) always asks.
    uncached = Phone(fine_app, extractor, tmp_path, cache=False)
    assert uncached.ask(photo)[0] is not None and uncached.ask(photo)[0] is not None
    assert uncached.requests.count("/v1/candidates") == 2


def test_the_cache_file_is_private_and_never_holds_the_photo_or_its_feature(
        fine_app, extractor: Extractor, held_out, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    phone = Phone(fine_app, extractor, tmp_path)
    features = [extractor.extract(photo) for _, photo in held_out[:3]]
    for feature in features:
        phone.client.ask(feature)
    path = cache_path(phone.client.config)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    raw = gzip.decompress(path.read_bytes())
    state = json.loads(raw)
    assert set(state) == {"format", "entries", "spots", "info"}
    assert all(set(e) == {"cells", "version", "time", "ids"} for e in state["entries"])
    for feature in features:
        for dtype in ("float16", "float32", "uint8"):
            assert wire.encode(feature, dtype)["data"].encode() not in raw
        assert base64.b64encode(feature.astype(np.float32).tobytes())[:40] not in raw
    assert b"JFIF" not in raw and b"Exif" not in raw


def test_entries_expire_and_the_oldest_go_first(tmp_path: Path) -> None:
    now = [1000.0]
    cache = AnswerCache(tmp_path / "c.json.gz", max_entries=2, max_age=60, clock=lambda: now[0])
    answer = [{"id": "a", "name": "A"}]
    cache.store([1, 2], "v1", answer)
    assert cache.answer((2, 7), "v1") == answer      # the best cell was fetched
    assert cache.answer((7, 2), "v1") is None        # only a weaker one was
    assert cache.answer((2,), "v2") is None          # another index version
    now[0] += 61
    assert cache.answer((2,), "v1") is None and len(cache) == 0
    for cells, spot in (([1], "a"), ([2], "b"), ([3], "c")):
        cache.store(cells, "v1", [{"id": spot}])
    assert len(cache) == 2 and cache.answer((1,), "v1") is None and cache.answer((3,), "v1") == [{"id": "c"}]
    reread = AnswerCache(tmp_path / "c.json.gz", max_entries=2, max_age=60, clock=lambda: now[0])
    assert reread.answer((2,), "v1") == [{"id": "b"}]
    assert "a" not in json.loads(gzip.decompress((tmp_path / "c.json.gz").read_bytes()))["spots"]


@pytest.mark.parametrize("garbage", [b"", b"not gzip", gzip.compress(b"{not json"), gzip.compress(b"[1, 2]"),
                                     gzip.compress(json.dumps({"format": 1, "entries": [{"cells": 3}],
                                                               "spots": {}, "info": None}).encode())])
def test_a_corrupt_cache_file_is_ignored_and_rebuilt(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "cache" / "c.json.gz"
    path.parent.mkdir()
    path.write_bytes(garbage)
    cache = AnswerCache(path)
    assert cache.answer((1,), "v") is None and cache.info() is None
    cache.store([1], "v", [{"id": "x"}])
    assert AnswerCache(path).answer((1,), "v") == [{"id": "x"}]


def test_clear_removes_the_file_and_the_cli_has_the_switches(
        fine_app, extractor: Extractor, held_out, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    phone = Phone(fine_app, extractor, tmp_path)
    phone.ask(held_out[0][1])
    path = cache_path(phone.client.config)
    assert path.is_file()
    phone.client.clear_cache()
    assert not path.exists() and phone.ask(held_out[0][1])[0] is not None
    assert client_main(["clear-cache"]) == 0  # under the test run's private HOME
    env = {**os.environ}
    try:
        os.environ["ENFPIRE_STATE_DIR"] = str(tmp_path)
        assert client_main(["clear-cache"]) == 0
    finally:
        os.environ.clear()
        os.environ.update(env)
    assert not path.exists()


def test_stable_decoys_same_real_cells_same_day_same_message(
        fine_app, extractor: Extractor, held_out, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    phone = Phone(fine_app, extractor, tmp_path / "a", cache=False)
    phone.client.check_model()
    feature = extractor.extract(held_out[1][1])
    first = phone.client.body(feature)
    assert phone.client.body(feature) == first
    other = Phone(fine_app, extractor, tmp_path / "b", cache=False)  # another device: another secret
    other.client.check_model()
    fresh = Phone(fine_app, extractor, tmp_path / "c", cache=False, stable_decoys=False)
    fresh.client.check_model()
    many = {json.dumps(fresh.client.body(feature)) for _ in range(8)}
    assert len(many) > 1  # without stable decoys every ask draws new ones
    features = [extractor.extract(photo) for _, photo in held_out[:4]]
    assert any(phone.client.body(f) != other.client.body(f) for f in features)  # secrets differ
    real = phone.client.transform.real_cells(feature)
    secret = phone.client._device_secret()
    assert decoy_seed(secret, real, 0.0) == decoy_seed(secret, tuple(reversed(real)), 10.0)
    assert decoy_seed(secret, real, 0.0) != decoy_seed(secret, real, DAY)  # a new day, new decoys
    assert all(set(real) <= set(json.loads(b)["cells"]) for b in many)


def test_a_seeded_phone_draws_the_same_decoys_on_any_date(
        fine_app, extractor: Extractor, held_out, tmp_path: Path,  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed fixes every draw, so an evaluation gives the same figures on another day; a
    real phone's stable decoys still change with the day."""
    from edge_client import state

    features = [extractor.extract(photo) for _, photo in held_out[:6]]

    def bodies(phone: Phone, day: int) -> list[dict]:  # type: ignore[type-arg]
        monkeypatch.setattr(state, "time", types.SimpleNamespace(time=lambda: day * DAY + 3600.0))
        return [phone.client.body(f) for f in features]

    seeded = Phone(fine_app, extractor, tmp_path / "a", cache=False, seed=7)
    unseeded = Phone(fine_app, extractor, tmp_path / "b", cache=False)
    for phone in (seeded, unseeded):
        phone.client.check_model()
    assert bodies(seeded, 20000) == bodies(seeded, 20001) == bodies(seeded, 20400)
    assert bodies(unseeded, 20000) != bodies(unseeded, 20001)


def test_the_device_secret_is_private_kept_and_rotated(tmp_path: Path) -> None:
    first = device_secret(tmp_path, rotate_days=7)
    path = tmp_path / "device-secret"
    assert len(first) == 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert device_secret(tmp_path, rotate_days=7) == first
    os.utime(path, (path.stat().st_mtime - 8 * DAY,) * 2)
    assert device_secret(tmp_path, rotate_days=7) != first
    path.write_bytes(b"short")
    assert len(device_secret(tmp_path, rotate_days=7)) == 32


def test_a_photo_answered_from_the_cache_sends_no_burst_either(
        fine_app, extractor: Extractor, held_out, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from edge_client.dummies.generator import PersonaGenerator
    from edge_client.dummies.scheduler import DummyScheduler, ManualClock, Sent

    phone = Phone(fine_app, extractor, tmp_path)
    clock, sent = ManualClock(1_717_200_000.0 + 9 * 3600), []  # 09:00 UTC: personas are out
    scheduler = DummyScheduler(phone.client, lambda: PersonaGenerator.from_client(phone.client), dummies=2,
                               clock=clock, on_sent=sent.append)
    feature = extractor.extract(held_out[2][1])
    first = scheduler.submit(feature)
    scheduler.run_until(clock.now + 60, clock.sleep)
    assert first.done() and sorted(s.kind for s in sent) == ["dummy", "dummy", "real"]
    before = len(phone.requests)
    again = scheduler.submit(feature)
    assert again.done() and again.result().spot_id == first.result().spot_id
    scheduler.run_until(clock.now + 60, clock.sleep)
    assert len(sent) == 3 and len(phone.requests) == before and scheduler.counts["answered_locally"] == 1
    assert all(isinstance(s, Sent) for s in sent)


def test_a_burst_on_many_threads_shares_one_device_secret_and_writes_never_collide(tmp_path: Path) -> None:
    """A burst's requests are made on several threads at once: one secret, whole files."""
    from concurrent.futures import ThreadPoolExecutor

    from edge_client.state import write_private

    client = Client(ClientConfig(state_dir=str(tmp_path)))
    with ThreadPoolExecutor(8) as pool:
        secrets = set(pool.map(lambda _: client._device_secret(), range(16)))
        list(pool.map(lambda i: write_private(tmp_path / "f", bytes([i]) * 1000), range(32)))
    assert secrets == {(tmp_path / "device-secret").read_bytes()}
    content = (tmp_path / "f").read_bytes()
    assert len(content) == 1000 and len(set(content)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device-secret", "f"]  # no temporary file left


def test_android_keeps_answers_and_clears_them(live_server, held_out) -> None:  # type: ignore[no-untyped-def]
    from edge_client import android

    jpeg = held_out[0][1].read_bytes()
    settings = json.dumps({"dummies": 0, "seed": 1})
    try:
        first, second = (json.loads(android.recognize_jpeg(jpeg, live_server.url, settings)) for _ in range(2))
        assert first["ok"] and second["ok"] and first["spot_id"] == second["spot_id"] == held_out[0][0]
        assert first["bytes_sent"] > 0 and second["bytes_sent"] == 0  # the second came from the cache
        assert json.loads(android.clear_cache(live_server.url, settings)) == {"ok": True, "cleared": True}
        third = json.loads(android.recognize_jpeg(jpeg, live_server.url, settings))
        assert third["ok"] and third["bytes_sent"] > 0
    finally:
        android.close_all()
