"""Oblivious HTTP end to end on loopback: the real server (gateway), the relay on 127.0.0.2 and the
real client. Same answers as direct; the server sees only the relay's address; broken or
foreign encapsulated requests get a clear 4xx and change nothing."""
from __future__ import annotations

import hashlib
import json
import re
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import numpy as np
import pytest
import requests

from edge_client.client import Client
from edge_client.config import ClientConfig
from edge_client.errors import GatewayKeyError, ServerError, ServerUnreachableError
from edge_client.protocol import bhttp, ohttp
from edge_client.protocol.oblivious import PIN_FILE
from edge_client.vision.extractor import Extractor
from lite_server.ohttp.relay import KEYS_PATH, PUBLIC_PATH
from tests.conftest import dataset_photos
from tools.live import LiveRelay, LiveServer, free_port

RELAY_HOST = "127.0.0.2"


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway") / "ohttp-keys.json"


@pytest.fixture(scope="module")
def gateway(index_dir: Path, keys_file: Path) -> Iterator[LiveServer]:
    server = LiveServer(index_dir, "-v", "--log-peers", "--ohttp-keys", str(keys_file))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def relay(gateway: LiveServer) -> Iterator[LiveRelay]:
    relay = LiveRelay(gateway, RELAY_HOST, "--log-every", "5", "--refresh", "0.5")  # shared copies: 0.5 s
    yield relay
    relay.stop()


@pytest.fixture(scope="module")
def features(extractor: Extractor, held_out: list[tuple[str, Path]]) -> list[tuple[str, np.ndarray]]:
    return [(spot, extractor.extract(photo)) for spot, photo in held_out[:4]]


def _client(server: LiveServer, extractor: Extractor, **settings: Any) -> Client:
    """A phone on the gateway; no answer cache, so every photo here leaves as a request."""
    settings.setdefault("cache", False)
    return Client(ClientConfig(server=server.url, seed=5, retries=1, backoff=0.05, **settings), extractor=extractor)


def _peers(log: str) -> list[str]:
    """Who asked the gateway for what, leaving out the live relay's own timer fetches of its shared copies:
    they come every 0.5 s whoever is asking, so they would make counts here depend on timing."""
    timer = re.compile(rf"peer {re.escape(RELAY_HOST)}: GET ({re.escape(KEYS_PATH)}|{re.escape(PUBLIC_PATH)})$")
    return [m.group(1) for line in log.splitlines() if not timer.search(line)
            for m in [re.search(r"peer (\S+): ", line)] if m]


def _seal(gateway: LiveServer, request: bhttp.Request, key: int = 0) -> bytes:
    configs = ohttp.decode_key_configs(requests.get(gateway.url + "/.well-known/ohttp-gateway", timeout=5).content)
    return ohttp.encapsulate_request(configs[key], bhttp.encode_request(request))[0]


def test_relay_answers_like_direct_and_the_server_sees_only_the_relay(
        gateway: LiveServer, relay: LiveRelay, extractor: Extractor, features: list[tuple[str, np.ndarray]],
        tmp_path: Path) -> None:
    before = len(gateway.output())
    with _client(gateway, extractor, relay=relay.url, state_dir=str(tmp_path)) as oblivious:
        through = [oblivious.recognize_feature(f) for _, f in features]
    relay_peers = _peers(gateway.output()[before:])
    with _client(gateway, extractor) as direct:
        plain = [direct.recognize_feature(f) for _, f in features]
    direct_peers = _peers(gateway.output()[before:])[len(relay_peers):]
    assert [r.spot_id for r in through] == [r.spot_id for r in plain]
    assert [[c.id for c in r.candidates] for r in through] == [[c.id for c in r.candidates] for r in plain]
    assert sum(r.spot_id == spot for r, (spot, _) in zip(through, features)) >= 3
    # info + 4 candidates, each as POST /ohttp and its inner request; nothing direct, nothing from 127.0.0.1
    assert len(relay_peers) >= 10 and set(relay_peers) == {RELAY_HOST}
    assert set(direct_peers) == {"127.0.0.1"}
    # The byte counters count the sealed exchange: a little more than direct, never less.
    assert all(0 < t.bytes_sent - p.bytes_sent < 400 for t, p in zip(through, plain))
    assert (tmp_path / PIN_FILE).is_file() and stat.S_IMODE((tmp_path / PIN_FILE).stat().st_mode) == 0o600


