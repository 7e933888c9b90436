"""Generated bad input against every endpoint: no 5xx, every error in the JSON shape.

Hypothesis builds requests at three levels: near-valid candidate bodies (the
wire matrix with wrong types, huge or overflowing shapes, NaN, bad or
truncated base64), arbitrary JSON, and arbitrary HTTP (methods, paths,
content types, raw and oversized bodies). The short runs go through Flask's
test client in ``make test``; the soak runs send at least :data:`LONG`
requests to each endpoint, the lookup ones over real HTTP to waitress.
"""
from __future__ import annotations

import base64
import http.client
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_client.protocol import wire
from tests.conftest import copy_index
from tools.live import LiveServer

SHORT, LONG = 150, 5000
TOKEN = "fuzz-admin-token-0123456789"
LOOKUP_ENDPOINTS = ["/healthz", "/readyz", "/v1/info", "/v1/candidates", "/openapi.json"]
ADMIN_ENDPOINTS = ["/admin/v1/status", "/admin/v1/reload", "/admin/v1/spots", "/admin/v1/spots/remove"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "BREW"]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "application/json; charset=utf-16",
                 "application/json; charset=bogus", "text/plain", "", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", "application/octet-stream", "application/*+json"]
#: Integers that break naive arithmetic: int64 overflow, products that wrap to zero, huge.
NASTY_INTS = [0, -1, 1, 1279, 1280, 1281, 2**31, 2**32, 2**56, 2**62, 2**63, 2**64, -2**63, 10**30, 10**400]

Sender = Callable[[str, str, str, bytes, dict[str, str]], tuple[int, dict[str, str], bytes]]
FUZZ_SETTINGS = dict(deadline=None, database=None, derandomize=False,
                     suppress_health_check=list(HealthCheck))

# -- strategies ---------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from(NASTY_INTS)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@st.composite
def base64_data(draw: st.DrawFn) -> str:
    """Valid base64 of about the right size, truncated, padded wrong, or not base64 at all."""
    n = draw(st.sampled_from([0, 1, 2, 1279 * 2, 1280 * 2, 1280 * 4, 1281 * 2]) | st.integers(0, 3000))
    encoded = base64.b64encode(draw(st.binary(min_size=n, max_size=n))).decode()
    cut = draw(st.sampled_from(["keep", "truncate", "junk", "text"]))
    if cut == "truncate":
        return encoded[: draw(st.integers(0, max(0, len(encoded) - 1)))]
    if cut == "junk":
        return encoded + draw(st.text(min_size=1, max_size=4))
    return draw(st.text(max_size=40)) if cut == "text" else encoded


matrices = st.fixed_dictionaries(
    {"dtype": st.sampled_from(sorted([*wire.DTYPES, *wire.PACKED])) | json_values,
     "shape": st.lists(st.sampled_from(NASTY_INTS) | st.integers(-2, 3000), max_size=3) | json_values,
     "data": base64_data() | json_values},
    optional={"scale": st.floats(allow_nan=True, allow_infinity=True) | json_values})


@st.composite
def real_vector(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed query with one thing broken, or none."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.standard_normal(1280).astype(np.float32) * draw(st.sampled_from([1e-3, 1.0, 1e4]))
    encoded = wire.encode(values, draw(st.sampled_from(["float16", "float32"])))
    key = draw(st.sampled_from(["none", "dtype", "shape", "data", "scale"]))
    if key == "shape":
        encoded["shape"] = draw(st.lists(st.sampled_from(NASTY_INTS), min_size=1, max_size=2))
        encoded["data"] = draw(st.sampled_from(["", encoded["data"]]))
    elif key != "none":
        encoded[key] = draw(json_values)
    return encoded


candidate_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"vector": matrices | real_vector(), "k": st.sampled_from(NASTY_INTS) | json_values},
                          optional={"pad": json_values, "cells": json_values, "extra": json_values}),
)
paths = st.sampled_from(LOOKUP_ENDPOINTS + ADMIN_ENDPOINTS + ["/", "/v1", "/v2/candidates", "/admin"]) | \
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~/%", max_size=30).map(lambda t: "/" + t)


def body_bytes(value: Any) -> bytes:
    """JSON the way Python writes it (NaN and Infinity included: the server must cope)."""
    return json.dumps(value).encode()


raw_bodies = st.one_of(
    candidate_bodies.map(body_bytes), st.binary(max_size=300),
    st.sampled_from([b"", b"[" * 100_000, b'{"k":' * 5000, b"x" * (70 * 1024), b"\xff\xfe{", b"1e99999",
                     b'{"k": 1' + b"0" * 5000 + b"}", b'"\\ud800"']),
)


# -- senders and checks -----------------------------------------------------------------

def flask_sender(client: Any) -> Sender:
    def send(method: str, path: str, content_type: str, body: bytes, headers: dict[str, str]):  # type: ignore[no-untyped-def]
        response = client.open(path, method=method, data=body, headers={**headers, "Content-Type": content_type})
        return response.status_code, dict(response.headers), response.get_data()
    return send


def http_sender(port: int) -> Sender:
    def send(method: str, path: str, content_type: str, body: bytes, headers: dict[str, str]):  # type: ignore[no-untyped-def]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request(method, path, body=body, headers={**headers, "Content-Type": content_type})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()
    return send


class Tally:
    """Requests sent per endpoint and statuses seen: the numbers the soak run reports."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()

    def check(self, send: Sender, method: str, path: str, content_type: str, body: bytes,
              headers: dict[str, str] | None = None) -> int:
        status, response_headers, payload = send(method, path, content_type, body, headers or {})
        self.sent[path] += 1
        self.statuses[status] += 1
        assert status < 500, (method, path, content_type, body[:300], payload[:300])
        assert not any(k.lower() == "set-cookie" for k in response_headers)
        if method == "HEAD" or (method == "OPTIONS" and status < 400):
            return status  # HEAD never has a body; OPTIONS answers with Allow
        document = json.loads(payload)  # every answer is JSON
        if status >= 400:
            assert set(document) == {"error"} and isinstance(document["error"]["code"], str)
            assert isinstance(document["error"]["message"], str)
            if status in (429, 503):
                assert int(response_headers["Retry-After"]) >= 0
        return status

    def fifth(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)


# -- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_index(index_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the test index: authorised admin fuzzing may change it."""
    return copy_index(index_dir, tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def apps(fuzz_index: Path) -> Iterator[tuple[Any, Any]]:
    from lite_server.api.admin import create_admin_app
    from lite_server.api.app import EXTENSION, create_app
    from lite_server.config import ServerConfig

    app = create_app(ServerConfig(index=str(fuzz_index), admin_token=TOKEN))
    yield app.test_client(), create_admin_app(app.extensions[EXTENSION]).test_client()


def _fuzz_candidates(send: Sender, tally: Tally, examples: int) -> None:
    @settings(max_examples=examples, **FUZZ_SETTINGS)
    @given(body=candidate_bodies, content_type=st.sampled_from(CONTENT_TYPES[:3]))
    def run(body: Any, content_type: str) -> None:
        tally.check(send, "POST", "/v1/candidates", content_type, body_bytes(body))
    run()


def _fuzz_http(send: Sender, tally: Tally, examples: int, path_strategy: Any,
               headers: Any = st.just({})) -> None:
    @settings(max_examples=examples, **FUZZ_SETTINGS)
    @given(method=st.sampled_from(METHODS), path=path_strategy, content_type=st.sampled_from(CONTENT_TYPES),
           body=raw_bodies, extra=headers)
    def run(method: str, path: str, content_type: str, body: bytes, extra: dict[str, str]) -> None:
        tally.check(send, method, path, content_type, body, extra)
    run()


def _still_ready(send: Sender) -> None:
    status, _, payload = send("GET", "/readyz", "", b"", {})
    assert status == 200 and json.loads(payload)["status"] == "ready"


# -- short runs (make test) ------------------------------------------------------------------

def test_known_overflowing_shape_is_a_400_not_a_500(apps: tuple[Any, Any]) -> None:
    """Found by this fuzzer: a shape whose int64 product wraps to 0 passed the size checks."""
    lookup, _ = apps
    body = {"vector": {"dtype": "float16", "shape": [2**56, 1280], "data": ""}, "k": 1}
    assert Tally().check(flask_sender(lookup), "POST", "/v1/candidates", "application/json", body_bytes(body)) == 400


def test_fuzz_candidates_bodies(apps: tuple[Any, Any]) -> None:
    lookup, _ = apps
    tally = Tally()
    _fuzz_candidates(flask_sender(lookup), tally, SHORT)
    assert tally.sent["/v1/candidates"] >= SHORT and tally.fifth() == 0
    _still_ready(flask_sender(lookup))


def test_fuzz_every_lookup_route_method_and_content_type(apps: tuple[Any, Any]) -> None:
    lookup, _ = apps
    tally = Tally()
    _fuzz_http(flask_sender(lookup), tally, SHORT, paths)
    assert sum(tally.sent.values()) >= SHORT and tally.fifth() == 0
    assert tally.sent["/admin/v1/status"] == 0 or tally.statuses[404] > 0  # no admin on the lookup app
    _still_ready(flask_sender(lookup))


def _admin_headers() -> Any:
    """No credential, a wrong one in every shape, or the right one (the body is then the attack)."""
    header_text = st.text(st.characters(min_codepoint=32, max_codepoint=255, blacklist_characters="\x7f"),
                          max_size=40)  # what HTTP can carry in a header
    wrong = header_text.map(lambda t: {"Authorization": "Bearer " + t})
    odd = st.sampled_from([{}, {"Authorization": ""}, {"Authorization": "Basic " + TOKEN},
                           {"Authorization": "Bearer"}, {"Authorization": TOKEN}])
    return st.one_of(odd, wrong, st.just({"Authorization": f"Bearer {TOKEN}"}))


def test_fuzz_admin_api(apps: tuple[Any, Any]) -> None:
    lookup, admin = apps
    tally = Tally()
    _fuzz_http(flask_sender(admin), tally, SHORT, st.sampled_from(ADMIN_ENDPOINTS) | paths, _admin_headers())
    assert tally.fifth() == 0 and tally.statuses[401] + tally.statuses[403] > 0
    _still_ready(flask_sender(lookup))


# -- long runs (make soak) --------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_server(fuzz_index: Path) -> Iterator[LiveServer]:
    server = LiveServer(fuzz_index)
    yield server
    server.stop()


@pytest.mark.soak
def test_soak_fuzz_every_endpoint(fuzz_server: LiveServer, apps: tuple[Any, Any],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """At least LONG requests to each lookup endpoint over real HTTP, and to each admin endpoint."""
    send, tally = http_sender(fuzz_server.port), Tally()
    _fuzz_candidates(send, tally, LONG)
    for path in LOOKUP_ENDPOINTS:
        _fuzz_http(send, tally, LONG, st.just(path))
    _fuzz_http(send, tally, LONG, paths)
    _still_ready(send)
    admin_tally = Tally()
    for path in ADMIN_ENDPOINTS:
        _fuzz_http(flask_sender(apps[1]), admin_tally, LONG, st.just(path), _admin_headers())
    assert all(tally.sent[p] >= LONG for p in LOOKUP_ENDPOINTS)
    assert all(admin_tally.sent[p] >= LONG for p in ADMIN_ENDPOINTS)
    assert tally.fifth() == 0 and admin_tally.fifth() == 0
    with capsys.disabled():
        total = sum(tally.sent.values()) + sum(admin_tally.sent.values())
        print(f"\nFUZZ: {total} requests ({sum(tally.sent.values())} over HTTP to waitress, "
              f"{sum(admin_tally.sent.values())} to the admin app), 5xx seen: "
              f"{tally.fifth() + admin_tally.fifth()}, statuses {dict(tally.statuses + admin_tally.statuses)}")
