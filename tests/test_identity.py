"""The server's identity: keys a phone follows without a person, and a relay that cannot substitute its own.

Real servers, relays and clients on loopback. The attacks (a relay substituting its key, a rotation
past the grace period, three scheduled rotations, a running server that must rotate on time) are
written against what every version of the client and server accepts (settings through
``ENFPIRE_*`` variables, the key file's ``created``), so each fails on a server and phone without the
identity at its assertion rather than at an import; names only the new code has are imported inside
the tests that need them.
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from edge_client.client import Client
from edge_client.config import ClientConfig, load_config
from edge_client.errors import EnfPireError
from edge_client.protocol import bhttp, ohttp
from edge_client.protocol.transport import Answer
from edge_client.vision.extractor import Extractor
from tools.live import LiveRelay, LiveServer

RELAY_HOST = "127.0.0.2"
KEYS_PATH, SIGNED_PATH = "/.well-known/ohttp-gateway", "/.well-known/enfpire-keys"


# ---------------------------------------------------------------- helpers


def _cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "lite_server.cli", "ohttp", *args], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _identity(keys_file: Path) -> str:
    """What ``ohttp show`` tells an app to pin (a made-up key where the server has no identity)."""
    return str(json.loads(_cli("show", "--keys", str(keys_file))).get("server_identity", "00" * 32))


def _phone(server: LiveServer, extractor: Extractor, state: Path, env: dict[str, str] | None = None,
           **settings: Any) -> tuple[Client, list[tuple[str, str, int, bytes]]]:
    """A phone (settings as an app passes them: ENFPIRE_* variables and overrides), recording every
    exchange on the wire: (method, url, status, first bytes sent)."""
    config = load_config(ClientConfig, env=env or {}, server=server.url, state_dir=str(state), cache=False,
                         retries=0, seed=5, **settings)
    client = Client(config, extractor=extractor)
    wire: list[tuple[str, str, int, bytes]] = []
    send = client._send

    def recorded(method: str, url: str, data: bytes | None, headers: dict[str, str]) -> Answer:
        answer = send(method, url, data, headers)
        wire.append((method, url, answer.status, (data or b"")[:1]))
        return answer

    client._send = recorded  # type: ignore[method-assign]
    return client, wire


def _signed_and_sealed(wire: list[tuple[str, str, int, bytes]]) -> list[str]:
    """The methods on the wire but for the shared-copy checks (``/.well-known/ohttp-gateway``)."""
    return [method for method, url, *_ in wire if not url.endswith("/.well-known/ohttp-gateway")]


def _current_key_id(keys_file: Path) -> int:
    """The current key id as the key file says (any version of the file)."""
    keys = json.loads(keys_file.read_text())["keys"]
    return int([k for k in keys if k.get("retired") is None and k.get("activated", k["created"]) is not None][-1]
               ["key_id"])


def _seal_to(gateway: LiveServer, key: int | ohttp.KeyConfig) -> requests.Response:
    """A sealed GET /v1/info to a key (a configuration, or a key id: as a phone still holding it would send)."""
    configs = ohttp.decode_key_configs(requests.get(gateway.url + KEYS_PATH, timeout=5).content)
    config = key if isinstance(key, ohttp.KeyConfig) else \
        next((c for c in configs if c.key_id == key), ohttp.KeyConfig(key, configs[0].public_key))
    sealed = ohttp.encapsulate_request(config, bhttp.encode_request(bhttp.Request("GET", "/v1/info")))[0]
    return requests.post(gateway.url + "/ohttp", data=sealed, headers={"Content-Type": "message/ohttp-req"},
                         timeout=10)


class LyingRelay:
    """A relay that answers key fetches with a key of its own and opens whatever is sealed to it
    (then reseals it to the real gateway, so the phone keeps working): the attack of issue 26.

    ``signed``: what it answers for the signed key document: "none" (404), "own" (its key, signed by
    an identity of its own) or "forged" (the real document with its key put in, signature kept).
    ``bounce``: answer ``400 ohttp_key`` to sealed requests it cannot open, so the phone fetches keys again.
    """

    def __init__(self, gateway: LiveServer, signed: str, bounce: bool = False):
        self.gateway, self.signed, self.bounce = gateway, signed, bounce
        self.private = ohttp.generate_private_key()
        self.config = ohttp.KeyConfig(77, ohttp.public_key(self.private))
        self.opened: list[bytes] = []   # plaintext requests it read
        self.posts = 0                  # sealed requests it received
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path == KEYS_PATH:
                    self._answer(200, ohttp.KEYS_TYPE, ohttp.encode_key_configs([relay.config]))
                elif self.path == SIGNED_PATH and relay.signed != "none":
                    self._answer(200, "application/json", json.dumps(relay.signed_document()).encode())
                else:
                    self._answer(404, "application/json", b'{"error": {"code": "not_found", "message": ""}}')

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                relay.posts += 1
                status, content_type, answer = relay.relay(body)
                self._answer(status, content_type, answer)

            def _answer(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((RELAY_HOST, 0), Handler)
        self.url = f"http://{RELAY_HOST}:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def signed_document(self) -> dict[str, Any]:
        import base64

        from lite_server.ohttp.keys import ServerIdentity

        keys = ohttp.encode_key_configs([self.config]).hex()
        payload = json.dumps({"format": 1, "keys": keys, "next": "", "next_at": None, "max_age": 60}).encode()
        if self.signed == "own":
            return ServerIdentity(ohttp.generate_private_key()).signed_keys(payload)  # any 32 bytes make a key
        real = requests.get(self.gateway.url + SIGNED_PATH, timeout=5).json()
        return {**real, "payload": base64.b64encode(payload).decode()}

    def relay(self, sealed: bytes) -> tuple[int, str, bytes]:
        if sealed[0] != self.config.key_id:
            if self.bounce:
                return 400, "application/json", b'{"error": {"code": "ohttp_key", "message": "unknown key"}}'
            answer = requests.post(self.gateway.url + "/ohttp", data=sealed,
                                   headers={"Content-Type": ohttp.REQUEST_TYPE}, timeout=10)
            return answer.status_code, answer.headers["Content-Type"], answer.content
        message, phone = ohttp.decapsulate_request(sealed, {self.config.key_id: (self.config, self.private)})
        self.opened.append(message)
        real = ohttp.decode_key_configs(requests.get(self.gateway.url + KEYS_PATH, timeout=5).content)[0]
        resealed, upstream = ohttp.encapsulate_request(real, message)
        answer = requests.post(self.gateway.url + "/ohttp", data=resealed,
                               headers={"Content-Type": ohttp.REQUEST_TYPE}, timeout=10)
        inner = ohttp.decapsulate_response(upstream, answer.content)
        return 200, ohttp.RESPONSE_TYPE, ohttp.encapsulate_response(phone, inner)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway") / "ohttp-keys.json"


@pytest.fixture(scope="module")
def gateway(index_dir: Path, keys_file: Path) -> Iterator[LiveServer]:
    server = LiveServer(index_dir, "--ohttp-keys", str(keys_file))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def relay(gateway: LiveServer) -> Iterator[LiveRelay]:
    relay = LiveRelay(gateway, RELAY_HOST)
    yield relay
    relay.stop()


# ---------------------------------------------------------------- a relay substituting its key


@pytest.mark.parametrize("signed", ["none", "own", "forged"])
def test_a_relay_substituting_its_key_is_refused_and_reads_nothing(
        gateway: LiveServer, keys_file: Path, extractor: Extractor, tmp_path: Path, signed: str) -> None:
    """An app that ships the server's identity, on its first run, behind a relay that hands out its own key."""
    liar = LyingRelay(gateway, signed)
    phone, wire = _phone(gateway, extractor, tmp_path, env={"ENFPIRE_SERVER_IDENTITY": _identity(keys_file)},
                         relay=liar.url)
    try:
        with phone:
            try:
                phone.info()
                refused: Exception | None = None
            except EnfPireError as exc:
                refused = exc
    finally:
        liar.stop()
    assert liar.opened == [], "the relay read the phone's requests in plaintext"
    assert liar.posts == 0 and [m for m, *_ in wire] == ["GET"]  # nothing sealed left the phone, not even to a key it trusts
    assert type(refused).__name__ == "IdentityError", refused


