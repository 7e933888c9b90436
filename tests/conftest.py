"""Shared fixtures: the real model, real photos from ../shared, no mocks."""
from __future__ import annotations

from pathlib import Path

import pytest

from edge_client.config import default_model_path
from edge_client.vision.extractor import Extractor
from tests.homes import private_home, use_private_home  # noqa: F401  (an autouse fixture)
from tools.live import LiveServer

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SHARED_MODELS = SHARED / "models"
DATASET = SHARED / "datasets" / "wa-landmarks"
CLASSIFIER = SHARED_MODELS / "mobilenet_v2_1.0_224_quant.tflite"
V1_EXTRACTOR = SHARED_MODELS / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
FEATURE_TENSOR = "MobilenetV2/Logits/AvgPool"

#: The device test run's own folder: only ``make test-device`` collects it, in ``.venv-device``.
collect_ignore = ["device"]


def pytest_configure(config: pytest.Config) -> None:
    use_private_home("enfpire-home-")


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


SUBSET_SPOTS = 24


def make_subset(dest: Path, spots: int = SUBSET_SPOTS, per_spot: int = 1000, skip_first: int = 0,
                first: int = 0) -> Path:
    """A small dataset folder (symlinks to real photos) with its spots CSV; spots from ``first`` on."""
    images = dest / "images"
    folders = sorted(p for p in (DATASET / "images").iterdir() if p.is_dir())[first:first + spots]
    for folder in folders:
        (images / folder.name).mkdir(parents=True)
        for photo in sorted(folder.glob("*.jpg"))[skip_first:skip_first + per_spot]:
            (images / folder.name / photo.name).symlink_to(photo)
    names = {f.name for f in folders}
    lines = (DATASET / "landmarks.csv").read_text().splitlines()
    (dest / "landmarks.csv").write_text("\n".join([lines[0]] + [l for l in lines[1:] if l.split(",")[0] in names]) + "\n")
    return dest


@pytest.fixture(scope="session")
def subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 real spots, all their photos but the first of each (kept out as queries)."""
    return make_subset(tmp_path_factory.mktemp("subset"), skip_first=1)


@pytest.fixture(scope="session")
def held_out() -> list[tuple[str, Path]]:
    """The first photo of each subset spot: never in the subset's index."""
    folders = sorted(p for p in (DATASET / "images").iterdir() if p.is_dir())[:SUBSET_SPOTS]
    return [(f.name, sorted(f.glob("*.jpg"))[0]) for f in folders]


@pytest.fixture(scope="session")
def index_dir(subset: Path, extractor: Extractor, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lite_server.index.store import build_index

    out = tmp_path_factory.mktemp("index")
    build_index(subset / "images", out, extractor, subset / "landmarks.csv")
    return out


def copy_index(index_dir: Path, parent: Path) -> Path:
    """A private copy of an index directory (``current`` stays a relative link) for tests that change it."""
    import shutil

    copy = parent / "index"
    shutil.copytree(index_dir, copy, symlinks=True)
    return copy


#: The session index's cells: its 24 spots in cells of the default 16 would make one cell, where a
#: phone's decoys have nowhere to go; cells of 10 make two, as a small catalogue's operator would.
SESSION_CELL_MIN_SPOTS = 10


@pytest.fixture(scope="session")
def app(index_dir: Path):  # type: ignore[no-untyped-def]
    from lite_server.api.app import create_app
    from lite_server.config import ServerConfig

    return create_app(ServerConfig(index=str(index_dir), cell_min_spots=SESSION_CELL_MIN_SPOTS))


@pytest.fixture()
def client(app):  # type: ignore[no-untyped-def]
    return app.test_client()


@pytest.fixture(scope="session")
def live_server(index_dir: Path):  # type: ignore[no-untyped-def]
    server = LiveServer(index_dir, env={"ENFPIRE_CELL_MIN_SPOTS": str(SESSION_CELL_MIN_SPOTS)})
    yield server
    server.stop()
