"""The development relay against a recording gateway: it forwards sealed bytes and nothing of the
client's, bounds what it accepts, and answers errors as JSON 4xx or 502."""
from __future__ import annotations

import threading
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
