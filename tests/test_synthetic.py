"""The synthetic catalogue generator, fitted on the real features of the test index's real photos."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_client.protocol import wire
from edge_client.vision.extractor import Extractor
from lite_server.api.app import create_app
from lite_server.config import ServerConfig
from lite_server.index.store import Index
from tools.bench import synthetic as syn


@pytest.fixture(scope="module")
def real(index_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 24 subset spots' real features (already extracted for the test index) and spot rows."""
    index = Index.load(index_dir)
    return np.asarray(index.features, np.float32), np.asarray(index.photo_spot)


@pytest.fixture(scope="module")
def model(real: tuple[np.ndarray, np.ndarray]) -> syn.FeatureModel:
    return syn.fit(*real)


@pytest.fixture(scope="module")
def catalogue(model: syn.FeatureModel) -> syn.SyntheticCatalogue:
    return syn.generate(3000, seed=7, model=model)


def test_a_seed_gives_the_same_catalogue_and_another_seed_another(model: syn.FeatureModel,
                                                                   catalogue: syn.SyntheticCatalogue) -> None:
    again = syn.generate(3000, seed=7, model=model)
    assert again.spots == catalogue.spots and np.array_equal(again.features, catalogue.features)
    assert np.array_equal(again.queries, catalogue.queries)
    other = syn.generate(3000, seed=8, model=model)
    assert other.spots != catalogue.spots and not np.array_equal(other.photo_spot, catalogue.photo_spot)


def test_features_are_unit_non_negative_float16_rows_of_the_model_dim(catalogue: syn.SyntheticCatalogue) -> None:
    for matrix in (catalogue.features, catalogue.queries):
        assert matrix.dtype == np.float16 and matrix.shape[1] == 1280
        assert matrix.min() >= 0
        assert np.allclose(np.linalg.norm(matrix.astype(np.float32), axis=1), 1, atol=2e-3)
    assert catalogue.photo_spot.dtype == np.int32 and len(catalogue.photo_spot) == len(catalogue.features)
    assert np.all(np.diff(catalogue.photo_spot) >= 0)
    assert np.array_equal(catalogue.query_spot, np.arange(3000))
    ids = [spot.id for spot in catalogue.spots]
    assert ids[42] == "syn-000042" and len(set(ids)) == 3000
    assert abs(catalogue.popularity.sum() - 1) < 1e-9 and catalogue.popularity.min() > 0


def test_photo_counts_are_heavy_tailed_around_the_asked_mean(catalogue: syn.SyntheticCatalogue) -> None:
    counts = np.bincount(catalogue.photo_spot, minlength=3000)
    assert counts.min() >= 1 and 9 <= counts.mean() <= 11
    assert np.median(counts) < 0.8 * counts.mean()           # most spots have fewer than the mean
    assert counts.max() > 8 * counts.mean()                  # and a few have many times more


def test_coordinates_stay_inside_the_box_and_cluster_in_towns(model: syn.FeatureModel) -> None:
    box = (45.5, -124.8, 49.0, -116.9)
    catalogue = syn.generate(2000, seed=1, model=model, mean_photos=2, box=box)
    lat = np.array([s.lat for s in catalogue.spots])
    lon = np.array([s.lon for s in catalogue.spots])
    assert lat.min() >= box[0] and lat.max() <= box[2] and lon.min() >= box[1] and lon.max() <= box[3]
    towns = np.array([s.info["town"] for s in catalogue.spots])
    biggest = lat[towns == "0"]
    assert len(biggest) > 2000 / 40 and biggest.std() < 0.3 < lat.std()  # the biggest town is dense


def test_synthetic_spots_are_as_distinguishable_as_the_real_ones(real: tuple[np.ndarray, np.ndarray]) -> None:
    report = syn.check(*real, seed=3)
    ours, truth = report["synthetic"], report["real"]
    assert ours["spots"] == truth["spots"] == 24
    assert abs(ours["photo_1nn_accuracy"] - truth["photo_1nn_accuracy"]) <= 0.08, syn.table(report)
    for key in ("nearest_spot_cos_p50", "pair_cos_p10", "pair_cos_p50", "pair_cos_p90"):
        assert abs(ours[key] - truth[key]) <= 0.06, (key, syn.table(report))
    assert ours["nearest_real_spot_cos_p50"] < 0.99  # new spots, not copies of the real ones


def test_queries_find_their_own_spot_far_more_often_than_chance(catalogue: syn.SyntheticCatalogue,
                                                                 real: tuple[np.ndarray, np.ndarray]) -> None:
    top1 = (catalogue.queries[:500].astype(np.float32) @ catalogue.features.astype(np.float32).T).argmax(axis=1)
    accuracy = np.mean(catalogue.photo_spot[top1] == catalogue.query_spot[:500])
    assert 0.15 < accuracy < 0.98  # 3000 spots modelled on 24 are much harder, yet far from chance (1/3000)


def test_a_published_synthetic_index_loads_and_serves(tmp_path: Path, model: syn.FeatureModel,
                                                      extractor: Extractor) -> None:
    index, catalogue = syn.publish_synthetic(tmp_path / "index", 24, seed=2, extractor=extractor, model=model,
                                             mean_photos=4)
    loaded = Index.load(tmp_path / "index")
    assert loaded.version == index.version and loaded.model_sha256 == extractor.sha256
    assert [s.id for s in loaded.spots] == [s.id for s in catalogue.spots]
    assert np.array_equal(loaded.photo_spot, catalogue.photo_spot)
    assert np.array_equal(np.asarray(loaded.features), catalogue.features)
    client = create_app(ServerConfig(index=str(tmp_path / "index"))).test_client()
    info: dict[str, Any] = client.get("/v1/info").get_json()
    assert info["n_spots"] == 24 and info["model_sha256"] == extractor.sha256
    exact = (catalogue.queries[:20].astype(np.float32) @ catalogue.features.astype(np.float32).T).argmax(axis=1)
    same = hits = 0
    for row in range(20):
        response = client.post("/v1/candidates", json={"vector": wire.encode(catalogue.queries[row], "float16"), "k": 3})
        assert response.status_code == 200
        first = response.get_json()["candidates"][0]["id"]
        same += first == catalogue.spots[catalogue.photo_spot[exact[row]]].id
        hits += first == catalogue.spots[catalogue.query_spot[row]].id
    assert same >= 18 and hits >= 6  # the server answers as an exact search does; chance is 20/24
