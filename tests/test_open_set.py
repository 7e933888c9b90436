"""Open-set answers: photos of no known spot are answered "not a known spot", on the phone alone."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from edge_client.client import Client
from edge_client.config import ClientConfig, load_config
from edge_client.errors import BadResponseError, ConfigError
from edge_client.privacy.cache import AnswerCache
from edge_client.privacy.recognizer import Calibration
from edge_client.vision.extractor import Extractor
from lite_server.api.openapi import spec
from tests.conftest import SHARED, SHARED_MODELS
from tools.live import LiveServer

OUTSIDE = [SHARED_MODELS / name for name in ("parrot.jpg", "cat.bmp", "grace_hopper.bmp")]
OTHER_DATASET = SHARED / "datasets" / "ie-tower" / "images"


def _client(live_server: LiveServer, extractor: Extractor, **settings: Any) -> Client:
    return Client(ClientConfig(server=live_server.url, seed=11, cache=False, **settings), extractor=extractor)


def _ie_tower_photos(n: int = 12) -> list[Path]:
    """A fixed handful of photos of the other dataset: places the wa-landmarks index does not hold."""
    folders = sorted(p for p in OTHER_DATASET.iterdir() if p.is_dir())
    return [sorted(f.glob("*.jpg"))[0] for f in folders[:: max(1, len(folders) // n)]][:n]


def test_info_publishes_a_calibration_the_schema_describes(live_server: LiveServer, extractor: Extractor) -> None:
    with _client(live_server, extractor) as client:
        info = client.info()
    document = spec()
    jsonschema.validate(info, {"$ref": "#/components/schemas/Info", "components": document["components"]})
    published = info["calibration"]
    assert published["kind"] == "leave_one_out_rerank" and published["n"] >= 100
    scores = np.array(published["scores"])
    assert np.all(np.diff(scores) >= 0) and 0.3 < scores[5] < scores[50] < 1.01 + published["coverage_weight"]
    assert len(json.dumps(published)) < 2000  # a small addition to /v1/info


def test_calibration_maps_evidence_to_confidence_and_keep_to_threshold() -> None:
    calibration = Calibration.from_public({"levels": [0.0, 0.5, 1.0], "scores": [0.5, 0.8, 0.9]})
    assert calibration is not None
    assert calibration.confidence(0.8) == pytest.approx(0.5) and calibration.confidence(0.2) == 0.0
    assert calibration.threshold(0.75) == pytest.approx(0.65)
    assert calibration.confidence(calibration.threshold(0.9)) == pytest.approx(0.1)
    assert Calibration.from_public({}) is None
    with pytest.raises(BadResponseError):
        Calibration.from_public({"levels": [0.0, 1.0], "scores": [0.9, 0.5]})


def test_keep_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="keep"):
        load_config(ClientConfig, env={"ENFPIRE_KEEP": "1.5"})


def test_known_spots_are_answered_and_unknown_photos_are_not(
        live_server: LiveServer, extractor: Extractor, held_out: list[tuple[str, Path]]) -> None:
    with _client(live_server, extractor) as client:
        known = [(spot, client.recognize(photo)) for spot, photo in held_out]
        outside = [client.recognize(photo) for photo in OUTSIDE + _ie_tower_photos()]
    correct = [r for spot, r in known if r.best == spot]
    kept = sum(r.spot_id == r.best for r in correct)
    assert len(correct) >= 0.7 * len(known) and kept >= 0.85 * len(correct), (kept, len(correct))
    rejected = [r for r in outside if r.spot_id is None]
    assert len(rejected) >= 0.75 * len(outside), [round(r.score, 3) for r in outside]
    assert all(r.candidates and r.name is None and r.confidence is not None for r in rejected)
    assert all(r.confidence < 0.05 for r in rejected)  # keep 0.95: rejected means below the 5% quantile
    assert np.mean([r.confidence for _, r in known]) > np.mean([r.confidence for r in outside]) + 0.3


def test_threshold_and_keep_one_override_the_operating_point(live_server: LiveServer, extractor: Extractor) -> None:
    parrot = OUTSIDE[0]
    with _client(live_server, extractor, threshold=-1.0) as client:
        assert client.recognize(parrot).spot_id is not None
    with _client(live_server, extractor, keep=1.0) as client:
        result = client.recognize(parrot)
    assert result.spot_id == result.best is not None and result.confidence is not None


def test_an_answer_from_the_cache_follows_the_same_rule(live_server: LiveServer, extractor: Extractor,
                                                         tmp_path: Path) -> None:
    config = ClientConfig(server=live_server.url, seed=11)
    with Client(config, extractor=extractor, cache=AnswerCache(tmp_path / "cache.json.gz")) as client:
        first = client.recognize(OUTSIDE[0])
        again = client.recognize(OUTSIDE[0])
    assert again.bytes_sent == 0 and first.bytes_sent > 0  # the second came from the cache
    assert first.spot_id is None and again.spot_id is None and again.confidence == first.confidence


def test_cli_says_a_parrot_is_not_a_known_spot(live_server: LiveServer) -> None:
    command = [sys.executable, "-m", "edge_client.cli", "recognize", str(OUTSIDE[0]), "--server", live_server.url,
               "--no-dummies", "--no-cache"]
    text = subprocess.run(command, capture_output=True, text=True, check=True)
    assert text.stdout.startswith("not a known spot") and "confidence" in text.stdout
    answer = json.loads(subprocess.run(command + ["--json"], capture_output=True, text=True, check=True).stdout)
    assert answer["spot_id"] is None and answer["name"] is None and answer["candidates"]
    assert 0.0 <= answer["confidence"] < 0.05
