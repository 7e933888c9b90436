"""The on-device extractor on the real model and real photos."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_client.errors import ChecksumError, ModelError, ModelNotFoundError, PhotoError
from edge_client.vision.extractor import Extractor
from tests.conftest import CLASSIFIER, FEATURE_TENSOR, SHARED_MODELS
from tests.test_cut import _preserved_tensor
from tools.model import cli as model_tools

ORIENTATION = 0x0112


def test_classifier_sees_a_macaw_in_the_parrot_photo() -> None:
    classifier = Extractor(CLASSIFIER, num_threads=2)
    scores = classifier.extract(SHARED_MODELS / "parrot.jpg")
    labels = (SHARED_MODELS / "imagenet_labels.txt").read_text().splitlines()
    assert labels[int(np.argmax(scores))] == "macaw"


def test_feature_is_unit_float32(extractor: Extractor, photos: list[Path]) -> None:
    feature = extractor.extract(photos[0])
    assert feature.dtype == np.float32 and feature.shape == (1280,)
    assert abs(float(np.linalg.norm(feature)) - 1.0) < 1e-5
    assert "ai_edge_litert" in repr(extractor) and extractor.dim == 1280


def test_path_bytes_array_and_pil_give_the_same_vector(extractor: Extractor, photos: list[Path]) -> None:
    path = photos[1]
    from_path = extractor.extract(path)
    from_bytes = extractor.extract(path.read_bytes())
    from_pil = extractor.extract(Image.open(path))
    from_array = extractor.extract(np.asarray(Image.open(path).convert("RGB")))
    for other in (from_bytes, from_pil, from_array):
        assert np.array_equal(from_path, other)


def _rotated_with_exif(upright: Image.Image, fmt: str) -> bytes:
    """Pixels stored turned 90 degrees counter-clockwise, with the EXIF tag that undoes it."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # display = rotate the stored pixels 90 degrees clockwise
    buffer = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buffer, fmt, exif=exif, quality=95)
    return buffer.getvalue()


def test_exif_rotated_photo_gives_the_upright_feature(extractor: Extractor, photos: list[Path]) -> None:
    upright = Image.open(photos[2]).convert("RGB")
    reference = extractor.extract(np.asarray(upright))
    assert np.array_equal(extractor.extract(_rotated_with_exif(upright, "PNG")), reference)
    # JPEG re-encoding moves a few pixels; the feature must still be the upright one.
    assert float(extractor.extract(_rotated_with_exif(upright, "JPEG")) @ reference) > 0.97
    sideways = np.asarray(upright.transpose(Image.Transpose.ROTATE_90))
    assert float(extractor.extract(sideways) @ reference) < 0.97


def test_large_photo_takes_the_fast_path_close_to_the_careful_one(extractor: Extractor, photos: list[Path]) -> None:
    big = io.BytesIO()
    Image.open(photos[3]).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC).save(big, "JPEG", quality=92)
    fast = extractor.extract(big.getvalue())
    careful = extractor.extract(big.getvalue(), fast=False)
    assert float(fast @ careful) > 0.98


def test_extract_many_reports_bad_photos_and_keeps_order(extractor: Extractor, photos: list[Path]) -> None:
    failures: list[object] = []
    items = [photos[0], b"not a photo", photos[1]]
    out = list(extractor.extract_many(items, on_error=lambda photo, exc: failures.append(photo)))
    assert out[1] is None and failures == [b"not a photo"]
    assert np.array_equal(out[0], extractor.extract(photos[0]))
    assert np.array_equal(out[2], extractor.extract(photos[1]))
    with pytest.raises(PhotoError):
        list(extractor.extract_many(items))


@pytest.mark.parametrize("content", [b"", b"just some text\n", "truncated"])
def test_bad_photos_are_typed_errors(extractor: Extractor, photos: list[Path], tmp_path: Path, content: object) -> None:
    if content == "truncated":
        data = photos[0].read_bytes()
        content = data[: len(data) // 2]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(PhotoError, match="bad.jpg"):
        extractor.extract(bad)
    with pytest.raises(PhotoError):
        extractor.extract(content)  # type: ignore[arg-type]


def test_photo_sizes_at_the_edges(extractor: Extractor) -> None:
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tiny, "PNG")
    assert extractor.extract(tiny.getvalue()).shape == (1280,)
    bomb = io.BytesIO()
    Image.new("L", (20000, 20000)).save(bomb, "PNG", optimize=False)
    with pytest.raises(PhotoError, match="pixels"):
        extractor.extract(bomb.getvalue())
    with pytest.raises(PhotoError):
        extractor.extract(np.zeros((4, 4), dtype=np.float32))


def test_missing_and_corrupt_models_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        Extractor(tmp_path / "absent.tflite")
    corrupt = tmp_path / "corrupt.tflite"
    corrupt.write_bytes(b"TFL3" + bytes(1000))
    with pytest.raises(ModelError, match="not a usable TFLite model"):
        Extractor(corrupt)


def test_sha256_mismatch_deletes_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "model.tflite"
    dest.write_bytes(b"the good copy")
    with pytest.raises(ChecksumError):
        model_tools.install_file(SHARED_MODELS / "parrot.jpg", dest, "0" * 64)
    assert dest.read_bytes() == b"the good copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.tflite"]


@pytest.mark.filterwarnings("ignore:Warning. Enabling `experimental_preserve_all_tensors`")
def test_cli_json_matches_the_classifier_avgpool(photos: list[Path]) -> None:
    photo = photos[4]
    out = subprocess.run([sys.executable, "-m", "edge_client.cli", "extract", str(photo), "--json"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["dim"] == 1280 and result["interpreter"] == "ai_edge_litert"
    assert result["model"] == "mobilenet_v2_1.0_224_quant_avgpool.tflite" and len(result["model_sha256"]) == 64
    from edge_client.vision.photo import load_rgb
    raw = _preserved_tensor(CLASSIFIER, FEATURE_TENSOR, load_rgb(photo, (224, 224), 10**8)).reshape(-1)
    reference = raw.astype(np.float32) / np.linalg.norm(raw.astype(np.float32))
    assert float(np.asarray(result["feature"], dtype=np.float32) @ reference) >= 0.9999


def test_cli_bad_photo_exits_with_a_message(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "edge_client.cli", "extract", str(tmp_path / "none.jpg")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "none.jpg" in out.stderr and "Traceback" not in out.stderr


def test_reference_kernels_give_the_fast_feature_within_rounding(model_path: Path, extractor: Extractor,
                                                                 photos: list[Path]) -> None:
    """The arm64 check (make arm-check) compares these across CPUs; here: close to the fast kernels,
    and the same bits whatever the thread count, as integer arithmetic fixed by the spec must be."""
    one, two = (Extractor(model_path, num_threads=n, reference_kernels=True) for n in (1, 2))
    for photo in photos[:2]:
        exact = one.extract(photo)
        assert np.array_equal(exact, two.extract(photo))
        assert 0.99 <= float(exact @ extractor.extract(photo)) < 1.0 - 1e-7  # other kernels, other rounding
