"""The phone against a server that misbehaves: every fault ends in a typed
error or a successful retry, within the configured time, never a hang.

The adversary is a real HTTP server on loopback that answers from a script
(garbage, wrong shapes, slow or endless bodies, 429/503 with Retry-After).
Photo and model faults the extractor tests already cover (1x1, 20000x20000,
corrupt and missing models) are not repeated; here they go through the
client and the Android facade.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from edge_client import android
from edge_client.client import Client
from edge_client.config import ClientConfig
from edge_client.errors import (
    BadResponseError,
    EnfPireError,
    IncompatibleServerError,
    PhotoError,
    ServerError,
    ServerUnreachableError,
)
from edge_client.protocol import wire
from edge_client.vision.extractor import Extractor


@dataclass
class Reply:
    """One scripted answer."""

    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    delay: float = 0.0           # before the status line
    drip: float = 0.0            # seconds between body bytes
    endless: bool = False        # claim a huge body and stream zeros
    hang_up: bool = False        # close the connection without answering


class Misbehaving:
    """A loopback HTTP server answering each path from a script; the last reply repeats."""

    def __init__(self) -> None:
        self.script: dict[str, list[Reply]] = {}
        self.hits: Counter[str] = Counter()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.answer(self)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.answer(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def on(self, path: str, *replies: Reply) -> "Misbehaving":
        self.script[path] = list(replies)
        return self

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path
        self.hits[path] += 1
        replies = self.script.get(path) or [Reply(404, b'{"error":{"code":"not_found","message":"no"}}')]
        reply = replies.pop(0) if len(replies) > 1 else replies[0]
        time.sleep(reply.delay)
        if reply.hang_up:
            handler.close_connection = True
            return
        try:
            handler.send_response(reply.status)
            for name, value in reply.headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(10**10 if reply.endless else len(reply.body)))
            handler.end_headers()
            self._body(handler, reply)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: what we want

    @staticmethod
    def _body(handler: BaseHTTPRequestHandler, reply: Reply) -> None:
        if reply.endless:
            block = bytes(1 << 20)
            while True:
                handler.wfile.write(block)
        for i in range(len(reply.body)):
            if reply.drip:
                time.sleep(reply.drip)
                handler.wfile.write(reply.body[i:i + 1])
                handler.wfile.flush()
        if not reply.drip:
            handler.wfile.write(reply.body)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def bad_server() -> Iterator[Misbehaving]:
    server = Misbehaving()
    yield server
    server.close()


def info(extractor: Extractor, **changes: Any) -> Reply:
    payload = {"protocol": 1, "model_sha256": extractor.sha256, "dim": 1280, "n_spots": 3,
               "index_version": "v", "limits": {"max_k": 64, "max_body": 65536}, "transforms": {}}
    return Reply(body=json.dumps({**payload, **changes}).encode())


def candidates(features: Any, **changes: Any) -> Reply:
    candidate = {"id": "a", "name": "A", "lat": 1.0, "lon": 2.0, "info": {}, "features": features, **changes}
    return Reply(body=json.dumps({"index_version": "v", "candidates": [candidate]}).encode())


def within(seconds: float, call: Callable[[], Any]) -> Any:
    """Run ``call`` in a thread; fail (not hang) if it takes longer than ``seconds``. Returns or raises its outcome."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the client hung for more than {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture(scope="module")
def feature(extractor: Extractor, held_out: list[tuple[str, Path]]) -> np.ndarray:
    return extractor.extract(held_out[0][1])


def make_client(server: Misbehaving, extractor: Extractor, **settings: Any) -> Client:
    # The misbehaving server publishes no cells, so the client asks with vectors.
    settings = {"retries": 1, "backoff": 0.01, "read_timeout": 0.5, "connect_timeout": 0.5, "seed": 1,
                "transform": "noise", **settings}
    return Client(ClientConfig(server=server.url, **settings), extractor=extractor)


GOOD = wire.encode(np.ones((1, 1280), np.float32) / np.sqrt(1280))


@pytest.mark.parametrize("name, info_changes, reply, error", [
    ("bad JSON", {}, Reply(body=b"{nope"), BadResponseError),
    ("HTML error page", {}, Reply(500, b"<html>oops</html>", {"Content-Type": "text/html"}), ServerError),
    ("no candidate list", {}, Reply(body=b'{"candidates": 3}'), BadResponseError),
    ("wrong dimension", {}, candidates(wire.encode(np.ones((2, 1000), np.float32))), BadResponseError),
    ("truncated base64", {}, candidates({**GOOD, "data": GOOD["data"][:-7]}), BadResponseError),
    ("NaN features", {}, candidates(wire.encode(np.full((1, 1280), np.nan, np.float32))), BadResponseError),
    ("4-bit codes of a length no rotation fits", {},
     candidates({**wire.encode(np.ones((1, 1024), np.float32), "int4"), "shape": [1, 1280]}), BadResponseError),
    ("candidate without id", {}, Reply(body=json.dumps({"candidates": [{"features": GOOD}]}).encode()),
     BadResponseError),
    ("another model", {"model_sha256": "0" * 64}, candidates(GOOD), IncompatibleServerError),
    ("another protocol", {"protocol": 2}, candidates(GOOD), BadResponseError),
])
def test_garbage_answers_are_typed_errors(bad_server: Misbehaving, extractor: Extractor, feature: np.ndarray,
                                          name: str, info_changes: dict[str, Any], reply: Reply,
                                          error: type[Exception]) -> None:
    bad_server.on("/v1/info", info(extractor, **info_changes)).on("/v1/candidates", reply)
    with make_client(bad_server, extractor) as client, pytest.raises(error):
        within(5, lambda: client.recognize_feature(feature))


