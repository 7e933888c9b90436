"""Open-set answers: photos of no known spot are answered "not a known spot", on the phone alone."""
from __future__ import annotations

import dataclasses
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
from edge_client.privacy.evidence import MARGIN_CAP, TERMS, look_spread, terms
from edge_client.privacy.recognizer import Calibration, coverage
from edge_client.protocol.public import parse
from edge_client.vision.extractor import Extractor
from lite_server.api.openapi import spec
from lite_server.config import ServerConfig
from lite_server.index import calibration
from lite_server.index.store import Index
from lite_server.index.structure import Structure, StructureParams
from lite_server.search.lookup import Lookup, load_structure
from lite_server.search.publication import build
from tests.conftest import SHARED, SHARED_MODELS, copy_index
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
        kind = client.public().settings["codec"]["kind"]
    document = spec()
    jsonschema.validate(info, {"$ref": "#/components/schemas/Info", "components": document["components"]})
    published = info["calibration"]
    assert published["kind"] == "leave_one_out_evidence" and published["n"] >= 100 and published["n_unknown"] >= 100
    scores = np.array(published["scores"])
    assert np.all(np.diff(scores) >= 0) and scores[5] < scores[50]
    weights = published["weights"]
    assert list(weights) == list(TERMS) and all(np.isfinite(list(weights.values())))
    # Fitted on the gallery: a higher score and a clearer lead over the next spot mean a known spot.
    assert weights["score"] > 0 and weights["margin"] > 0
    assert weights["coverage"] == pytest.approx(calibration.coverage_ratio(kind) * weights["score"], abs=1e-3)
    assert len(json.dumps(published)) < 2000  # a small addition to /v1/info


def test_the_fit_tells_photos_of_known_spots_from_photos_of_left_out_ones(index_dir: Path) -> None:
    lookup = Lookup(Index.load(index_dir), search=False)
    rows = load_structure(lookup.index, StructureParams.from_config(lookup.config)).scores
    assert rows.shape[1] == 1 + len(TERMS) and set(np.unique(rows[:, 0])) == {0.0, 1.0}
    known = rows[:, 0] == 1
    # The fitted terms alone: coverage is not fitted (a photo whose spot is left out has the same), and
    # it tells other domains apart, not these.
    weights = calibration.fit_weights(rows[:, 1:].astype(np.float64), known, ratio=0.0)
    evidence = rows[:, 1:] @ np.array([weights[t] for t in TERMS])
    # Ranked by the fitted evidence, a gallery photo of a known spot beats one whose spot is left out
    # far more often than chance, and more often than by its score alone.
    assert _auc(evidence[known], evidence[~known]) > max(0.7, _auc(rows[known, 1], rows[~known, 1]) - 0.01)
    # A photo whose spot is left out is scored against another spot: its lead over the runner-up is smaller.
    assert rows[known, 2].mean() > rows[~known, 2].mean()
    assert calibration.fit_weights(rows[:10, 1:], known[:10]) == calibration.FALLBACK  # too few rows to fit
    assert calibration.fit_weights(rows[:, 1:], ~known) == calibration.FALLBACK  # nonsense: a higher score unknown
    assert calibration.public(np.zeros((0, 1 + len(TERMS)))) == {}
    # Too few spots to learn unknown landmarks from: the fallback, whatever the rows say.
    assert calibration.public(rows, spots=calibration.MIN_SPOTS - 1)["weights"] == calibration.FALLBACK
    assert calibration.public(rows, 0.0, spots=len(lookup.index.spots))["weights"] == weights


def test_a_stored_calibration_without_the_evidence_terms_is_derived_again(index_dir: Path, tmp_path: Path) -> None:
    copy = copy_index(index_dir, tmp_path)
    index = Index.load(copy)
    stored = Structure.load(index.path)
    assert stored is not None
    known = stored.scores[stored.scores[:, 0] == 1]
    # As an index version built before the terms were measured stored it: the known rows' evidence alone.
    dataclasses.replace(stored, scores=known[:, 1] + 0.5 * known[:, 3]).save(index.path)
    published = Lookup(index, search=False).calibration
    assert published == Lookup(Index.load(index_dir), search=False).calibration and "weights" in published


def _auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """The probability that a positive scores above a negative."""
    return float(np.mean(positive[:, None] > negative[None, :]))


def test_the_phone_reads_its_evidence_from_the_published_weights(
        live_server: LiveServer, extractor: Extractor, held_out: list[tuple[str, Path]]) -> None:
    photos = [photo for _, photo in held_out[:4]]
    with _client(live_server, extractor) as client:
        published = Calibration.from_public(client.info()["calibration"])
        answers = [client.recognize(photo) for photo in photos]
        measure = coverage(client.public().coverage_space)
    assert published is not None
    for photo, answer in zip(photos, answers):
        top, runner_up = answer.candidates[0], answer.candidates[1]
        assert -1.0 <= top.spread <= 1.0 and top.score >= runner_up.score
        expected = published.evidence(terms(top.score, runner_up.score, measure(extractor.extract(photo)), top.spread))
        assert answer.evidence == pytest.approx(expected, abs=1e-6)
        assert answer.confidence == pytest.approx(published.confidence(expected))


