"""A misconfigured phone gets a clear answer: a server or relay that is not an http(s) URL, or a relay
that is the server itself, is a one-line ConfigError (the CLI exits 2, Android answers JSON) before
anything is sent; a URL requests cannot follow is a typed error, never a traceback; and Pillow's
decompression-bomb warning goes to the log, not the terminal."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_client import android
from edge_client.client import Client
from edge_client.config import ClientConfig, load_config
from edge_client.errors import BadResponseError, ConfigError, PhotoError
from edge_client.vision.photo import load_rgb
from tests.test_client_faults import Misbehaving, Reply

ROOT = Path(__file__).resolve().parent.parent
#: Over Pillow's warning threshold (MAX_IMAGE_PIXELS, ~89.5 MP), under its error (twice that) and under
#: the default max_pixels (100 MP): accepted, and Pillow warns.
BOMB = (9500, 9500)


@pytest.fixture()
def recorder() -> Iterator[Misbehaving]:
    """A loopback server that counts every request it gets."""
    server = Misbehaving()
    yield server
    server.close()


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command line, as a user runs it, with a private home."""
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("ENFPIRE_")}
    return subprocess.run([sys.executable, "-m", "edge_client.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env, check=False)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("server, words", [
    ("ftp://x", ("http:// or https://", "'ftp://x'")),
    ("127.0.0.1:8080", ("http:// or https://", "did you mean 'http://127.0.0.1:8080'")),
    ("http://127.0.0.1:99999", ("'http://127.0.0.1:99999'", "out of range")),
    ("http://", ("has no host",)),
], ids=["ftp", "no scheme", "port 99999", "no host"])
def test_cli_refuses_a_server_that_is_not_an_http_url(tmp_path: Path, held_out: list[tuple[str, Path]],
                                                      server: str, words: tuple[str, ...]) -> None:
    assert_one_line_error(cli(tmp_path, "recognize", str(held_out[0][1]), "--server", server), "server", *words)


@pytest.mark.parametrize("relay", ["{url}", "{url}/ohttp", "{upper}/"], ids=["same URL", "its gateway path",
                                                                            "another spelling"])
def test_cli_refuses_a_relay_that_is_the_server_and_sends_nothing(tmp_path: Path, held_out: list[tuple[str, Path]],
                                                                 recorder: Misbehaving, relay: str) -> None:
    """Through a "relay" at the server's own origin the server would see the phone's address and the
    key fetched through it would be pinned as a relay's: refused before any request."""
    port = recorder.url.rsplit(":", 1)[1]
    relay = relay.format(url=recorder.url, upper=f"HTTP://127.0.0.1:{port}")
    done = cli(tmp_path, "recognize", str(held_out[0][1]), "--server", recorder.url, "--relay", relay)
    assert_one_line_error(done, "relay", "is the server itself")
    assert sum(recorder.hits.values()) == 0


def test_cli_refuses_a_relay_that_is_not_an_http_url(tmp_path: Path, recorder: Misbehaving) -> None:
    done = cli(tmp_path, "info", "--server", recorder.url, "--relay", "relay.example:443")
    assert_one_line_error(done, "relay", "did you mean 'http://relay.example:443'")
    assert sum(recorder.hits.values()) == 0


def test_every_layer_is_checked(tmp_path: Path) -> None:
    """File, environment and flags all build a ClientConfig, so each gets the same check; Android's
    JSON answer names the ConfigError rather than requests' MissingSchema."""
    path = tmp_path / "client.json"
    path.write_text(json.dumps({"server": "ftp://file"}))
    with pytest.raises(ConfigError, match="ftp://file"):
        load_config(ClientConfig, path, env={})
    with pytest.raises(ConfigError, match="ftp://env"):
        load_config(ClientConfig, env={"ENFPIRE_SERVER": "ftp://env"})
    with pytest.raises(ConfigError, match="gateway_keys_url"):
        load_config(ClientConfig, env={}, gateway_keys_url="keys.example/ohttp-keys")
    with pytest.raises(ConfigError, match="is the server itself"):
        load_config(ClientConfig, env={"ENFPIRE_RELAY": "http://127.0.0.1:8080/ohttp"})
    with pytest.raises(ConfigError, match="query or fragment"):
        ClientConfig(server="http://127.0.0.1:8080/?user=me")
    for url in ("127.0.0.1:8080", "http://127.0.0.1:8080", "http://[::1"):
        answer = json.loads(android.server_info(url, json.dumps({"relay": "http://127.0.0.1:8080", "retries": 0})))
        assert answer["ok"] is False and answer["error"]["type"] == "ConfigError", answer
    android.close_all()


