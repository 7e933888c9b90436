"""Shared fixtures: the real model, real photos from ../shared, no mocks."""
from __future__ import annotations

from pathlib import Path

import pytest

from edge_client.config import default_model_path
from edge_client.extractor import Extractor

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SHARED_MODELS = SHARED / "models"
DATASET = SHARED / "datasets" / "wa-landmarks"
CLASSIFIER = SHARED_MODELS / "mobilenet_v2_1.0_224_quant.tflite"
V1_EXTRACTOR = SHARED_MODELS / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
FEATURE_TENSOR = "MobilenetV2/Logits/AvgPool"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-soak", action="store_true", help="run the long soak tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-soak"):
        return
    skip = pytest.mark.skip(reason="long run: make soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_path() -> Path:
    path = default_model_path()
    assert path.is_file(), f"{path} is missing: run 'make setup'"
    return path


@pytest.fixture(scope="session")
def extractor(model_path: Path) -> Extractor:
    return Extractor(model_path, num_threads=2)


def dataset_photos(spots: int = 5, per_spot: int = 2) -> list[Path]:
    """A deterministic handful of real photos: the first photos of the first spots."""
    folders = sorted(p for p in (DATASET / "images").iterdir() if p.is_dir())[:spots]
    return [photo for folder in folders for photo in sorted(folder.glob("*.jpg"))[:per_spot]]


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    return dataset_photos()
