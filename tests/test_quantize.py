"""Bring your own model, on real inputs: a float MobileNetV2 recovered from the shared uint8
model, quantized again with calibration on wa-landmarks photos, cut, compared and registered."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_client.client import Client
from edge_client.config import ClientConfig
from edge_client.errors import ChecksumError, ModelNotFoundError
from edge_client.vision.extractor import Extractor
from lite_server import cli as server_cli
from lite_server.index.store import Index
from tests.conftest import CLASSIFIER, DATASET, FEATURE_TENSOR, SHARED_MODELS, make_subset
from tools.model import cli as models
from tools.model import compare, grids, quantize
from tools.model import cut as cut_tools
from tools.model.dequantize import dequantize_model

pytest.importorskip("ai_edge_quantizer", reason="the quantize extra is not installed: pip install 'enfpire[quantize]'")

SAMPLES = ("parrot.jpg", "cat.bmp", "grace_hopper.bmp")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("byom")


@pytest.fixture(scope="module")
def float_classifier(work: Path) -> Path:
    out = work / "mobilenet_v2_float.tflite"
    assert models.main(["dequantize", str(CLASSIFIER), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def requantized(float_classifier: Path, work: Path) -> dict[str, Path]:
    """The recovered float classifier quantized on 200 wa-landmarks photos; both cut at the AvgPool."""
    quantized = work / "mobilenet_v2_requant.tflite"
    assert models.main(["quantize", str(float_classifier), "--calibrate", str(DATASET / "images"),
                        "--photos", "200", "--out", str(quantized)]) == 0
    out = {}
    for role, source in (("float", float_classifier), ("quantized", quantized)):
        out[role] = models.cut_file(source, FEATURE_TENSOR, work / f"{role}_avgpool.tflite")
    return out


def test_recovered_float_model_is_the_uint8_network(float_classifier: Path) -> None:
    """Same top label and nearly the same scores on the reference photos, with float32 input and output."""
    recovered, original = Extractor(float_classifier, num_threads=2), Extractor(CLASSIFIER, num_threads=2)
    assert recovered._input["dtype"] == np.float32 and recovered._output["dtype"] == np.float32
    for name in SAMPLES:
        a, b = recovered.extract(SHARED_MODELS / name), original.extract(SHARED_MODELS / name)
        assert a.argmax() == b.argmax() and float(a @ b) > 0.99, name


def test_dequantizing_a_float_model_is_a_clear_error(float_classifier: Path) -> None:
    with pytest.raises(ValueError, match="float already"):
        dequantize_model(float_classifier.read_bytes())


def test_quantized_extractor_is_full_integer(requantized: dict[str, Path]) -> None:
    extractor = Extractor(requantized["quantized"], num_threads=1)
    assert extractor._input["dtype"] == np.int8 and extractor._output["dtype"] == np.int8
    assert extractor.dim == 1280
    assert requantized["quantized"].stat().st_size < requantized["float"].stat().st_size / 3


def test_calibration_photos_are_spread_and_deterministic() -> None:
    first = quantize.calibration_photos(DATASET / "images", 200)
    assert first == quantize.calibration_photos(DATASET / "images", 200) and len(set(first)) == 200
    assert len({p.parent.name for p in first}) > 100  # spread over the spots, not the first few


def test_requantized_top1_matches_the_shared_uint8_model(requantized: dict[str, Path], model_path: Path) -> None:
    """On all of wa-landmarks: our quantization costs at most a point against Google's quantization-aware training."""
    ours, queries, _ = compare.model_top1(Extractor(requantized["quantized"], num_threads=2), DATASET)
    shared, _, _ = compare.model_top1(Extractor(model_path, num_threads=2), DATASET)
    print(f"wa-landmarks top-1 on {queries} queries: shared uint8 {shared:.4f}, re-quantized {ours:.4f}")
    # Measured 0.7892 against 0.7788 (+1.0 point: the kept weight grids plus activation ranges from
    # these photos); the "within a point" is about what quantization costs, so a gain passes.
    assert ours >= shared - 0.01, (shared, ours)


