"""Converting from PyTorch, Keras and SavedModel, end to end on small models the tests build:
convert, run on real photos through the extractor, match the framework, quantize, match again.

These need the torch and tensorflow extras, which `make test` leaves out: `make convert-check`
installs them in .venv-convert and runs this file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_client.vision.extractor import Extractor, l2_normalize
from edge_client.vision.photo import load_rgb
from tests.conftest import dataset_photos
from tools.model import cli as models
from tools.model import compare

SIZE = 64
#: How the small models expect pixels, as a PyTorch user would train them: [-1, 1].
MEAN, STD = 127.5, 127.5


def tiny_torch_net() -> Any:
    """A two-layer CNN with a pooled 16-d feature, fixed weights (the ``--torch`` factory of the test)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1)).eval()


def _tiny_keras(tf: Any) -> Any:
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((SIZE, SIZE, 3))
    x = tf.keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inputs)
    x = tf.keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    return tf.keras.Model(inputs, tf.keras.layers.GlobalAveragePooling2D()(x))


def _pixels(photos: list[Path]) -> np.ndarray:
    """The photos as the phone preprocesses them, normalised as the models were trained."""
    return (np.stack([load_rgb(p, (SIZE, SIZE), 10**8) for p in photos]).astype(np.float32) - MEAN) / STD


def _check_model(converted: Path, reference: np.ndarray, photos: list[Path], tmp_path: Path) -> None:
    """The converted float model matches the framework; its int8 quantization stays close."""
    floating = Extractor(converted, num_threads=1, mean=MEAN, std=STD)
    assert floating._input["dtype"] == np.float32 and floating.input_size == (SIZE, SIZE)
    ours = np.stack([floating.extract(p) for p in photos])
    assert np.allclose(ours, l2_normalize(reference), atol=1e-4)
    quantized = tmp_path / "q.tflite"
    assert models.main(["quantize", str(converted), "--calibrate", str(photos[0].parent.parent),
                        "--photos", "40", "--mean", str(MEAN), "--std", str(STD), "--out", str(quantized)]) == 0
    integer = Extractor(quantized, num_threads=1, mean=MEAN, std=STD)
    assert integer._input["dtype"] == np.int8
    cos = compare.cosines(ours, np.stack([integer.extract(p) for p in photos]))
    assert np.median(cos) > 0.98, cos


def test_torch_factory_converts_end_to_end(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="the torch extra is not installed (make convert-check)")
    pytest.importorskip("litert_torch", reason="the torch extra is not installed (make convert-check)")
    out = tmp_path / "torch.tflite"
    assert models.main(["convert", "--torch", "tests.test_convert:tiny_torch_net", "--size", str(SIZE),
                        "--out", str(out)]) == 0
    photos = dataset_photos(spots=4, per_spot=2)
    with torch.no_grad():
        reference = tiny_torch_net()(torch.from_numpy(_pixels(photos)).permute(0, 3, 1, 2)).flatten(1).numpy()
    _check_model(out, reference, photos, tmp_path)


def test_keras_file_converts_end_to_end(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow", reason="the tensorflow extra is not installed (make convert-check)")
    model = _tiny_keras(tf)
    model.save(tmp_path / "tiny.keras")
    out = tmp_path / "keras.tflite"
    assert models.main(["convert", "--keras", str(tmp_path / "tiny.keras"), "--out", str(out)]) == 0
    photos = dataset_photos(spots=4, per_spot=2)
    _check_model(out, model.predict(_pixels(photos), verbose=0), photos, tmp_path)


def test_saved_model_converts_end_to_end(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow", reason="the tensorflow extra is not installed (make convert-check)")
    model = _tiny_keras(tf)
    model.export(str(tmp_path / "saved"), verbose=False)
    out = tmp_path / "saved.tflite"
    assert models.main(["convert", "--saved-model", str(tmp_path / "saved"), "--out", str(out)]) == 0
    photos = dataset_photos(spots=4, per_spot=2)
    _check_model(out, model.predict(_pixels(photos), verbose=0), photos, tmp_path)


def test_missing_framework_or_bad_factory_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert models.main(["convert", "--torch", "no_such_module:net", "--out", "/tmp/never.tflite"]) == 1
    assert "no_such_module" in capsys.readouterr().err