def test_a_learned_space_measures_coverage_where_the_gallery_lies(index_dir: Path, extractor: Extractor,
                                                                  held_out: list[tuple[str, Path]]) -> None:
    """Beside a learned whitening the document publishes the gallery's principal directions, and the
    phone measures coverage there: photos of the catalogue's kind lie deeper in them than photos of
    another domain (in the whitening's own row space, a photo of either lies about as deep)."""
    lookup = Lookup(Index.load(index_dir), ServerConfig(codec_kind="learned-whitening"))
    doc = parse(build(lookup).to_payload())
    assert doc.coverage is not None and doc.coverage_space is doc.coverage
    inside = [extractor.extract(photo) for _, photo in held_out]
    outside = [extractor.extract(photo) for photo in _ie_tower_photos()]
    measure = coverage(doc.coverage_space)
    held, other = np.array([measure(f) for f in inside]), np.array([measure(f) for f in outside])
    # Most of a photo of the catalogue's kind lies in it (in the whitening's row space, under half).
    assert np.median(held) > 0.7 and _auc(held, other) >= 0.9 and np.median(held) > np.median(other) + 0.1


def test_calibration_maps_evidence_to_confidence_and_keep_to_threshold() -> None:
    calibration = Calibration.from_public({"levels": [0.0, 0.5, 1.0], "scores": [0.5, 0.8, 0.9]})
    assert calibration is not None
    assert calibration.confidence(0.8) == pytest.approx(0.5) and calibration.confidence(0.2) == 0.0
    assert calibration.threshold(0.75) == pytest.approx(0.65)
    assert calibration.confidence(calibration.threshold(0.9)) == pytest.approx(0.1)
    assert Calibration.from_public({}) is None
    with pytest.raises(BadResponseError):
        Calibration.from_public({"levels": [0.0, 1.0], "scores": [0.9, 0.5]})
    # The first kind (score + coverage_weight * coverage) still reads as weights.
    first = Calibration.from_public({"levels": [0.0, 1.0], "scores": [1.0, 2.0], "coverage_weight": 0.5})
    assert first is not None and first.evidence(terms(0.9, 0.8, 0.6, 0.7)) == pytest.approx(0.9 + 0.5 * 0.6)


WEIGHTS = {"score": 20.0, "margin": 15.0, "coverage": 10.0, "spread": 1.0}


@pytest.mark.parametrize("weights", [
    {"score": 20.0, "margin": 15.0, "coverage": 10.0},                       # a term missing
    {**WEIGHTS, "brightness": 1.0},                                          # a term the phone does not know
    {**WEIGHTS, "margin": float("nan")}, {**WEIGHTS, "score": float("inf")},  # not finite
    {**WEIGHTS, "spread": "high"}, {**WEIGHTS, "score": None}, [20.0, 15.0, 10.0, 1.0],  # not numbers by name
])
def test_a_malformed_calibration_is_refused_with_a_typed_error(weights: Any) -> None:
    with pytest.raises(BadResponseError, match="calibration"):
        Calibration.from_public({"levels": [0.0, 1.0], "scores": [0.5, 0.9], "weights": weights})


@pytest.mark.parametrize("published", [
    {"levels": [0.0, 1.0], "scores": [0.5, float("nan")], "weights": WEIGHTS},
    {"levels": [0.0, float("nan")], "scores": [0.5, 0.9], "weights": WEIGHTS},
    {"levels": [[0.0, 1.0]], "scores": [[0.5, 0.9]], "weights": WEIGHTS},
    {"levels": [0.0, 0.5, 1.0], "scores": [0.5, 0.9], "weights": WEIGHTS},
    {"scores": [0.5, 0.9], "weights": WEIGHTS},
])
def test_malformed_quantiles_are_refused_with_a_typed_error(published: dict[str, Any]) -> None:
    with pytest.raises(BadResponseError, match="calibration"):
        Calibration.from_public(published)


def test_a_lone_candidate_has_the_largest_lead() -> None:
    assert terms(0.8, None, 0.9, 1.0)[1] == MARGIN_CAP == terms(0.8, -0.5, 0.9, 1.0)[1]
    assert terms(0.8, 0.75, 0.9, 1.0)[1] == pytest.approx(0.05)
    assert look_spread(np.eye(3)) == pytest.approx(0.0) and look_spread(np.ones((1, 4))) == 1.0


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
    assert 0.0 <= answer["confidence"] < 0.05 and isinstance(answer["evidence"], float)