def test_relay_log_has_counts_but_no_address_or_content(relay: LiveRelay, gateway: LiveServer,
                                                        extractor: Extractor, tmp_path: Path) -> None:
    with _client(gateway, extractor, relay=relay.url, state_dir=str(tmp_path), transform="noise") as client:
        bodies = [client.ask(extractor.extract(photo))[0] for photo in dataset_photos(4, 1)]
    log = relay.output()
    assert "relay: {" in log  # it does log (counts every 5 requests)
    for body in bodies:
        assert body["vector"]["data"][:16] not in log and body["vector"]["data"][-16:] not in log
    for line in log.splitlines():
        assert "127.0.0.1:" not in line or line.startswith("relaying "), line


def test_key_configuration_is_served_and_kept_private(gateway: LiveServer, relay: LiveRelay, keys_file: Path) -> None:
    direct = requests.get(gateway.url + "/.well-known/ohttp-gateway", timeout=5)
    through = requests.get(relay.url.rstrip("/") + "/.well-known/ohttp-gateway", timeout=5)
    assert direct.headers["Content-Type"] == "application/ohttp-keys" and through.content == direct.content
    assert ohttp.decode_key_configs(direct.content)[0].suites == ohttp.SUITES
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600


def _components() -> dict[str, Any]:
    from lite_server.api.openapi import spec

    return {"components": spec()["components"]}


def _post(url: str, body: bytes, content_type: str = "message/ohttp-req") -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=10)


