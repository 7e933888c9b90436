"""Who may change things: the admin API is off without a token, on its own
loopback listener with one, and only a correct Bearer token gets through."""
from __future__ import annotations

import hmac
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
import requests

from edge_client.errors import ConfigError
from edge_client.protocol import wire
from edge_client.vision.extractor import Extractor
from lite_server.api import admin
from lite_server.api.app import EXTENSION, create_app
from lite_server.config import ServerConfig
from tests.conftest import copy_index, make_subset
from tools.live import LiveServer, free_port

TOKEN = "admin-test-token-9f8e7d6c5b4a"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def own_index(index_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_index(index_dir, tmp_path_factory.mktemp("admin"))


@pytest.fixture(scope="module")
def new_spots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real spots the test index does not have, three photos each."""
    return make_subset(tmp_path_factory.mktemp("new"), spots=2, per_spot=3, first=30)


@pytest.fixture(scope="module")
def server(own_index: Path) -> Iterator[LiveServer]:
    port = free_port()
    live = LiveServer(own_index, env={"ENFPIRE_ADMIN_TOKEN": TOKEN, "ENFPIRE_ADMIN_PORT": str(port)})
    live.admin_url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield live
    live.stop()


def test_admin_is_off_without_a_token(app: Any) -> None:
    with pytest.raises(ConfigError, match="off"):
        admin.create_admin_app(app.extensions[EXTENSION])
    assert ServerConfig().admin_token == "" and ServerConfig().host == "127.0.0.1"


def test_lookup_port_never_serves_admin_routes(server: LiveServer) -> None:
    for path in ("/admin/v1/status", "/admin/v1/reload"):
        for method in ("GET", "POST"):
            response = requests.request(method, server.url + path, headers=BEARER, timeout=5)
            assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_every_listener_is_on_loopback(server: LiveServer) -> None:
    listening = [c.laddr for c in psutil.Process(server.process.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN]
    assert len(listening) == 2 and all(addr.ip == "127.0.0.1" for addr in listening)


@pytest.mark.parametrize("header, status", [
    (None, 401), ("", 401), (f"Basic {TOKEN}", 401), ("Bearer", 401), ("Bearer ", 401),
    ("Bearer wrong-token", 403), (f"Bearer {TOKEN}x", 403), (f"Bearer {TOKEN[:-1]}", 403),
])
def test_bad_credentials_are_refused(server: LiveServer, header: str | None, status: int) -> None:
    headers = {} if header is None else {"Authorization": header}
    for method, path in (("GET", "/admin/v1/status"), ("POST", "/admin/v1/reload"),
                         ("POST", "/admin/v1/spots/remove")):
        response = requests.request(method, server.admin_url + path, headers=headers, json={"ids": ["x"]},  # type: ignore[attr-defined]
                                    timeout=5)
        assert response.status_code == status and "error" in response.json()
        assert "Set-Cookie" not in response.headers


def test_tokens_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(admin.hmac, "compare_digest", spy)
    admin.authorize(f"Bearer {TOKEN}", TOKEN)
    with pytest.raises(admin.ApiError):
        admin.authorize("Bearer nope", TOKEN)
    assert calls == [(TOKEN.encode(), TOKEN.encode()), (b"nope", TOKEN.encode())]


def test_short_token_is_refused_at_start(index_dir: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "lite_server.cli", "serve", "--index", str(index_dir),
                          "--port", str(free_port())], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "ENFPIRE_ADMIN_TOKEN": "short"})
    assert out.returncode == 2 and "at least 16" in out.stderr


def _nearest(server: LiveServer, extractor: Extractor, photo: Path) -> tuple[str, str]:
    body = {"vector": wire.encode(extractor.extract(photo)), "k": 1}
    answer = requests.post(server.url + "/v1/candidates", json=body, timeout=10).json()
    return answer["candidates"][0]["id"], answer["index_version"]


def test_add_and_remove_spots_through_the_admin_api(
        server: LiveServer, new_spots: Path, extractor: Extractor) -> None:
    url = server.admin_url  # type: ignore[attr-defined]
    before = requests.get(url + "/admin/v1/status", headers=BEARER, timeout=5).json()
    photo = sorted((new_spots / "images").iterdir())[0]
    added = requests.post(url + "/admin/v1/spots", headers=BEARER, timeout=120, json={
        "photos": str(new_spots / "images"), "spots_csv": str(new_spots / "landmarks.csv")}).json()
    assert added["switched"] and added["n_spots"] == before["n_spots"] + 2
    assert added["n_photos"] == before["n_photos"] + sum(1 for _ in (new_spots / "images").glob("*/*.jpg"))
    assert _nearest(server, extractor, sorted(photo.iterdir())[0]) == (photo.name, added["index_version"])
    again = requests.post(url + "/admin/v1/spots", headers=BEARER, timeout=120,
                          json={"photos": str(new_spots / "images")})
    assert again.status_code == 400 and "no photos" in again.json()["error"]["message"]
    removed = requests.post(url + "/admin/v1/spots/remove", headers=BEARER, timeout=30,
                            json={"ids": [photo.name]}).json()
    assert removed["n_spots"] == before["n_spots"] + 1 and removed["switched"]
    assert _nearest(server, extractor, sorted(photo.iterdir())[0])[0] != photo.name
    unknown = requests.post(url + "/admin/v1/spots/remove", headers=BEARER, timeout=30, json={"ids": ["nope"]})
    assert unknown.status_code == 400 and "no such spot" in unknown.json()["error"]["message"]


def test_bad_admin_bodies_are_400s(own_index: Path) -> None:
    service = create_app(ServerConfig(index=str(own_index), admin_token=TOKEN)).extensions[EXTENSION]
    client = admin.create_admin_app(service).test_client()
    for path, body in (("/admin/v1/spots", {"photos": "/no/such/dir"}), ("/admin/v1/spots", {"photos": "x" * 5000}),
                       ("/admin/v1/spots", {"photos": 3}), ("/admin/v1/spots", {"spots": "a"}),
                       ("/admin/v1/spots/remove", {"ids": []}), ("/admin/v1/spots/remove", {"ids": [1]})):
        response = client.post(path, json=body, headers=BEARER)
        assert response.status_code == 400 and response.get_json()["error"]["code"], (path, body)
