"""Cut a TFLite classifier down to a feature extractor by editing its flatbuffer.

The result has one output: the named intermediate tensor, reshaped to
``[1, D]`` by an appended RESHAPE op (a byte copy, so values stay
bit-identical). Operators, tensors, buffers and operator codes that no longer
feed that output are dropped and every index is renumbered. Packing the
object tree with a fresh builder is deterministic: same input, same bytes.

Works on any single-subgraph TFLite model; the schema module comes from
ai-edge-litert (or TensorFlow).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np

from edge_client.errors import ModelError

RESHAPE = 22  # BuiltinOperator.RESHAPE
_SCHEMA_MODULES = ("ai_edge_litert.schema_py_generated", "tensorflow.lite.python.schema_py_generated")


class CutError(ModelError, ValueError):
    """The model cannot be cut as asked (unknown tensor, several subgraphs...)."""


def load_schema() -> ModuleType:
    for name in _SCHEMA_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise CutError("no TFLite schema module: pip install ai-edge-litert")


def read_model(model_bytes: bytes) -> tuple[ModuleType, Any]:
    """(schema module, object tree) of a TFLite model, every buffer's data held inline.

    Models over 2 GB, and every model ai-edge-quantizer writes, keep constant data
    after the flatbuffer, found by each buffer's ``offset`` and ``size``; packing the
    tree again would lose it, so it is copied into the buffers first.
    """
    schema = load_schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    for buffer in model.buffers or []:
        if getattr(buffer, "offset", 0) > 1:
            end = buffer.offset + buffer.size
            if end > len(model_bytes):
                raise CutError(f"a buffer points past the end of the model ({end} > {len(model_bytes)} bytes)")
            buffer.data = np.frombuffer(model_bytes[buffer.offset:end], dtype=np.uint8)
            buffer.offset = buffer.size = 0
    return schema, model


def pack(model: Any, size_hint: int) -> bytes:
    """The object tree as TFLite bytes; the same tree always packs to the same bytes."""
    builder = __import__("flatbuffers").Builder(size_hint)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def tensor_name(tensor: Any) -> str:
    """A tensor's name as text."""
    name = tensor.name
    return name.decode("utf-8") if isinstance(name, bytes) else str(name)


def tensor_names(model_bytes: bytes) -> list[str]:
    """Names of the first subgraph's tensors, in index order."""
    _, model = read_model(model_bytes)
    return [tensor_name(t) for t in model.subgraphs[0].tensors]


def cut(model_bytes: bytes, name: str) -> bytes:
    """A new model whose only output is the tensor ``name`` reshaped to ``[1, D]``."""
    schema, model = read_model(model_bytes)
    if len(model.subgraphs) != 1:
        raise CutError(f"expected one subgraph, found {len(model.subgraphs)}")
    graph = model.subgraphs[0]
    target = _find_tensor(graph, name)
    graph.operators = _ops_feeding(graph, target)
    output = _append_reshape(schema, model, graph, target)
    graph.outputs = np.array([output], dtype=np.int32)
    model.signatureDefs = []  # they name the old outputs
    _prune(model, graph)
    return pack(model, len(model_bytes))


def _find_tensor(graph: Any, name: str) -> int:
    for index, tensor in enumerate(graph.tensors):
        if tensor_name(tensor) == name:
            return index
    raise CutError(f"no tensor named {name!r} in the model")


def _ops_feeding(graph: Any, target: int) -> list[Any]:
    """The operators the target depends on, in their original order."""
    needed, keep = {target}, []
    for op in reversed(graph.operators or []):
        if any(int(o) in needed for o in op.outputs):
            keep.append(op)
            needed.update(int(i) for i in op.inputs if i >= 0)
    if target not in {int(i) for i in graph.inputs} and not keep:
        raise CutError(f"tensor {tensor_name(graph.tensors[target])!r} is not computed by any operator")
    return keep[::-1]


def _append_reshape(schema: ModuleType, model: Any, graph: Any, target: int) -> int:
    """Add ``RESHAPE(target) -> [1, D]`` and return the new output's index.

    The new output takes the target's name, so the cut model's output is the
    tensor the user asked for; the 4-D original is renamed ``<name>/unreshaped``.
    """
    source = graph.tensors[target]
    dim = int(np.prod(source.shape))
    shape_buffer = _add_buffer(schema, model, np.array([1, dim], dtype="<i4").tobytes())
    shape_index = _add_tensor(schema, graph, "feature_shape", [2], schema.TensorType.INT32, shape_buffer)
    out_index = _add_tensor(schema, graph, tensor_name(source), [1, dim], source.type, _add_buffer(schema, model, b""))
    graph.tensors[out_index].quantization = source.quantization
    source.name = (tensor_name(source) + "/unreshaped").encode()
    op = schema.OperatorT()
    op.opcodeIndex = _opcode_index(schema, model, RESHAPE)
    op.inputs = np.array([target, shape_index], dtype=np.int32)
    op.outputs = np.array([out_index], dtype=np.int32)
    op.builtinOptionsType = schema.BuiltinOptions.ReshapeOptions
    op.builtinOptions = schema.ReshapeOptionsT()
    op.builtinOptions.newShape = [1, dim]
    graph.operators.append(op)
    return out_index


def _add_buffer(schema: ModuleType, model: Any, data: bytes) -> int:
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, dtype=np.uint8) if data else None
    model.buffers.append(buffer)
    return len(model.buffers) - 1


def _add_tensor(schema: ModuleType, graph: Any, name: str, shape: list[int], dtype: int, buffer: int) -> int:
    tensor = schema.TensorT()
    tensor.name = name.encode()
    tensor.shape = np.array(shape, dtype=np.int32)
    tensor.type = dtype
    tensor.buffer = buffer
    graph.tensors.append(tensor)
    return len(graph.tensors) - 1


def _opcode_index(schema: ModuleType, model: Any, builtin: int) -> int:
    for index, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            return index
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = builtin
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _prune(model: Any, graph: Any) -> None:
    """Drop tensors, buffers and opcodes nothing refers to; renumber the rest."""
    used = sorted({int(i) for op in graph.operators for i in list(op.inputs) + list(op.outputs) if i >= 0}
                  | {int(i) for i in graph.inputs} | {int(i) for i in graph.outputs})
    tensor_map = {old: new for new, old in enumerate(used)}
    graph.tensors = [graph.tensors[i] for i in used]
    remap = np.vectorize(lambda i: tensor_map.get(int(i), -1) if i >= 0 else -1, otypes=[np.int32])
    for op in graph.operators:
        op.inputs, op.outputs = remap(np.asarray(op.inputs)), remap(np.asarray(op.outputs))
    graph.inputs, graph.outputs = remap(np.asarray(graph.inputs)), remap(np.asarray(graph.outputs))
    # Buffer 0 is the schema's empty sentinel; metadata may point at buffers too.
    kept = sorted({0} | {t.buffer for t in graph.tensors} | {m.buffer for m in model.metadata or []})
    buffer_map = {old: new for new, old in enumerate(kept)}
    model.buffers = [model.buffers[i] for i in kept]
    for tensor in graph.tensors:
        tensor.buffer = buffer_map[tensor.buffer]
    for meta in model.metadata or []:
        meta.buffer = buffer_map[meta.buffer]
    codes = sorted({op.opcodeIndex for op in graph.operators})
    code_map = {old: new for new, old in enumerate(codes)}
    model.operatorCodes = [model.operatorCodes[i] for i in codes]
    for op in graph.operators:
        op.opcodeIndex = code_map[op.opcodeIndex]
