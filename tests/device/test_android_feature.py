"""``edge_client.android`` end to end on a live server with features the app computed itself:
the device venv has no interpreter, so this path must never need one."""
from __future__ import annotations

import json
from typing import Any, Iterator

import pytest

from edge_client import android
from tools.live import free_port

from .conftest import DeviceData, Query


def ask(query: Query, url: str, settings: dict[str, Any], sha: str | None = None) -> dict[str, Any]:
    answer = android.recognize_feature(query.feature_json, url, json.dumps(settings),
                                       query.model_sha256 if sha is None else sha)
    assert isinstance(answer, str)
    return json.loads(answer)


@pytest.fixture(autouse=True)
def closed() -> Iterator[None]:
    yield
    assert json.loads(android.close_all()) == {"ok": True}
    assert not android._clients and not android._schedulers


def test_held_out_photos_are_recognized_from_app_features(device_data: DeviceData, live_server) -> None:  # type: ignore[no-untyped-def]
    settings = {"dummies": 0, "seed": 3, "cache": False}
    answers = [ask(query, live_server.url, settings) for query in device_data.queries]
    assert all(a["ok"] for a in answers), answers
    assert all(a["bytes_sent"] > 0 and a["bytes_received"] > 0 for a in answers)
    right = [a["spot_id"] == q.spot_id for a, q in zip(answers, device_data.queries)]
    assert sum(right) >= len(right) - 2, [(a["spot_id"], q.spot_id) for a, q in zip(answers, device_data.queries)]
    assert right[0]


def test_errors_come_back_as_json(device_data: DeviceData, live_server) -> None:  # type: ignore[no-untyped-def]
    query = device_data.queries[0]
    settings = json.dumps({"dummies": 0, "seed": 3})

    def error(feature_json: str, url: str = live_server.url, sha: str = query.model_sha256,
              config: str = settings) -> dict[str, Any]:
        answer = json.loads(android.recognize_feature(feature_json, url, config, sha))
        assert answer["ok"] is False and set(answer["error"]) == {"type", "message"}
        return answer["error"]

    assert error("[0.1, 0.2")["type"] == "FeatureError"
    assert error('{"feature": [1]}')["type"] == "FeatureError"
    assert error('["a", "b"]')["type"] == "FeatureError"
    short = error(json.dumps(json.loads(query.feature_json)[:100]))
    assert short["type"] == "FeatureError" and "100" in short["message"] and "1280" in short["message"]
    assert error(json.dumps([0.0] * 1280))["type"] == "FeatureError"
    mismatch = error(query.feature_json, sha="0" * 64)
    assert mismatch["type"] == "IncompatibleServerError" and "000000000000" in mismatch["message"]
    unreachable = error(query.feature_json, url=f"http://127.0.0.1:{free_port()}",
                        config=json.dumps({"dummies": 0, "retries": 0, "connect_timeout": 2}))
    assert unreachable["type"] == "ServerUnreachableError"
    assert error(query.feature_json, config="[1]")["type"] == "EnfPireError"
    # no sha256 and no model file on the "phone": refused, not guessed
    assert error(query.feature_json, sha="", config=json.dumps({"model": "/nonexistent/m.tflite"}))["type"] \
        == "ModelNotFoundError"
    # a photo on a client fed app features needs an interpreter this venv lacks: a typed error, not a crash
    photo = json.loads(android.recognize_jpeg(b"\xff\xd8not really", live_server.url, settings))
    assert photo["ok"] is False and photo["error"]["type"] == "InterpreterNotFoundError"


def test_dummies_on_by_default_still_answer(device_data: DeviceData, live_server) -> None:  # type: ignore[no-untyped-def]
    query = device_data.queries[0]
    answer = ask(query, live_server.url, {"seed": 5, "dummy_day_start": 0, "dummy_day_end": 24})
    assert answer["ok"] and answer["spot_id"] == query.spot_id and answer["bytes_sent"] > 0
    settings = json.dumps({"seed": 5, "dummy_day_start": 0, "dummy_day_end": 24})
    stats = json.loads(android.dummy_stats(live_server.url, settings))
    assert stats["ok"] and stats["counts"]["real"] == 1 and stats["counts"]["dummy_planned"] == 2
    assert json.loads(android.close_all()) == {"ok": True}  # drains the burst: the dummies leave, whole


def test_the_answer_cache_sends_nothing_the_second_time_until_cleared(
        device_data: DeviceData, live_server) -> None:  # type: ignore[no-untyped-def]
    query = device_data.queries[0]
    settings = {"dummies": 0, "seed": 7}
    first, second = ask(query, live_server.url, settings), ask(query, live_server.url, settings)
    assert first["ok"] and second["ok"] and first["spot_id"] == second["spot_id"] == query.spot_id
    assert first["bytes_sent"] > 0 and second["bytes_sent"] == 0 and second["bytes_received"] == 0
    assert json.loads(android.clear_cache(live_server.url, json.dumps(settings))) == {"ok": True, "cleared": True}
    third = ask(query, live_server.url, settings)
    assert third["ok"] and third["bytes_sent"] > 0