def test_verify_reports_cosine_and_both_top1(requantized: dict[str, Path], work: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The float model is slow on this machine: the report covers 24 spots (about 300 photos)."""
    subset = make_subset(work / "verify-set")
    argv = ["verify", str(requantized["quantized"]), "--float", str(requantized["float"]), "--dataset", str(subset)]
    assert models.main(argv + ["--max-drop", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    print(compare.summary(report))
    # Issue 17: median >= 0.98. Measured 0.990 (min 0.957) with the weight grids kept; the quantizer's
    # own re-rounding gave 0.974 (min 0.862), see test_kept_grids_beat_the_quantizers_rounding.
    assert report["cosine"]["median"] >= 0.98 and 0 < report["cosine"]["min"] <= report["cosine"]["median"]
    assert report["cosine"]["photos"] > 250 and report["queries"] > 20
    assert 0.5 < report["quantized"]["top1"] <= 1 and 0.5 < report["float"]["top1"] <= 1
    # Demanding a gain the model cannot have fails the command.
    assert models.main(argv + ["--max-drop", str(report["top1_drop_points"] - 0.5)]) == 2


def test_registered_name_agrees_on_both_sides(requantized: dict[str, Path], work: Path, model_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``index build --model NAME`` and the phone's ``--model NAME`` run the same file, by sha256.

    The server's index then names that sha256 in /v1/info, and a phone with another model
    refuses it (``test_loop.test_server_with_another_model_is_refused``; a server is not started
    again here: its PCA fit alone takes 15 to 60 s on this machine).
    """
    subset = make_subset(work / "spots", spots=8, skip_first=1)
    registry = work / "models"
    registry.mkdir()
    assert models.main(["register", "mnv2-requant", str(requantized["quantized"]), "--models", str(registry),
                        "--source", "re-quantized from the recovered float MobileNetV2", "--licence", "Apache-2.0"]) == 0
    entry = json.loads((registry / "manifest.json").read_text())["extractors"]["mnv2-requant"]
    assert entry["input"] == {"size": [224, 224], "dtype": "int8", "mean": 128.0, "std": 128.0}
    assert entry["tensor"] == FEATURE_TENSOR and entry["dim"] == 1280
    monkeypatch.setenv("ENFPIRE_MODEL_DIR", str(registry))
    index = work / "index"
    assert server_cli.main(["index", "build", "--photos", str(subset / "images"), "--out", str(index),
                            "--model", "mnv2-requant"]) == 0
    with Client(ClientConfig(model="mnv2-requant", model_dir=str(registry))) as phone:
        assert Index.load(index).model_sha256 == entry["sha256"] == phone._extractor().sha256
    assert Extractor(model_path).sha256 != entry["sha256"]  # the default phone would be refused


def test_unknown_or_changed_registered_model_is_refused(tmp_path: Path, model_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no model named"):
        ClientConfig(model="nope", model_dir=str(tmp_path)).model_path()
    models.register("mnv2", model_path, "test", "Apache-2.0", models_dir=tmp_path)
    (tmp_path / "mnv2.tflite").write_bytes(model_path.read_bytes() + b"\0")
    with pytest.raises(ChecksumError):
        ClientConfig(model="mnv2", model_dir=str(tmp_path)).model_path()


def test_grid_step_finds_the_grid_and_only_a_grid() -> None:
    rng = np.random.default_rng(0)
    step = np.float32(0.0123)
    on_grid = (rng.integers(-150, 150, 4000) * step).astype(np.float32)  # float32 rounding included
    assert grids.grid_step(on_grid) == pytest.approx(float(step), rel=1e-6)
    assert grids.grid_step(rng.normal(size=4000).astype(np.float32)) is None
    assert grids.grid_step(np.array([0.5, 0.5], np.float32)) is None


@pytest.fixture(scope="module")
def plain(float_classifier: Path, work: Path) -> Path:
    """The same quantization without kept grids: the quantizer's own per-channel rounding."""
    out = work / "requant_plain.tflite"
    assert models.main(["quantize", str(float_classifier), "--calibrate", str(DATASET / "images"),
                        "--photos", "200", "--out", str(out), "--no-keep-grids"]) == 0
    return out


def test_kept_grids_are_exact_where_they_fit(requantized: dict[str, Path], plain: Path, float_classifier: Path,
                                             work: Path) -> None:
    """Every kept channel dequantizes to the float model's weight exactly (to float32 rounding); the
    channels whose grid needs more than int8 keep the quantizer's values."""
    kept, changed = grids.keep_weight_grids(plain.read_bytes(), float_classifier.read_bytes())
    _, model = cut_tools.read_model(kept)
    _, source = cut_tools.read_model(float_classifier.read_bytes())
    floats = {cut_tools.tensor_name(t): grids._values(source, t, np.float32)
              for t in source.subgraphs[0].tensors if t.type == 0}
    exact = 0
    for op in model.subgraphs[0].operators:
        weight = model.subgraphs[0].tensors[op.inputs[1]] if len(op.inputs) > 1 else None
        w = floats.get(cut_tools.tensor_name(weight)) if weight is not None and weight.type == 9 else None
        if w is None:  # not a constant weight (an ADD's second input is an activation)
            continue
        q = grids._values(model, weight, np.int8).astype(np.float64)
        axis = int(weight.quantization.quantizedDimension)
        shape = [1] * len(weight.shape)
        shape[axis] = -1
        back = q.reshape(weight.shape) * np.asarray(weight.quantization.scale).reshape(shape)
        error = np.abs(np.moveaxis(back - w.reshape(weight.shape), axis, 0)).reshape(len(weight.quantization.scale), -1)
        exact += int((error.max(axis=1) <= 1e-5 * np.abs(w).max()).sum())
    assert changed > 17000 and exact >= changed
    # What quantize writes by default (before the cut) is the plain model with its grids kept.
    assert (work / "mobilenet_v2_requant.tflite").read_bytes() == kept


def test_kept_grids_beat_the_quantizers_rounding(requantized: dict[str, Path], plain: Path, work: Path) -> None:
    """Without kept grids the features move further from the float model's."""
    plain_cut = models.cut_file(plain, FEATURE_TENSOR, work / "plain_avgpool.tflite")
    photos = [p for p in sorted((DATASET / "images").rglob("*.jpg"))[::60]][:40]
    reference = Extractor(requantized["float"], num_threads=2)
    cosines = {}
    expected = [reference.extract(p) for p in photos]  # unit vectors
    for role, path in (("kept", requantized["quantized"]), ("plain", plain_cut)):
        extractor = Extractor(path, num_threads=2)
        cosines[role] = float(np.median([float(extractor.extract(p) @ e) for p, e in zip(photos, expected)]))
    print(cosines)
    assert cosines["kept"] > cosines["plain"] + 0.005
