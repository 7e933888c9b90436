"""The cut extractor is the classifier's AvgPool tensor, bit for bit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_client.vision.interpreter import make_interpreter
from edge_client.vision.photo import load_rgb
from tests.conftest import CLASSIFIER, FEATURE_TENSOR, V1_EXTRACTOR
from tools.model import cut as cutter


def _raw_output(model: Path | str, pixels: np.ndarray) -> np.ndarray:
    interpreter, _ = make_interpreter(str(model), 2)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pixels[np.newaxis])
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def _preserved_tensor(model: Path, name: str, pixels: np.ndarray) -> np.ndarray:
    interpreter, _ = make_interpreter(str(model), 2, experimental_preserve_all_tensors=True)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pixels[np.newaxis])
    interpreter.invoke()
    index = next(d["index"] for d in interpreter.get_tensor_details() if d["name"] == name)
    return interpreter.get_tensor(index)


@pytest.mark.filterwarnings("ignore:Warning. Enabling `experimental_preserve_all_tensors`")
def test_cut_output_is_the_avgpool_tensor_bit_for_bit(model_path: Path, photos: list[Path]) -> None:
    for photo in photos:
        pixels = load_rgb(photo, (224, 224), 10**8)
        cut_out = _raw_output(model_path, pixels)
        reference = _preserved_tensor(CLASSIFIER, FEATURE_TENSOR, pixels)
        assert cut_out.shape == (1, 1280) and cut_out.dtype == np.uint8
        assert np.array_equal(cut_out.reshape(-1), reference.reshape(-1)), photo


def test_cut_is_deterministic_and_prunes_the_head(tmp_path: Path) -> None:
    source = CLASSIFIER.read_bytes()
    first, second = cutter.cut(source, FEATURE_TENSOR), cutter.cut(source, FEATURE_TENSOR)
    assert first == second
    assert len(first) < len(source) * 0.8  # the 1001-way head's weights are gone
    names = cutter.tensor_names(first)
    assert "MobilenetV2/Predictions/Softmax" not in names and FEATURE_TENSOR in names


def test_cutting_v1_extractor_at_its_own_output_keeps_outputs(tmp_path: Path, photos: list[Path]) -> None:
    name = "MobilenetV1/Logits/AvgPool_1a/AvgPool"
    out = tmp_path / "v1.tflite"
    out.write_bytes(cutter.cut(V1_EXTRACTOR.read_bytes(), name))
    for photo in photos[:4]:
        pixels = load_rgb(photo, (224, 224), 10**8)
        before, after = _raw_output(V1_EXTRACTOR, pixels), _raw_output(out, pixels)
        assert before.shape == (1, 1, 1, 1024) and after.shape == (1, 1024)
        assert np.array_equal(before.reshape(-1), after.reshape(-1))


def test_unknown_tensor_is_a_clear_error() -> None:
    with pytest.raises(cutter.CutError, match="no tensor named 'nope'"):
        cutter.cut(CLASSIFIER.read_bytes(), "nope")
