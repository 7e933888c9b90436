"""One view for everyone (issue 26, part 2): a server that lies to single a phone out is caught.

Each attack is a small real server on 127.0.0.1 (the real app of ``create_app`` with one part
made to misbehave) behind the real ``enfpire-relay`` on 127.0.0.2, and real phones (``Client``):

- per-fetch keys: a gateway that answers every key configuration fetch (signed or not) with a
  fresh key. The relay fetches its shared copy once for all phones; a phone whose signed key is
  not in it, or whose gateway states another key inside the sealed channel, refuses with nothing
  sealed to the key;
- per-phone documents: a server that serves each phone its own public document (its own cell
  numbering): the phone's digest is not the relay's shared one, so it refuses, keeps nothing and
  sends no query;
- a version label used as a cookie: a server that gives each phone its own ``index_version``
  label: the phone names its document by the digest it computed (``?since=DIGEST``), the same
  for every phone, and never sends the label back.
"""
from __future__ import annotations

import dataclasses
import io
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pytest
import requests
from flask import Flask, request
from werkzeug.serving import make_server
from werkzeug.wrappers import Response

from edge_client.client import Client, public_path
from edge_client.config import ClientConfig
from edge_client.errors import ConsistencyError
from edge_client.protocol import ohttp
from edge_client.protocol.oblivious import PIN_FILE
from edge_client.protocol.public import SHARED_PATH, PublicParams
from edge_client.vision.extractor import Extractor
from lite_server.api.app import create_app
from lite_server.config import ServerConfig
from lite_server.ohttp.gateway import EXTENSION as OHTTP, KEYS_PATH
from lite_server.ohttp.keys import FORMAT, GatewayKeys
from lite_server.search.publication import document
from tests.conftest import SESSION_CELL_MIN_SPOTS
from tools.live import LiveRelay

RELAY_HOST = "127.0.0.2"
StartResponse = Callable[[str, list[tuple[str, str]]], Any]
Entry = dict[str, Any]  # one request the server decided: method, path, query, sealed, peer (key_id)


