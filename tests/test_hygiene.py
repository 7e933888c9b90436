"""Privacy hygiene, tested on the real server: logs carry no feature, payload
or client address even with ``-v``; answers set no cookie or identifier;
every request of one kind has one size on the wire."""
from __future__ import annotations

import http.client
import json
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import requests

from edge_client.client import Client
from edge_client.config import ClientConfig
from edge_client.privacy.transforms import TRANSFORMS
from edge_client.protocol import wire
from edge_client.vision.extractor import Extractor
from tools.live import LiveServer

#: Every header a lookup answer may carry; anything else could be an identifier.
ALLOWED_HEADERS = {"content-type", "content-length", "cache-control", "date", "server", "allow",
                   "retry-after", "connection", "content-encoding", "vary"}


def _post(port: int, body: bytes, content_type: str = "application/json") -> tuple[int, int]:
    """POST over a fresh connection; (status, the client's own source port)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.connect()
        source_port = connection.sock.getsockname()[1]
        connection.request("POST", "/v1/candidates", body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        response.read()
        return response.status, source_port
    finally:
        connection.close()


def test_verbose_server_logs_no_feature_payload_or_client_address(
        index_dir: Path, extractor: Extractor, held_out: list[tuple[str, Path]]) -> None:
    server = LiveServer(index_dir, "-v")
    sent: list[str] = []
    ports: list[int] = []
    try:
        for _, photo in held_out[:6]:
            body = {"vector": wire.encode(extractor.extract(photo)), "k": 3}
            sent.append(body["vector"]["data"])
            for payload in (json.dumps(body).encode(), json.dumps({**body, "k": "x"}).encode(),
                            json.dumps({**body, "zz": body["vector"]["data"]}).encode(), b"{" + payload_tail(body)):
                status, port = _post(server.port, payload)
                assert status in (200, 400)
                ports.append(port)
        ports.append(_post(server.port, b"x" * 70_000)[1])
        server.process.send_signal(signal.SIGHUP)
        assert requests.get(server.url + "/readyz", timeout=5).status_code == 200
    finally:
        log = server.stop()
    assert "INFO" in log and "serving index version" in log  # verbose logging really was on
    for port in set(ports):
        assert not re.search(rf"(?<!\d){port}(?!\d)", log), f"client port {port} in the log"
    for data in sent:
        assert data[:16] not in log and data[-16:] not in log
    for line in log.splitlines():
        if "127.0.0.1" in line:  # only the server's own listening address may appear
            assert line.startswith(("serving ", "admin API on ")), line


def payload_tail(body: dict[str, object]) -> bytes:
    """A body cut in the middle of its vector data: invalid JSON that still carries a feature."""
    return json.dumps(body).encode()[:-50]


def test_answers_carry_no_cookie_or_identifier(live_server: LiveServer, extractor: Extractor,
                                               held_out: list[tuple[str, Path]]) -> None:
    good = {"vector": wire.encode(extractor.extract(held_out[0][1])), "k": 2}
    answers = [requests.get(live_server.url + path, timeout=5) for path in ("/healthz", "/readyz", "/v1/info",
                                                                            "/openapi.json", "/nope")]
    answers += [requests.post(live_server.url + "/v1/candidates", json=body, timeout=5)
                for body in (good, good, {"k": 1}, [1])]
    answers.append(requests.delete(live_server.url + "/v1/candidates", timeout=5))
    for response in answers:
        assert {h.lower() for h in response.headers} <= ALLOWED_HEADERS, response.headers
        assert response.headers["Cache-Control"] == "no-store" and not response.cookies
    same = [a for a in answers if a.request.method == "POST" and a.status_code == 200]
    assert len(same) == 2 and same[0].content == same[1].content  # nothing per-request in the answer


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_requests_of_one_kind_have_one_size(name: str, live_server: LiveServer, extractor: Extractor,
                                            held_out: list[tuple[str, Path]]) -> None:
    """Same transform, different photos and random draws: the same body length and bytes on the wire."""
    # No answer cache: these photos must all leave as requests for their sizes to be compared.
    with Client(ClientConfig(server=live_server.url, transform=name, seed=11, cache=False), extractor=extractor) as client:
        features = [extractor.extract(photo) for _, photo in held_out[:8]]
        features.append(np.eye(1, 1280, 0, dtype=np.float32)[0])  # an extreme, sparse feature
        lengths = {len(json.dumps(client.ask(f)[0], separators=(",", ":"))) for f in features}
        wire_sizes = {client.recognize_feature(f).bytes_sent for f in features}
    assert len(lengths) == 1 and len(wire_sizes) == 1, (lengths, wire_sizes)
