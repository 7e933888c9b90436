"""Full-integer quantization of a float TFLite model, calibrated on the operator's photos.

Google's ai-edge-quantizer (``pip install 'enfpire[quantize]'``; it needs
ai-edge-litert, not TensorFlow) applies its static ``static_wi8_ai8`` recipe:
int8 weights per channel, int8 activations whose ranges come from running the
float model on calibration photos, and int8 input and output tensors, so the
phone's interpreter runs integer kernels from the first layer to the last.

Calibration photos go through the extractor's own preprocessing (orientation,
resize, ``(pixel - mean) / std``) so the ranges are those the phone will see.
The photos are chosen deterministically, evenly spread over the sorted folder.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edge_client.errors import EnfPireError, ModelError
from edge_client.vision.extractor import Extractor
from edge_client.vision.photo import Photo
from lite_server.index.store import PHOTO_SUFFIXES
from tools.model.dequantize import SIGNATURE
from tools.model.grids import keep_weight_grids

log = logging.getLogger(__name__)
CALIBRATION_PHOTOS = 200


class QuantizeError(EnfPireError):
    """The model cannot be quantized as asked (no quantizer, no photos, no signature...)."""


def calibration_photos(folder: Path, count: int = CALIBRATION_PHOTOS) -> list[Path]:
    """``count`` photos under ``folder`` (any depth), evenly spread over the sorted list."""
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
    if not found:
        raise QuantizeError(f"no photos under {folder}")
    if len(found) <= count:
        return found
    return [found[i] for i in np.linspace(0, len(found) - 1, count).round().astype(int)]


def calibration_inputs(extractor: Extractor, photos: list[Photo], name: str) -> Iterator[dict[str, np.ndarray]]:
    """Each photo as the float model's signature input ``{name: tensor}``, preprocessed as on the phone."""
    for photo in photos:
        yield {name: extractor.input_tensor(extractor.preprocess(photo))}


def quantize(float_model: Path, photos: list[Photo], out: Path, mean: Any = None, std: Any = None,
             threads: int = 2, keep_grids: bool = True) -> Path:
    """Quantize ``float_model`` to full integer, calibrated on ``photos``; write ``out`` atomically.

    With ``keep_grids``, weights the float model holds on a uniform grid (a recovered or
    quantization-aware-trained model) keep that grid (:func:`tools.model.grids.keep_weight_grids`)."""
    quantizer, recipe, calibrator = _quantizer()
    extractor = Extractor(float_model, num_threads=threads, mean=mean, std=std)
    if extractor._input["dtype"] != np.float32:
        raise QuantizeError(f"{float_model} is quantized already (input {np.dtype(extractor._input['dtype']).name})")
    qt = quantizer.Quantizer(str(float_model))
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    signature, input_name = _signature_input(float_model)
    data = list(calibration_inputs(extractor, photos, input_name))
    log.info("calibrating %s on %d photos", float_model.name, len(data))
    # The profiler-based mode collects min/max in C++: ~50x faster than keeping every tensor.
    ranges = qt.calibrate({signature: data}, num_threads=threads,
                          mode=calibrator.CalibrationMode.CALIBRATION_PROFILER_BASED)
    result = bytes(qt.quantize(ranges, enable_progress_report=False).quantized_model)
    if keep_grids:
        result, _ = keep_weight_grids(result, float_model.read_bytes())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(result)
    tmp.replace(out)
    return out


def _quantizer() -> tuple[Any, Any, Any]:
    try:
        from ai_edge_quantizer import calibrator, quantizer, recipe
    except ImportError as exc:
        raise QuantizeError("ai-edge-quantizer is not installed: pip install 'enfpire[quantize]'") from exc
    return quantizer, recipe, calibrator


def _signature_input(model: Path) -> tuple[str, str]:
    """(signature key, input name) of the model's single-image signature."""
    from edge_client.vision.interpreter import make_interpreter

    interpreter, _ = make_interpreter(str(model), 1)
    signatures = interpreter.get_signature_list()
    if not signatures:
        raise QuantizeError(f"{model} has no signature: the quantizer needs one "
                            "(models from 'python -m tools.model convert' or 'dequantize' have one)")
    key = SIGNATURE if SIGNATURE in signatures else next(iter(signatures))
    inputs = signatures[key]["inputs"]
    if len(inputs) != 1:
        raise ModelError(f"signature {key!r} of {model} takes {len(inputs)} inputs, not one image")
    return key, inputs[0]