class Loopback:
    """A real app on 127.0.0.1 in a thread; every request it decides (outer and sealed inner) recorded."""

    def __init__(self, app: Flask):
        self.app = app
        self.inner = app.wsgi_app  # the gateway runs sealed requests through app.wsgi_app too: this sees them
        app.wsgi_app = self  # type: ignore[method-assign]
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        sealed = bool(environ.get("enfpire.ohttp"))
        entry = {"method": environ["REQUEST_METHOD"], "path": environ.get("PATH_INFO", ""),
                 "query": environ.get("QUERY_STRING", ""), "sealed": sealed, "peer": environ.get("REMOTE_ADDR")}
        if entry["method"] == "POST" and entry["path"] == "/ohttp":  # the key id a sealed request names
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            entry["key_id"] = body[0] if body else None
            environ["wsgi.input"] = io.BytesIO(body)
        with self.lock:
            self.seen.append(entry)
        return self.handle(environ, start_response, entry)

    def handle(self, environ: dict[str, Any], start_response: StartResponse, entry: Entry) -> Iterable[bytes]:
        return self.inner(environ, start_response)

    def inner_json(self, environ: dict[str, Any]) -> Any:
        """What the real app answers (uncompressed)."""
        plain = {k: v for k, v in environ.items() if k != "HTTP_ACCEPT_ENCODING"}
        return json.loads(Response.from_app(self.inner, plain, buffered=True).get_data())

    def count(self, **match: Any) -> int:
        with self.lock:
            return sum(all(e.get(k) == v for k, v in match.items()) for e in self.seen)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _json(payload: Any, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    return Response(json.dumps(payload), mimetype="application/json")(environ, start_response)


def _app(index_dir: Path, keys: Path) -> Flask:
    return create_app(ServerConfig(index=str(index_dir), ohttp_keys=str(keys), cell_min_spots=SESSION_CELL_MIN_SPOTS))


def _phone(server: Loopback, relay: LiveRelay, home: Path, extractor: Extractor, **settings: Any) -> Client:
    settings.setdefault("cache", False)
    return Client(ClientConfig(server=server.url, relay=relay.url, state_dir=str(home), seed=5, retries=1,
                               backoff=0.05, **settings), extractor=extractor)


def _doc(server: Loopback) -> PublicParams:
    return document(server.app.extensions["enfpire"].lookup)


@pytest.fixture(scope="module")
def features(extractor: Extractor, held_out: list[tuple[str, Path]]) -> list[tuple[str, np.ndarray]]:
    return [(spot, extractor.extract(photo)) for spot, photo in held_out[:2]]


# --- per-fetch keys ------------------------------------------------------------------------------------

class PerFetchKeys(GatewayKeys):
    """Every fetch of the key configuration makes a fresh key; every key made still opens requests.

    ``stated``: what the gateway says its keys are inside the sealed ``/v1/info``: ``"sealed"``
    (the key the request came under: a gateway that plays along) or ``"fresh"`` (yet another)."""

    stated = "sealed"
    signs_shared = False
    last = b""
    current: threading.local = threading.local()

    def __init__(self, path: Path, grace: float):
        super().__init__(path, grace)
        self.made: dict[int, tuple[ohttp.KeyConfig, bytes]] = {}

    def fresh(self) -> bytes:
        private = ohttp.generate_private_key()
        config = ohttp.KeyConfig(len(self.made) % 250 + 1, ohttp.public_key(private))
        self.made[config.key_id] = (config, private)
        return ohttp.encode_key_configs([config])

    def body(self) -> bytes:
        if request.path == KEYS_PATH:
            self.last = self.fresh()
            return self.last
        if self.stated == "fresh":
            return self.fresh()
        key_id = getattr(self.current, "key_id", None)  # /v1/info inside the sealed channel
        return ohttp.encode_key_configs([self.made[key_id][0]]) if key_id in self.made else self.fresh()

    def private_keys(self) -> dict[int, tuple[ohttp.KeyConfig, bytes]]:
        return self.made

    def signed(self) -> dict[str, str]:
        """The server signs whatever it hands out: a fresh key for every fetch of the signed document too,
        or (``signs_shared``) the key the relay's copy holds, for a gateway that lies only inside the
        sealed channel."""
        keys = self.last if self.signs_shared and self.last else self.fresh()
        payload = {"format": FORMAT, "keys": keys.hex(), "next": "", "next_at": None, "max_age": self.max_age()}
        return self.identity.signed_keys(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())


class PerFetchGateway(Loopback):
    def __init__(self, app: Flask):
        super().__init__(app)
        old = app.extensions[OHTTP]
        self.keys = app.extensions[OHTTP] = PerFetchKeys(old.path, old.grace)

    def handle(self, environ: dict[str, Any], start_response: StartResponse, entry: Entry) -> Iterable[bytes]:
        if "key_id" in entry:  # the sealed request opened in this thread says which key it came under
            PerFetchKeys.current.key_id = entry["key_id"]
        return self.inner(environ, start_response)


@pytest.fixture()
def per_fetch(index_dir: Path, tmp_path: Path) -> Iterator[tuple[PerFetchGateway, LiveRelay]]:
    gateway = PerFetchGateway(_app(index_dir, tmp_path / "keys.json"))
    relay = LiveRelay(gateway.url + "/ohttp", RELAY_HOST, "--refresh", "60")
    yield gateway, relay
    relay.stop()
    gateway.stop()
    PerFetchKeys.stated, PerFetchKeys.signs_shared, PerFetchKeys.last = "sealed", False, b""


def test_per_fetch_keys_no_phone_seals_to_a_key_of_its_own(
        per_fetch: tuple[PerFetchGateway, LiveRelay], extractor: Extractor,
        features: list[tuple[str, np.ndarray]], tmp_path: Path) -> None:
    gateway, relay = per_fetch
    assert requests.get(gateway.url + KEYS_PATH, timeout=5).content != \
        requests.get(gateway.url + KEYS_PATH, timeout=5).content  # the attack: a fresh key every fetch
    for n in range(3):
        with _phone(gateway, relay, tmp_path / f"phone{n}", extractor) as phone:
            with pytest.raises(ConsistencyError, match="not in the shared"):
                phone.recognize_feature(features[n % len(features)][1])
    # Each phone's signed key was its own, never the one the relay fetched once (on its timer, for all):
    # nothing was sealed to any of them, so the gateway could not link a phone's requests by key.
    assert gateway.count(path="/ohttp") == 0
    assert gateway.count(path=KEYS_PATH, peer=RELAY_HOST) == 1


def test_a_key_of_its_own_is_refused_before_anything_is_sealed_to_it(
        per_fetch: tuple[PerFetchGateway, LiveRelay], extractor: Extractor, tmp_path: Path) -> None:
    gateway, relay = per_fetch
    # A phone that fetched its key another way (here straight from the gateway, which gives it its own)
    with _phone(gateway, relay, tmp_path, extractor, gateway_keys_url=gateway.url + KEYS_PATH) as phone:
        with pytest.raises(ConsistencyError, match="not in the shared"):
            phone.info()
    assert gateway.count(path="/ohttp") == 0  # nothing sealed to it reached the gateway
    assert not (tmp_path / PIN_FILE).exists() or gateway.url not in json.loads((tmp_path / PIN_FILE).read_text())
    # A gateway whose own word, inside the sealed channel, is another key than the shared one
    PerFetchKeys.stated, PerFetchKeys.signs_shared = "fresh", True
    with _phone(gateway, relay, tmp_path / "second", extractor) as phone:
        with pytest.raises(ConsistencyError, match="without the key"):
            phone.check_model()
    assert gateway.count(path="/v1/info", sealed=True) == 1 and gateway.count(path="/v1/public") == 0
    assert gateway.count(path="/v1/candidates") == 0


# --- per-phone documents ------------------------------------------------------------------------------

class PerPhoneDocuments(Loopback):
    """Each phone (each sealed /v1/info) gets its own cell numbering, consistently in /v1/info and /v1/public;
    whatever does not come through the gateway (the relay's own fetch) gets the real document."""

    def __init__(self, app: Flask):
        super().__init__(app)
        self.phones = 0
        self.served: list[str] = []

    def own(self, phone: int) -> PublicParams:
        """The real document with spot ``phone`` moved to the next cell: a cell assignment of its own."""
        doc = _doc(self)
        cell = doc.columns["cell"].copy()
        cell[phone % len(cell)] = (int(cell[phone % len(cell)]) + 1) % doc.n_cells
        return dataclasses.replace(doc, columns={**doc.columns, "cell": cell})

    def handle(self, environ: dict[str, Any], start_response: StartResponse, entry: Entry) -> Iterable[bytes]:
        path, sealed = entry["path"], entry["sealed"]
        if sealed and path == "/v1/info":
            self.phones += 1
            info = self.inner_json(environ)
            info["public"]["digest"] = self.own(self.phones).digest
            return _json(info, environ, start_response)
        if sealed and path == "/v1/public":
            doc = self.own(self.phones)
            self.served.append(doc.digest)
            return _json(doc.to_payload(), environ, start_response)
        return self.inner(environ, start_response)


def test_per_phone_documents_are_refused_and_nothing_is_sent(
        index_dir: Path, extractor: Extractor, features: list[tuple[str, np.ndarray]], tmp_path: Path) -> None:
    server = PerPhoneDocuments(_app(index_dir, tmp_path / "keys.json"))
    relay = LiveRelay(server.url + "/ohttp", RELAY_HOST, "--refresh", "60")
    try:
        for n in range(2):
            home = tmp_path / f"phone{n}"
            with _phone(server, relay, home, extractor, cache=True) as phone:
                with pytest.raises(ConsistencyError, match="not the one shared"):
                    phone.recognize_feature(features[n][1])
                assert not public_path(phone.config).exists() and phone._public is None  # nothing kept
        assert len(set(server.served)) == len(server.served) >= 2  # each phone got its own document
        assert _doc(server).digest not in server.served
        assert server.count(path="/v1/candidates") == 0  # and no query left any phone
    finally:
        relay.stop()
        server.stop()


# --- a version label as a cookie ----------------------------------------------------------------------

class VersionCookie(Loopback):
    """Each phone (each sealed /v1/info) gets its own version label, in /v1/info and /v1/public (with the
    digest the phone would compute for it); ``update`` moves everyone to new content."""

    def __init__(self, app: Flask):
        super().__init__(app)
        self.phones = 0
        self.updated = False

    def label(self) -> str:
        return f"cookie-{self.phones:04d}-{'b' if self.updated else 'a'}"

    def content(self, label: str) -> PublicParams:
        doc = _doc(self)
        if self.updated:  # an index update: one spot's photo count changes
            photos = doc.columns["photos"].copy()
            photos[0] ^= 1
            doc = dataclasses.replace(doc, columns={**doc.columns, "photos": photos})
        return dataclasses.replace(doc, version=label)

    def handle(self, environ: dict[str, Any], start_response: StartResponse, entry: Entry) -> Iterable[bytes]:
        path, sealed = entry["path"], entry["sealed"]
        if path == SHARED_PATH:  # what the relay copies for everyone: the same content, of course
            return _json({"index_version": "shared", "digest": self.content("shared").digest}, environ, start_response)
        if path == "/v1/info":
            self.phones += sealed
            label = self.label() if sealed else "shared"
            info = self.inner_json(environ)
            doc = self.content(label)
            info["index_version"] = label
            info["public"] = {"index_version": label, "digest": doc.digest}
            return _json(info, environ, start_response)
        if path == "/v1/public":
            return _json(self.content(self.label()).to_payload(), environ, start_response)
        return self.inner(environ, start_response)


def _shared_digest(relay: LiveRelay) -> str:
    answer = requests.get(relay.url + SHARED_PATH.lstrip("/"), timeout=5)
    return str(answer.json()["digest"]) if answer.ok else ""


def test_a_version_label_is_never_sent_back_the_digest_is(
        index_dir: Path, extractor: Extractor, tmp_path: Path) -> None:
    server = VersionCookie(_app(index_dir, tmp_path / "keys.json"))
    relay = LiveRelay(server.url + "/ohttp", RELAY_HOST, "--refresh", "0.3")
    homes = [tmp_path / "a", tmp_path / "b"]
    try:
        held = []
        for home in homes:  # each phone takes the document with its own label (and keeps it)
            with _phone(server, relay, home, extractor, cache=True) as phone:
                phone.check_model()
                held.append(phone.public())
        assert held[0].version != held[1].version and held[0].version.startswith("cookie-")

        server.updated = True  # an index update: the phones ask for the change since what they hold
        deadline = time.monotonic() + 10
        while _shared_digest(relay) != server.content("x").digest and time.monotonic() < deadline:
            time.sleep(0.1)
        mark, now = len(server.seen), []
        for home in homes:
            with _phone(server, relay, home, extractor, cache=True) as phone:
                phone.info(refresh=True)
                now.append(phone.public())
        asked = [e["query"] for e in server.seen[mark:] if e["path"] == "/v1/public"]
        # Each phone named what it holds by the digest it computed of it: not its label, and the same
        # for both (the content is one), so the server cannot tell the two phones apart by it.
        assert asked == [f"since={held[0].digest}"] * len(homes) and held[0].digest == held[1].digest, asked
        assert not any("cookie-" in e["path"] + e["query"] for e in server.seen)  # no label ever went back
        assert [doc.digest for doc in now] == [server.content("x").digest] * len(homes)
    finally:
        relay.stop()
        server.stop()


def test_an_honest_gateway_behind_the_relay_passes_every_check(
        index_dir: Path, extractor: Extractor, features: list[tuple[str, np.ndarray]], tmp_path: Path) -> None:
    server = Loopback(_app(index_dir, tmp_path / "keys.json"))
    relay = LiveRelay(server.url + "/ohttp", RELAY_HOST, "--refresh", "60")
    try:
        for n in range(2):
            with _phone(server, relay, tmp_path / f"phone{n}", extractor, cache=True) as phone:
                assert phone.recognize_feature(features[n][1]).candidates
                assert phone._public_checked
        # The shared copies are the gateway's, byte for byte, fetched once for both phones.
        assert requests.get(relay.url + KEYS_PATH.lstrip("/"), timeout=5).content == \
            requests.get(server.url + KEYS_PATH, timeout=5).content
        assert _shared_digest(relay) == _doc(server).digest
        assert server.count(path=KEYS_PATH) == 2 and server.count(path=SHARED_PATH) == 1
        assert server.count(path="/v1/candidates", sealed=True) == 2
        relay.stop()  # offline: a kept document that passed the check is used with no network at all
        with _phone(server, relay, tmp_path / "phone0", extractor, cache=True) as phone:
            answer = phone.answer_locally(features[0][1])
            assert answer is not None and answer.candidates and phone.last_public == ("kept", 0)
    finally:
        relay.stop()
        server.stop()


def test_a_document_kept_without_the_check_is_checked_before_its_first_use_with_it(
        index_dir: Path, extractor: Extractor, tmp_path: Path) -> None:
    server = Loopback(_app(index_dir, tmp_path / "keys.json"))
    relay = LiveRelay(server.url + "/ohttp", RELAY_HOST, "--refresh", "60")
    try:
        direct = Client(ClientConfig(server=server.url, state_dir=str(tmp_path), seed=5), extractor=extractor)
        with direct:  # no relay: nothing to compare with, the document is kept unchecked
            direct.check_model()
            assert not direct.config.shared_origin() and direct.public_store.load_checked()[1] is False
        with _phone(server, relay, tmp_path, extractor, cache=True) as phone:
            phone.check_model()
            assert phone.last_public == ("kept", 0) and phone._public_checked
            assert phone.public_store.load_checked()[1] is True
        assert server.count(path="/v1/public") == 1  # checked against the shared copy, not downloaded again
    finally:
        relay.stop()
        server.stop()


def test_the_check_is_on_with_a_relay_and_configurable() -> None:
    from edge_client.config import load_config
    from edge_client.errors import ConfigError

    assert ClientConfig(relay="http://127.0.0.2:8090/").shared_origin() == "http://127.0.0.2:8090"
    assert ClientConfig().shared_origin() == ""  # direct and no consistency_url: nothing to compare with
    assert ClientConfig(relay="http://r.example/", consistency=False).shared_origin() == ""
    assert load_config(ClientConfig, env={"ENFPIRE_RELAY": "https://relay.example/ohttp",
                                          "ENFPIRE_CONSISTENCY_URL": "https://mirror.example/x"}
                       ).shared_origin() == "https://mirror.example"
    assert load_config(ClientConfig, env={"ENFPIRE_RELAY": "https://r.example/", "ENFPIRE_CONSISTENCY": "off"}
                       ).shared_origin() == ""
    with pytest.raises(ConfigError, match="consistency_url"):
        ClientConfig(consistency_url="mirror.example")
