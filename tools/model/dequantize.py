"""Recover a float TFLite model from a uint8/int8 one by editing its flatbuffer.

Every quantized tensor becomes float32 and loses its quantization; a constant
one (weights, biases) gets its values dequantized, ``(q - zero_point) * scale``
per tensor or per channel. Operators are untouched: a fused RELU6 still clips,
so the float graph computes what the integer one approximates, without the
rounding of its activations. Integer tensors that were never quantized (a
RESHAPE's shape) stay as they are.

Why: the tests need a real float model to quantize, and the only models on
disk are quantized. Quantization-aware trained weights sit on the integer grid
already, so the recovered float MobileNetV2 is the network that was trained.
A ``serving_default`` signature is added when the model has none, because the
quantizer's calibration runs the model through its signature.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from tools.model.cut import CutError, pack, read_model, tensor_name

#: TFLite TensorType codes of the integer types a quantized tensor may hold.
_INTEGER_TYPES = {"UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64}
SIGNATURE = "serving_default"


def dequantize_model(model_bytes: bytes) -> bytes:
    """A float32 copy of a quantized single-subgraph TFLite model."""
    schema, model = read_model(model_bytes)
    if len(model.subgraphs) != 1:
        raise CutError(f"expected one subgraph, found {len(model.subgraphs)}")
    graph = model.subgraphs[0]
    dtypes = {getattr(schema.TensorType, name): dtype for name, dtype in _INTEGER_TYPES.items()}
    changed = 0
    for tensor in graph.tensors:
        if _is_quantized(tensor) and tensor.type in dtypes:
            _to_float(schema, model, tensor, dtypes[tensor.type])
            changed += 1
    if not changed:
        raise CutError("the model has no quantized tensors: it is float already")
    if not model.signatureDefs:
        model.signatureDefs = [_signature(schema, graph)]
    return pack(model, len(model_bytes) * 4)


def _is_quantized(tensor: Any) -> bool:
    q = tensor.quantization
    return q is not None and q.scale is not None and len(q.scale) > 0


def _to_float(schema: ModuleType, model: Any, tensor: Any, dtype: type) -> None:
    """Make ``tensor`` float32; dequantize its constant values if it has any."""
    q = tensor.quantization
    buffer = model.buffers[tensor.buffer] if tensor.buffer else None
    if buffer is not None and buffer.data is not None and len(buffer.data):
        values = np.frombuffer(bytes(np.asarray(buffer.data, np.uint8)), dtype=dtype).astype(np.float64)
        values = values.reshape([int(d) for d in tensor.shape])
        buffer.data = np.frombuffer(_dequantized(values, q).astype("<f4").tobytes(), dtype=np.uint8)
    tensor.type = schema.TensorType.FLOAT32
    tensor.quantization = None


def _dequantized(values: np.ndarray, q: Any) -> np.ndarray:
    """``(q - zero_point) * scale``, broadcast along the quantized dimension when per channel."""
    scale = np.asarray(q.scale, np.float64)
    zero = np.asarray(q.zeroPoint if q.zeroPoint is not None else np.zeros_like(scale), np.float64)
    if scale.size > 1:
        shape = [1] * values.ndim
        shape[int(q.quantizedDimension)] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (values - zero) * scale


def _signature(schema: ModuleType, graph: Any) -> Any:
    """A ``serving_default`` signature naming the graph's inputs and outputs by tensor name."""

    def entry(index: int) -> Any:
        t = schema.TensorMapT()
        t.name, t.tensorIndex = tensor_name(graph.tensors[index]).encode(), int(index)
        return t

    signature = schema.SignatureDefT()
    signature.signatureKey = SIGNATURE.encode()
    signature.subgraphIndex = 0
    signature.inputs = [entry(i) for i in graph.inputs]
    signature.outputs = [entry(i) for i in graph.outputs]
    return signature