def test_broken_and_foreign_requests_get_a_clear_4xx_and_nothing_else_changes(
        gateway: LiveServer, relay: LiveRelay, keys_file: Path) -> None:
    good = _seal(gateway, bhttp.Request("GET", "/v1/info"))
    tampered = good[:60] + bytes([good[60] ^ 0x80]) + good[61:]
    unknown_key = bytes([(good[0] + 77) % 256]) + good[1:]
    oversized = _seal(gateway, bhttp.Request("POST", "/v1/candidates", headers=(("content-type", "application/json"),),
                                             content=b"x" * 80_000))
    cases = {"tampered": (tampered, 400, "bad_ohttp_message"), "truncated": (good[:30], 400, "bad_ohttp_message"),
             "cut tag": (good[:-1], 400, "bad_ohttp_message"), "unknown key": (unknown_key, 400, "ohttp_key"),
             "oversized": (oversized, 413, "request_entity_too_large"), "empty": (b"", 400, "bad_ohttp_message")}
    for url in (gateway.url + "/ohttp", relay.url):
        for name, (body, status, code) in cases.items():
            response = _post(url, body)
            assert (response.status_code, response.json()["error"]["code"]) == (status, code), (url, name)
            jsonschema.validate(response.json(), {"$ref": "#/components/schemas/Error", **_components()})
        assert _post(url, good, "application/json").status_code == 415
    # Sealed to key 1, relabelled as the rotated-in key 2: the other key cannot open it.
    done = subprocess.run([sys.executable, "-m", "lite_server.cli", "ohttp", "rotate", "--keys", str(keys_file)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    configs = ohttp.decode_key_configs(requests.get(gateway.url + "/.well-known/ohttp-gateway", timeout=5).content)
    # the new key first, the next one announced, the old one still valid
    assert [c.key_id for c in configs] == [good[0] + 1, good[0] + 2, good[0]]
    replayed = bytes([configs[0].key_id]) + good[1:]
    assert _post(relay.url, replayed).json()["error"]["code"] == "bad_ohttp_message"
    for key in (0, 1):  # and afterwards both keys serve normal requests
        response = _post(relay.url, _seal(gateway, bhttp.Request("GET", "/v1/info"), key))
        assert response.status_code == 200 and response.headers["Content-Type"] == "message/ohttp-res"
    assert gateway.process.poll() is None and "Traceback" not in gateway.output()


def test_inner_errors_travel_sealed_with_their_status(gateway: LiveServer, relay: LiveRelay, extractor: Extractor,
                                                     tmp_path: Path) -> None:
    with _client(gateway, extractor, relay=relay.url, state_dir=str(tmp_path)) as client:
        with pytest.raises(ServerError) as caught:
            client.query({"cells": [10**6]})
        assert (caught.value.status, caught.value.code) == (400, "bad_cells")
        with pytest.raises(ServerError) as caught:
            client.query({"pad": "x" * 70_000})  # over max_body inside: the inner 413
        assert caught.value.status == 413


def _shared_keys_caught_up(relay: LiveRelay, gateway: LiveServer) -> None:
    """Wait for the relay's timer to copy the gateway's key configuration (after a rotation)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if requests.get(relay.url + ".well-known/ohttp-gateway", timeout=5).content == \
                requests.get(gateway.url + "/.well-known/ohttp-gateway", timeout=5).content:
            return
        time.sleep(0.1)
    raise AssertionError("the relay's shared key configuration did not follow the gateway's")


def test_a_changed_gateway_key_is_an_error_unless_the_configuration_accepts_it(
        gateway: LiveServer, relay: LiveRelay, extractor: Extractor, tmp_path: Path, keys_file: Path) -> None:
    _shared_keys_caught_up(relay, gateway)  # an earlier test rotated the keys
    foreign = ohttp.encode_key_configs([ohttp.KeyConfig(99, ohttp.public_key(ohttp.generate_private_key()))])
    (tmp_path / PIN_FILE).write_text(json.dumps({gateway.url: foreign.hex()}))
    with _client(gateway, extractor, relay=relay.url, state_dir=str(tmp_path)) as client:
        with pytest.raises(GatewayKeyError, match="changed"):
            client.info()
    served = requests.get(gateway.url + "/.well-known/ohttp-gateway", timeout=5).content
    accepted = hashlib.sha256(served).hexdigest()
    shown = subprocess.run([sys.executable, "-m", "lite_server.cli", "ohttp", "show", "--keys", str(keys_file)],
                           capture_output=True, text=True, timeout=60)
    assert json.loads(shown.stdout)["sha256"] == accepted  # what an operator hands to phones
    with _client(gateway, extractor, relay=relay.url, state_dir=str(tmp_path), gateway_keys=accepted) as client:
        assert client.info()["protocol"] == 1
    assert json.loads((tmp_path / PIN_FILE).read_text())[gateway.url] == served.hex()
    with _client(gateway, extractor, relay=relay.url, state_dir=str(tmp_path / "new"), gateway_keys="ab" * 32) as client:
        with pytest.raises(GatewayKeyError, match="sha256"):
            client.info()
    # The whole configuration given: nothing fetched, and it works.
    with _client(gateway, extractor, relay=relay.url, state_dir=str(tmp_path / "given"),
                 gateway_keys=served.hex(), gateway_keys_url="http://127.0.0.1:9/nothing") as client:
        assert client.info()["protocol"] == 1


def test_no_silent_fallback_when_the_relay_is_down(gateway: LiveServer, extractor: Extractor, tmp_path: Path) -> None:
    before = len(gateway.output())
    dead = f"http://{RELAY_HOST}:{free_port(RELAY_HOST)}/"
    with _client(gateway, extractor, relay=dead, state_dir=str(tmp_path)) as client:
        with pytest.raises(ServerUnreachableError, match=RELAY_HOST):
            client.info()
    assert _peers(gateway.output()[before:]) == []


def test_cli_info_through_the_relay(gateway: LiveServer, relay: LiveRelay, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "edge_client.cli", "info", "--server", gateway.url,
                           "--relay", relay.url], capture_output=True, text=True, timeout=60,
                          env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["protocol"] == 1 and (tmp_path / ".enfpire" / PIN_FILE).is_file()


def test_catalogue_and_dummies_go_through_the_relay_too(gateway: LiveServer, relay: LiveRelay, extractor: Extractor,
                                                        features: list[tuple[str, np.ndarray]], tmp_path: Path) -> None:
    from edge_client.dummies.generator import PersonaGenerator
    from edge_client.dummies.personas import Movement
    from edge_client.dummies.scheduler import DummyScheduler, ManualClock

    day = 1_717_200_000.0 + 9 * 3600  # 09:00 UTC: personas are out
    clock, sent = ManualClock(day), []  # type: tuple[ManualClock, list[Sent]]
    mark = len(gateway.output())
    with _client(gateway, extractor, relay=relay.url, state_dir=str(tmp_path)) as client:
        generator = PersonaGenerator(client.catalogue(), 2, Movement(utc_offset_s=0.0), seed=5)
        scheduler = DummyScheduler(client, generator, dummies=2, per_hour=1000, window=6.0, clock=clock,
                                   on_sent=sent.append)
        future = scheduler.submit(features[0][1])
        scheduler.run_until(day + 60, clock.sleep)
    assert future.result(timeout=0).candidates and [s.kind for s in sent].count("dummy") == 2
    log = gateway.output()[mark:]
    assert set(_peers(log)) == {RELAY_HOST}
    assert "GET /v1/public inside OHTTP" in log and log.count("POST /v1/candidates inside OHTTP") == 3


def test_android_entry_points_take_the_relay_from_config_json(gateway: LiveServer, relay: LiveRelay,
                                                             tmp_path: Path) -> None:
    from edge_client import android

    mark = len(gateway.output())
    try:
        answer = json.loads(android.server_info(gateway.url, json.dumps({"relay": relay.url,
                                                                         "state_dir": str(tmp_path)})))
        refused = json.loads(android.server_info(gateway.url, json.dumps({"relay": relay.url, "state_dir": str(tmp_path),
                                                                          "gateway_keys": "cd" * 32})))
    finally:
        android.close_all()
    assert answer["ok"] and answer["info"]["protocol"] == 1
    assert refused == {"ok": False, "error": {"type": "GatewayKeyError", "message": refused["error"]["message"]}}
    assert set(_peers(gateway.output()[mark:])) == {RELAY_HOST}


def test_concurrent_sealed_requests_meet_admission_control_without_deadlock(index_dir: Path, tmp_path: Path) -> None:
    """One lookup slot, one waiting seat: sealed lookups are admitted or refused (an inner 503), never stuck."""
    from concurrent.futures import ThreadPoolExecutor

    server = LiveServer(index_dir, "--threads", "1", "--ohttp-keys", str(tmp_path / "keys.json"),
                        env={"ENFPIRE_MAX_PENDING": "1"})
    relay = LiveRelay(server, RELAY_HOST)
    try:
        config = ohttp.decode_key_configs(requests.get(server.url + "/.well-known/ohttp-gateway", timeout=5).content)[0]
        body = json.dumps({"cells": [0], "pad": "x" * 2000}).encode()
        request = bhttp.encode_request(bhttp.Request("POST", "/v1/candidates", content=body, headers=(
            ("content-type", "application/json"), ("accept-encoding", "gzip"))))

        def one(_: int) -> int:
            sealed, context = ohttp.encapsulate_request(config, request)
            answer = _post(relay.url, sealed)
            assert answer.status_code == 200
            return bhttp.decode_response(ohttp.decapsulate_response(context, answer.content)).status

        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(one, range(64), timeout=120))
        assert one(0) == 200  # and the gateway still answers afterwards
    finally:
        relay.stop()
        server.stop()
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 2, statuses
