"""The development relay against a recording gateway: it forwards sealed bytes and nothing of the
client's, bounds what it accepts, and answers errors as JSON 4xx or 502; it serves every client the
same shared copy of the gateway's key configuration and public digest, fetched on its own timer."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest
import requests

from tools.live import LiveRelay, free_port


class Recorder(BaseHTTPRequestHandler):
    """A stand-in gateway that records what reaches it and answers with a fixed sealed body."""

    seen: list[tuple[str, dict[str, str], bytes]] = []
    answer_status = 200

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.seen.append((self.client_address[0], dict(self.headers), body))
        self.send_response(self.answer_status)
        self.send_header("Content-Type", "message/ohttp-res" if self.answer_status == 200 else "text/html")
        self.send_header("Content-Length", "4")
        self.send_header("Set-Cookie", "track=me")
        self.end_headers()
        self.wfile.write(b"seal")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def recorder() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/ohttp"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def relay(recorder: str) -> Iterator[LiveRelay]:
    relay = LiveRelay(recorder, "127.0.0.2", "--max-body", "1000")
    yield relay
    relay.stop()


def test_forwards_only_the_sealed_body_with_content_type_and_length(relay: LiveRelay) -> None:
    Recorder.seen.clear()
    response = requests.post(relay.url, data=b"sealed-bytes", timeout=10, headers={
        "Content-Type": "message/ohttp-req", "User-Agent": "phone-model-123", "Cookie": "id=42",
        "X-Forwarded-For": "10.1.2.3", "Forwarded": "for=10.1.2.3", "Accept-Language": "de-CH"})
    assert response.status_code == 200 and response.content == b"seal"
    assert response.headers["Content-Type"] == "message/ohttp-res" and "Set-Cookie" not in response.headers
    peer, headers, body = Recorder.seen[-1]
    assert body == b"sealed-bytes" and peer == "127.0.0.2"
    assert {k.lower() for k in headers} <= {"host", "content-type", "content-length", "connection"}, headers
    assert headers["Content-Type"] == "message/ohttp-req"


@pytest.mark.parametrize("method, body, content_type, status", [
    ("GET", None, None, 405), ("PUT", b"x", "message/ohttp-req", 405),
    ("POST", b"{}", "application/json", 415), ("POST", b"x" * 1001, "message/ohttp-req", 413)])
def test_refuses_what_is_not_a_sealed_request(relay: LiveRelay, method: str, body: bytes | None,
                                              content_type: str | None, status: int) -> None:
    Recorder.seen.clear()
    headers = {"Content-Type": content_type} if content_type else {}
    response = requests.request(method, relay.url, data=body, headers=headers, timeout=10)
    assert response.status_code == status and response.json()["error"]["code"]
    assert Recorder.seen == []  # nothing reached the gateway


def test_gateway_failures_are_502(relay: LiveRelay) -> None:
    Recorder.answer_status = 500
    try:
        response = requests.post(relay.url, data=b"x", headers={"Content-Type": "message/ohttp-req"}, timeout=10)
    finally:
        Recorder.answer_status = 200
    assert response.status_code == 502 and response.json()["error"]["code"] == "bad_gateway"
    dead = LiveRelay(f"http://127.0.0.1:{free_port()}/ohttp", "127.0.0.2")
    try:
        response = requests.post(dead.url, data=b"x", headers={"Content-Type": "message/ohttp-req"}, timeout=10)
    finally:
        dead.stop()
    assert response.status_code == 502
    # and the relay still serves
    assert requests.post(relay.url, data=b"y", headers={"Content-Type": "message/ohttp-req"}, timeout=10).ok


# --- shared copies: the key configuration and the public digest, one fetch for every client ------------

class Publisher(BaseHTTPRequestHandler):
    """A stand-in gateway that answers every key configuration fetch with new bytes (a per-fetch key)
    and states a public digest; it records every fetch with its headers."""

    fetches: list[tuple[str, dict[str, str]]] = []
    digest = "ab" * 32

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.fetches.append((self.path, dict(self.headers)))
        if self.path == "/.well-known/ohttp-gateway":
            body, content_type = f"key-{len(self.fetches)}".encode(), "application/ohttp-keys"
        elif self.path == "/.well-known/enfpire-public":
            body = json.dumps({"index_version": "v7", "digest": self.digest, "extra": "dropped"}).encode()
            content_type = "application/json"
        else:
            body, content_type = b"{}", "application/json"
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_shared_copies_are_fetched_once_for_every_client_and_refreshed_on_the_timer() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Publisher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    relay = LiveRelay(f"http://127.0.0.1:{server.server_address[1]}/ohttp", "127.0.0.2", "--refresh", "1")
    try:
        keys_url, public_url = relay.url + ".well-known/ohttp-gateway", relay.url + ".well-known/enfpire-public"
        with ThreadPoolExecutor(8) as pool:  # many phones at once, with their own headers
            answers = list(pool.map(lambda n: requests.get(keys_url, timeout=10, headers={
                "User-Agent": f"phone-{n}", "Cookie": f"id={n}"}), range(40)))
        assert {a.status_code for a in answers} == {200} and len({a.content for a in answers}) == 1
        assert answers[0].headers["Content-Type"] == "application/ohttp-keys"
        assert "public" in answers[0].headers["Cache-Control"] and int(answers[0].headers["Age"]) <= 1
        keys_fetched = [h for p, h in Publisher.fetches if p == "/.well-known/ohttp-gateway"]
        assert len(keys_fetched) == 1  # forty phones, one fetch: the gateway cannot tell them apart
        assert all(k.lower() in {"host", "connection"} for h in keys_fetched for k in h), keys_fetched
        shared = requests.get(public_url, timeout=10)
        assert shared.json() == {"index_version": "v7", "digest": Publisher.digest}
        time.sleep(2.3)  # the timer, not the phones, decides when the gateway is asked again
        for _ in range(20):
            assert requests.get(keys_url, timeout=10).ok
        fetched = sum(p == "/.well-known/ohttp-gateway" for p, _ in Publisher.fetches)
        assert 2 <= fetched <= 4, fetched
        assert requests.get(keys_url, timeout=10).content != answers[0].content  # the timer's copy replaced it
        Publisher.digest = "not a digest"  # what the gateway states must be a digest to be shared
        time.sleep(1.3)
        assert requests.get(public_url, timeout=10).json() == {"index_version": "v7", "digest": "ab" * 32}
    finally:
        relay.stop()
        server.shutdown()
        server.server_close()
        Publisher.digest = "ab" * 32


def test_no_shared_copy_without_a_gateway_is_502() -> None:
    dead = LiveRelay(f"http://127.0.0.1:{free_port()}/ohttp", "127.0.0.2")
    try:
        for path in (".well-known/ohttp-gateway", ".well-known/enfpire-public"):
            answer = requests.get(dead.url + path, timeout=10)
            assert answer.status_code == 502 and answer.json()["error"]["code"] == "bad_gateway"
    finally:
        dead.stop()