def test_a_relay_substituting_its_key_after_first_use_is_refused(
        gateway: LiveServer, relay: LiveRelay, extractor: Extractor, tmp_path: Path) -> None:
    """A phone that pinned the identity on first use (through an honest relay) meets a lying relay that
    bounces its requests to make it fetch keys again: refused, nothing read."""
    first, _ = _phone(gateway, extractor, tmp_path, relay=relay.url)
    with first:
        assert first.info()["protocol"] == 1
    liar = LyingRelay(gateway, "own", bounce=True)
    # the identity alone: with the consistency check on, the liar's shared copy refuses it even earlier
    later, wire = _phone(gateway, extractor, tmp_path, relay=liar.url, consistency=False)
    try:
        with later, pytest.raises(EnfPireError) as caught:
            later.info()
    finally:
        liar.stop()
    assert type(caught.value).__name__ == "IdentityError" and liar.opened == []
    assert liar.posts == 1 and [m for m, *_ in wire] == ["POST", "GET"]  # one sealed to the real key, then refused


# ---------------------------------------------------------------- rotations


def test_a_rotation_past_its_grace_period_strands_no_pinned_phone(index_dir: Path, extractor: Extractor,
                                                                  tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    server = LiveServer(index_dir, "--ohttp-keys", str(keys_file), env={"ENFPIRE_OHTTP_GRACE": "1"})
    relay = LiveRelay(server, RELAY_HOST, "--refresh", "0.3")  # its shared copy keeps up with rotations in seconds
    try:
        pinned, wire = _phone(server, extractor, tmp_path / "pinned", relay=relay.url)
        shipped_keys = json.loads(_cli("show", "--keys", str(keys_file)))["application_ohttp_keys_hex"]
        shipped, shipped_wire = _phone(server, extractor, tmp_path / "shipped", relay=relay.url,
                                       env={"ENFPIRE_SERVER_IDENTITY": _identity(keys_file)},
                                       gateway_keys=shipped_keys)
        with pinned, shipped:
            assert pinned.info(refresh=True)["protocol"] == 1 and shipped.info(refresh=True)["protocol"] == 1
            first = _current_key_id(keys_file)
            for _ in range(2):
                _cli("rotate", "--keys", str(keys_file))
                time.sleep(1.5)  # past the grace period: the key the phones held is gone
                assert _seal_to(server, first).json()["error"]["code"] == "ohttp_key"
                assert pinned.info(refresh=True)["protocol"] == 1  # no person passed a new sha256
                assert shipped.info(refresh=True)["protocol"] == 1
    finally:
        relay.stop()
        server.stop()
    # The pinned phone fetched the signed keys when they were due and never met a refused key;
    # the phone with shipped keys met it once, fetched the signed keys, retried, and then followed them.
    assert [s for *_, s, _ in wire if s != 200] == []
    assert [s for *_, s, _ in shipped_wire if s != 200] == [400]


def test_three_scheduled_rotations_cost_a_pinned_phone_no_failed_request(index_dir: Path, extractor: Extractor,
                                                                         tmp_path: Path) -> None:
    """``ohttp_rotate_days`` of 3 s, a grace of 1.2 s: each old key is gone before the next rotation.
    The phone asks continuously; every exchange on its wire is counted."""
    period, grace = 3.0, 1.2
    keys_file = tmp_path / "keys.json"
    server = LiveServer(index_dir, "--ohttp-keys", str(keys_file), env={
        "ENFPIRE_OHTTP_ROTATE_DAYS": repr(period / 86400), "ENFPIRE_OHTTP_GRACE": str(grace)})
    relay = LiveRelay(server, RELAY_HOST, "--refresh", "0.3")  # its shared copy keeps up with rotations in seconds
    failures: list[str] = []
    try:
        phone, wire = _phone(server, extractor, tmp_path / "phone", relay=relay.url)
        with phone:
            first = _current_key_id(keys_file)
            deadline = time.time() + 3 * period + grace + 1.0
            asked = 0
            while time.time() < deadline:
                try:
                    if asked % 2:
                        assert phone.info(refresh=True)["protocol"] == 1
                    else:
                        assert phone.query({"cells": [0]})[0] is not None
                except (EnfPireError, AssertionError) as exc:
                    failures.append(repr(exc))
                asked += 1
                time.sleep(0.03)
        gone = _seal_to(server, first)
    finally:
        relay.stop()
        server.stop()
    used = list(dict.fromkeys(b[0] for m, _, _, b in wire if m == "POST"))  # key ids sealed to, in order
    failed = [(m, u, s) for m, u, s, _ in wire if s != 200]
    print(f"{asked} requests, {len(wire)} exchanges, keys used {used}, failed requests {len(failures)}, "
          f"failed exchanges {len(failed)}")
    assert len(used) >= 4, used  # three rotations followed
    assert gone.status_code == 400 and gone.json()["error"]["code"] == "ohttp_key"  # the first key: past its grace
    assert failures == [] and failed == []


def _watch(keys_file: Path, seconds: float) -> list[tuple[float, int]]:
    """(time, current key id) each time it changes, read from the file alone (no request to a server)."""
    seen = [(time.time(), _current_key_id(keys_file))]
    end = time.time() + seconds
    while time.time() < end:
        current = _current_key_id(keys_file)
        if current != seen[-1][1]:
            seen.append((time.time(), current))
        time.sleep(0.02)
    return seen


def test_running_servers_sharing_a_key_file_rotate_on_time_and_once(index_dir: Path, tmp_path: Path) -> None:
    """Two servers (replicas) on one key file, ``ohttp_rotate_days`` of 2 s, and no request at all while
    watching: the key rotates every 2 s, once each time, and both then serve the same signed keys."""
    period = 2.0
    keys_file = tmp_path / "keys.json"
    env = {"ENFPIRE_OHTTP_ROTATE_DAYS": repr(period / 86400), "ENFPIRE_OHTTP_GRACE": "1"}
    servers = [LiveServer(index_dir, "--ohttp-keys", str(keys_file), env=env) for _ in range(2)]
    try:
        seen = _watch(keys_file, 3 * period + 0.5)
        served = [[requests.get(s.url + path, timeout=5).content for path in (KEYS_PATH, SIGNED_PATH)]
                  for s in servers]
    finally:
        for server in servers:
            server.stop()
    gaps = [round(b[0] - a[0], 2) for a, b in itertools.pairwise(seen[1:])]
    print("rotations at", [round(t - seen[0][0], 2) for t, _ in seen[1:]], "gaps", gaps)
    assert len(seen) - 1 >= 3, seen
    assert all(period - 0.1 <= gap <= period + 0.75 for gap in gaps), gaps  # on time, never twice
    assert served[0] == served[1] and served[0][1].startswith(b"{")
    ids = [k["key_id"] for k in json.loads(keys_file.read_text())["keys"]]
    assert len(ids) == len(set(ids)) <= 4  # current, next and at most one retired in grace


# ---------------------------------------------------------------- the signed document, the pins, the key file


def test_the_signed_document_verifies_and_names_the_served_keys_and_public_digest(
        gateway: LiveServer, relay: LiveRelay, keys_file: Path) -> None:
    from edge_client.protocol.identity import open_signed_keys, parse_identity, verify_digest

    identity = parse_identity(_identity(keys_file))
    document = requests.get(relay.url.rstrip("/") + SIGNED_PATH, timeout=5).json()  # the relay forwards it
    schedule = open_signed_keys(document, identity, time.time())
    assert schedule.keys == requests.get(gateway.url + KEYS_PATH, timeout=5).content  # what standard clients get
    announced = ohttp.decode_key_configs(schedule.next)[0]
    # the served configuration lists every key the gateway accepts: current first, then the announced one
    assert [c.key_id for c in ohttp.decode_key_configs(schedule.keys)][1] == announced.key_id
    assert _seal_to(gateway, announced).status_code == 200  # accepted before it is current
    info = requests.get(gateway.url + "/v1/info", timeout=5).json()
    assert document["public"]["digest"] == info["public"]["digest"]
    verify_digest(identity, document["public"]["digest"], document["public"]["signature"])
    from edge_client.errors import IdentityError

    with pytest.raises(IdentityError):  # the key document's signature cannot pass for a digest's
        verify_digest(identity, document["public"]["digest"], document["signature"])
    with pytest.raises(IdentityError):
        open_signed_keys(document, bytes(32), time.time())


def test_tampered_signed_documents_are_refused() -> None:
    import base64

    from edge_client.errors import IdentityError
    from edge_client.protocol.identity import open_signed_keys
    from lite_server.ohttp.keys import ServerIdentity

    identity = ServerIdentity(bytes(range(32)))
    keys = ohttp.encode_key_configs([ohttp.KeyConfig(1, ohttp.public_key(ohttp.generate_private_key()))]).hex()
    payload = json.dumps({"format": 1, "keys": keys, "next": "", "next_at": None, "max_age": 10}).encode()
    good = identity.signed_keys(payload)
    assert open_signed_keys(good, identity.public_key, 0.0).keys.hex() == keys
    flipped = bytearray(base64.b64decode(good["payload"]))
    flipped[-3] ^= 1
    for bad in ({**good, "payload": base64.b64encode(bytes(flipped)).decode()},
                {**good, "signature": base64.b64encode(bytes(64)).decode()},
                {**good, "identity": "zz"}, {"identity": good["identity"]}, ["not", "an", "object"]):
        with pytest.raises(IdentityError):
            open_signed_keys(bad, identity.public_key, 0.0)


def test_pins_hold_the_identity_and_a_phone_restarts_without_fetching(
        gateway: LiveServer, relay: LiveRelay, keys_file: Path, extractor: Extractor, tmp_path: Path) -> None:
    from edge_client.protocol.oblivious import PIN_FILE

    first, wire = _phone(gateway, extractor, tmp_path, relay=relay.url)
    with first:
        first.info()
    pins = json.loads((tmp_path / PIN_FILE).read_text())[gateway.url]
    # (the consistency check's GETs of the relay's shared key configuration left aside: see test_one_view)
    assert pins["identity"] == _identity(keys_file) and _signed_and_sealed(wire) == ["GET", "POST"]
    again, wire = _phone(gateway, extractor, tmp_path, relay=relay.url)
    with again:
        again.info()
    assert _signed_and_sealed(wire) == ["POST"]  # the pinned document is still fresh


def test_a_pin_from_before_the_identity_is_upgraded_only_when_the_server_signs_that_key(
        gateway: LiveServer, relay: LiveRelay, keys_file: Path, extractor: Extractor, tmp_path: Path) -> None:
    from edge_client.errors import GatewayKeyError
    from edge_client.protocol.oblivious import PIN_FILE

    served = requests.get(gateway.url + KEYS_PATH, timeout=5).content
    (tmp_path / PIN_FILE).write_text(json.dumps({gateway.url: served.hex()}))
    phone, _ = _phone(gateway, extractor, tmp_path, relay=relay.url)
    with phone:
        phone.info()
    assert json.loads((tmp_path / PIN_FILE).read_text())[gateway.url]["identity"] == _identity(keys_file)
    other = tmp_path / "other"
    other.mkdir()
    foreign = ohttp.encode_key_configs([ohttp.KeyConfig(9, ohttp.public_key(ohttp.generate_private_key()))])
    (other / PIN_FILE).write_text(json.dumps({gateway.url: foreign.hex()}))
    phone, _ = _phone(gateway, extractor, other, relay=relay.url)
    with phone, pytest.raises(GatewayKeyError, match="server_identity"):
        phone.info()


def test_bad_identity_settings_are_config_errors(gateway: LiveServer, extractor: Extractor, tmp_path: Path) -> None:
    from edge_client.errors import ConfigError

    with pytest.raises(ConfigError, match="server_identity"):
        load_config(ClientConfig, env={}, server_identity="not a key")
    phone, _ = _phone(gateway, extractor, tmp_path, relay="http://127.0.0.2:9/", server_identity="ab" * 32,
                      gateway_keys="cd" * 32)
    with phone, pytest.raises(ConfigError, match="sha256"):
        phone.info()


@pytest.mark.parametrize("given", ["env", "flag"])
def test_the_cli_refuses_a_substituted_key_in_one_line(gateway: LiveServer, keys_file: Path, tmp_path: Path,
                                                       given: str) -> None:
    """The identity pinned as an app build would (ENFPIRE_SERVER_IDENTITY) or as a user would (--server-identity)."""
    identity = _identity(keys_file)
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", **({"ENFPIRE_SERVER_IDENTITY": identity} if given == "env" else {})}
    flag = ["--server-identity", identity] if given == "flag" else []
    liar = LyingRelay(gateway, "own")
    try:
        done = subprocess.run([sys.executable, "-m", "edge_client.cli", "info", "--server", gateway.url,
                               "--relay", liar.url, *flag], capture_output=True, text=True, timeout=60, env=env)
    finally:
        liar.stop()
    assert done.returncode == 2 and done.stdout == "" and liar.posts == 0
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: the key configuration is signed by identity")


def test_a_key_file_from_before_the_identity_gains_one_and_keeps_its_key(tmp_path: Path) -> None:
    from lite_server.ohttp.keys import GatewayKeys

    path = tmp_path / "keys.json"
    private = ohttp.generate_private_key()
    path.write_text(json.dumps({"keys": [{"key_id": 5, "private_key": private.hex(), "created": time.time(),
                                          "retired": None}]}))
    keys = GatewayKeys(path, grace=60)
    assert [c.key_id for c in ohttp.decode_key_configs(keys.body())] == [5, 6]  # kept current, 6 announced
    assert set(keys.private_keys()) == {5, 6} and keys.private_keys()[5][1] == private
    data = json.loads(path.read_text())
    assert len(bytes.fromhex(data["identity"]["private_key"])) == 32 and keys.identity.public_key
    assert GatewayKeys(path, grace=60).identity.public_hex == keys.identity.public_hex  # created once


def test_a_timer_rotates_without_requests(tmp_path: Path) -> None:
    from lite_server.ohttp.keys import GatewayKeys

    path = tmp_path / "keys.json"
    keys = GatewayKeys(path, grace=0.5, rotate_after=0.4)
    keys.start()
    try:
        seen = _watch(path, 1.5)
    finally:
        keys.stop()
    assert len(seen) - 1 >= 3, seen