def test_origins_compare_spellings_not_names() -> None:
    from edge_client.config import origin

    assert origin("HTTP://Example.COM./x") == origin("http://example.com:80/") == ("http", "example.com", 80)
    assert origin("https://[0:0::1]/") == ("https", "::1", 443)
    # a relay elsewhere on the same host is a relay (a development one runs so); names are not resolved
    assert ClientConfig(server="http://127.0.0.1:8080", relay="http://127.0.0.1:8081").relay
    assert ClientConfig(server="http://127.0.0.1:8080", relay="http://localhost:8080").relay
    for bad in ("http://h:0", "http://h:+80", "http://h:1:2", "http://a..b", " http://h", "http://h/a b", "http:/h"):
        with pytest.raises(ConfigError):
            origin(bad)


def test_a_url_requests_refuses_is_a_typed_error(recorder: Misbehaving) -> None:
    """Every URL requests cannot send to is this device's ConfigError; a redirect the server sends to
    one, or without end, is the server's BadResponseError: never requests' own exception."""
    with Client(ClientConfig(server=recorder.url, retries=0, cache=False)) as client:
        for url in ("ftp://x/", "127.0.0.1:8080/v1/info", "http://127.0.0.1:99999/", "http://a..b/"):
            with pytest.raises(ConfigError, match="cannot send a request"):
                client._send("GET", url, None, {})
    recorder.on("/v1/info", Reply(302, b"", {"Location": "ftp://elsewhere/info"}))
    with Client(ClientConfig(server=recorder.url, retries=0, cache=False)) as client, \
            pytest.raises(BadResponseError, match="redirected"):
        client.info()
    recorder.on("/v1/info", Reply(302, b"", {"Location": "/v1/info"}))
    with Client(ClientConfig(server=recorder.url, retries=0, cache=False)) as client, \
            pytest.raises(BadResponseError, match="redirects without end"):
        client.info()


def _bomb(path: Path) -> Path:
    """A photo over Pillow's warning threshold that costs almost nothing to make and decode."""
    Image.new("1", BOMB).save(path)
    return path


def test_a_bomb_sized_photo_is_logged_not_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    photo = _bomb(tmp_path / "large.png")
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as shown, caplog.at_level(logging.INFO, "edge_client.vision.photo"):
        warnings.simplefilter("always")
        assert load_rgb(photo, (224, 224), max_pixels=100_000_000).shape == (224, 224, 3)
        assert load_rgb(photo.read_bytes(), (224, 224), max_pixels=100_000_000).shape == (224, 224, 3)
        with pytest.raises(PhotoError, match="max_pixels"):  # the limit this device keeps still holds
            load_rgb(photo, (224, 224), max_pixels=50_000_000)
    assert [w.message for w in shown] == []
    records = [r for r in caplog.records if "decompression bomb" in r.getMessage()]
    assert len(records) == 3 and all("large.png" in r.getMessage() or "bytes" in r.getMessage() for r in records)
    assert warnings.filters == before  # nothing left behind in the process-wide filters


def test_cli_prints_no_pillow_warning_for_a_large_photo(tmp_path: Path) -> None:
    """Two large photos decoded at once by ``extract`` (its decoding pool): the features on stdout,
    nothing on stderr; the log record shows with -v."""
    photos = [str(_bomb(tmp_path / "a.png")), str(_bomb(tmp_path / "b.png"))]
    done = cli(tmp_path, "extract", *photos, "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and len(done.stdout.splitlines()) == 2
    assert np.isfinite(json.loads(done.stdout.splitlines()[0])["feature"]).all()
    verbose = cli(tmp_path, "-v", "extract", photos[0])
    assert "DecompressionBombWarning" not in verbose.stderr and "warnings.warn" not in verbose.stderr
    assert "INFO edge_client.vision.photo" in verbose.stderr and "decompression bomb" in verbose.stderr

