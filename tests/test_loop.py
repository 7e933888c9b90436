"""The whole private loop over HTTP: real model, real photos, waitress on loopback."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_client import android
from edge_client.client import Client, recognize
from edge_client.config import ClientConfig
from edge_client.errors import IncompatibleServerError, ServerError, ServerUnreachableError
from edge_client.vision.extractor import Extractor
from tests.conftest import CLASSIFIER
from tools.live import LiveServer, free_port


def _client(live_server: LiveServer, extractor: Extractor, **settings: object) -> Client:
    return Client(ClientConfig(server=live_server.url, seed=7, **settings), extractor=extractor)  # type: ignore[arg-type]


def test_gallery_photo_is_recognized_as_its_own_spot(live_server: LiveServer, subset: Path) -> None:
    photo = sorted((subset / "images").iterdir())[3]
    result = recognize(sorted(photo.iterdir())[0], server=live_server.url, transform="noise", seed=1)
    assert result.spot_id == photo.name and result.score > 0.999
    assert result.bytes_sent > 1280 and result.bytes_received > result.bytes_sent


def test_held_out_photos_through_noise_keep_most_answers(
        live_server: LiveServer, extractor: Extractor, held_out: list[tuple[str, Path]]) -> None:
    with _client(live_server, extractor, transform="noise", strength=1.0, k=12) as client:
        results = [client.recognize(photo) for _, photo in held_out]
    right = sum(r.spot_id == spot for r, (spot, _) in zip(results, held_out))
    assert right >= 0.6 * len(held_out), right
    assert all(len(r.candidates) == 12 for r in results)
    assert [c.score for c in results[0].candidates] == sorted((c.score for c in results[0].candidates), reverse=True)


def test_threshold_answers_unknown(live_server: LiveServer, extractor: Extractor,
                                   held_out: list[tuple[str, Path]]) -> None:
    with _client(live_server, extractor, threshold=1.01) as client:
        result = client.recognize(held_out[0][1])
    assert result.spot_id is None and result.candidates


def test_server_with_another_model_is_refused(live_server: LiveServer, held_out: list[tuple[str, Path]]) -> None:
    other = Extractor(CLASSIFIER, num_threads=1)  # a different file: a different sha256
    with Client(ClientConfig(server=live_server.url), extractor=other) as client:
        with pytest.raises(IncompatibleServerError, match="same extractor"):
            client.recognize(held_out[0][1])


def test_server_down_is_a_typed_error(extractor: Extractor, held_out: list[tuple[str, Path]]) -> None:
    config = ClientConfig(server=f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01, connect_timeout=0.5)
    with Client(config, extractor=extractor) as client, pytest.raises(ServerUnreachableError):
        client.recognize(held_out[0][1])


def test_bad_request_surfaces_the_servers_message(live_server: LiveServer, extractor: Extractor) -> None:
    with _client(live_server, extractor) as client, pytest.raises(ServerError) as info:
        client.query({"vector": {"dtype": "float16", "shape": [3], "data": "AAAAAAAA"}, "k": 1})
    assert info.value.status == 400 and info.value.code == "bad_vector"


def test_android_functions_take_and_return_primitives(
        live_server: LiveServer, held_out: list[tuple[str, Path]]) -> None:
    jpeg = held_out[1][1].read_bytes()
    settings = {"seed": 3, "k": 10, "transform": "noise"}
    answer = json.loads(android.recognize_jpeg(jpeg, live_server.url, json.dumps(settings)))
    assert answer["ok"] is True and answer["spot_id"] and len(answer["candidates"]) == 10
    bad = json.loads(android.recognize_jpeg(b"not a photo", live_server.url, "{}"))
    assert bad == {"ok": False, "error": {"type": "PhotoError", "message": bad["error"]["message"]}}
    info = json.loads(android.server_info(live_server.url))
    assert info["ok"] and info["info"]["dim"] == 1280
    feature = json.loads(android.extract_jpeg(jpeg))
    assert feature["dim"] == 1280 and len(feature["feature"]) == 1280
    assert json.loads(android.close_all())["ok"]


def test_cli_recognize_json(live_server: LiveServer, held_out: list[tuple[str, Path]]) -> None:
    out = subprocess.run([sys.executable, "-m", "edge_client.cli", "recognize", str(held_out[2][1]),
                          "--server", live_server.url, "--json", "--seed", "5", "--k", "8", "--transform", "noise"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert {"spot_id", "name", "score", "candidates", "bytes_sent", "bytes_received"} <= set(result)
    assert len(result["candidates"]) == 8


def test_cli_camera_without_picamera2_says_so() -> None:
    out = subprocess.run([sys.executable, "-m", "edge_client.cli", "recognize", "--camera"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "picamera2" in out.stderr


def test_same_seed_same_query(live_server: LiveServer, extractor: Extractor, held_out: list[tuple[str, Path]]) -> None:
    feature = extractor.extract(held_out[0][1])
    bodies = []
    for _ in range(2):
        with _client(live_server, extractor, transform="noise") as client:
            bodies.append(client.transform.transform(feature, client.rng))
    assert bodies[0] == bodies[1]
    with _client(live_server, extractor, transform="noise") as client:
        noisy = client.transform.transform(feature, np.random.default_rng(99))
    assert noisy != bodies[0]