def test_bad_json_info_is_a_typed_error(bad_server: Misbehaving, extractor: Extractor, feature: np.ndarray) -> None:
    bad_server.on("/v1/info", Reply(body=b"\x00\xff not json"))
    with make_client(bad_server, extractor) as client, pytest.raises(BadResponseError):
        within(5, lambda: client.recognize_feature(feature))


@pytest.mark.parametrize("retry_after", ["0.3", "Wed, 21 Oct 2015 07:28:00 GMT"])
@pytest.mark.parametrize("status", [429, 503])
def test_busy_then_good_is_retried(bad_server: Misbehaving, extractor: Extractor, feature: np.ndarray,
                                   status: int, retry_after: str) -> None:
    busy = Reply(status, b'{"error":{"code":"busy","message":"later"}}',
                 {"Content-Type": "application/json", "Retry-After": retry_after})
    bad_server.on("/v1/info", info(extractor)).on("/v1/candidates", busy, candidates(GOOD))
    with make_client(bad_server, extractor, retries=2) as client:
        result = within(5, lambda: client.recognize_feature(feature))
    assert result.spot_id == "a" and bad_server.hits["/v1/candidates"] == 2


def test_retry_after_is_capped_and_retries_end(bad_server: Misbehaving, extractor: Extractor,
                                               feature: np.ndarray) -> None:
    """A server asking for an hour gets max_retry_after per retry, then a typed error with its Retry-After."""
    busy = Reply(503, b'{"error":{"code":"busy","message":"later"}}',
                 {"Content-Type": "application/json", "Retry-After": "3600"})
    bad_server.on("/v1/info", info(extractor)).on("/v1/candidates", busy)
    with make_client(bad_server, extractor, retries=2, max_retry_after=0.2) as client, \
            pytest.raises(ServerError) as caught:
        within(3, lambda: client.recognize_feature(feature))
    assert caught.value.status == 503 and caught.value.retry_after == 3600
    assert bad_server.hits["/v1/candidates"] == 3


@pytest.mark.parametrize("reply", [Reply(delay=3.0), Reply(hang_up=True)], ids=["slow", "hangs up"])
def test_slow_or_silent_server_is_unreachable(bad_server: Misbehaving, extractor: Extractor,
                                              feature: np.ndarray, reply: Reply) -> None:
    bad_server.on("/v1/info", reply)
    with make_client(bad_server, extractor) as client, pytest.raises(ServerUnreachableError):
        within(3, lambda: client.recognize_feature(feature))


def test_dripping_body_cannot_hold_the_client(bad_server: Misbehaving, extractor: Extractor,
                                              feature: np.ndarray) -> None:
    """Bytes every 0.2 s never trip a per-read timeout of 0.5 s; the whole answer still has a deadline."""
    bad_server.on("/v1/info", info(extractor)).on("/v1/candidates", Reply(body=candidates(GOOD).body, drip=0.2))
    with make_client(bad_server, extractor, retries=0) as client, pytest.raises(ServerUnreachableError):
        within(3, lambda: client.recognize_feature(feature))


def test_endless_body_is_cut_off(bad_server: Misbehaving, extractor: Extractor, feature: np.ndarray) -> None:
    bad_server.on("/v1/info", info(extractor)).on("/v1/candidates", Reply(endless=True))
    with make_client(bad_server, extractor, read_timeout=5.0) as client, \
            pytest.raises((BadResponseError, ServerUnreachableError)):
        within(8, lambda: client.recognize_feature(feature))


def test_android_facade_never_raises(bad_server: Misbehaving, extractor: Extractor,
                                     held_out: list[tuple[str, Path]], tmp_path: Path) -> None:
    """Every fault reaches Kotlin as {"ok": false, "error": {type, message}}."""
    bad_server.on("/v1/info", info(extractor)).on("/v1/candidates", Reply(body=b"{nope"))
    settings = json.dumps({"retries": 0, "read_timeout": 0.5, "transform": "noise"})
    jpeg = held_out[0][1].read_bytes()
    answers = {
        "garbage": android.recognize_jpeg(jpeg, bad_server.url, settings),
        "photo": android.recognize_jpeg(b"\x89PNG\r\n\x1a\n" + bytes(20), bad_server.url, settings),
        "model": android.extract_jpeg(jpeg, json.dumps({"model": str(tmp_path / "none.tflite")})),
    }
    types = {k: json.loads(v)["error"]["type"] for k, v in answers.items() if not json.loads(v)["ok"]}
    assert types == {"garbage": "BadResponseError", "photo": "PhotoError", "model": "ModelNotFoundError"}
    android.close_all()


def test_unreadable_photos_are_photo_errors(bad_server: Misbehaving, extractor: Extractor, tmp_path: Path) -> None:
    """A folder, a dangling link, a file that is not an image: PhotoError naming it, from the client."""
    bad_server.on("/v1/info", info(extractor))
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "notes.jpg").write_text("not a photo")
    with make_client(bad_server, extractor) as client:
        for name in ("dangling.jpg", "folder.jpg", "notes.jpg"):
            with pytest.raises(PhotoError, match=name):
                client.recognize(tmp_path / name)
    assert issubclass(PhotoError, EnfPireError)
