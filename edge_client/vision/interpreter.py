"""Pure helpers over a TFLite interpreter: which runtime, what the model
expects, and explicit, overflow-safe (de)quantization.

Three runtimes share the same ``Interpreter`` API; the first that imports
wins: ai-edge-litert (maintained, fast quantized kernels), tflite-runtime
(older Raspberry Pi images), then full TensorFlow.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from ..errors import InterpreterNotFoundError, ModelError

log = logging.getLogger(__name__)
_STDERR_LOCK = threading.Lock()

#: (name reported to users, module holding ``Interpreter``), in order of preference.
RUNTIMES = (
    ("ai_edge_litert", "ai_edge_litert.interpreter"),
    ("tflite_runtime", "tflite_runtime.interpreter"),
    ("tensorflow", "tensorflow.lite"),
)


def find_runtime() -> tuple[str, Any]:
    """Return ``(name, Interpreter class)`` of the first runtime that imports."""
    for name, module in RUNTIMES:
        try:
            return name, importlib.import_module(module).Interpreter
        except ImportError:
            continue
    raise InterpreterNotFoundError(
        "no TFLite interpreter is installed: pip install 'enfpire[litert]' "
        "(or 'enfpire[tflite]' on older Raspberry Pi OS images)"
    )


def make_interpreter(model_path: str, num_threads: int = 0, reference: bool = False,
                     **kwargs: Any) -> tuple[Any, str]:
    """Build and allocate an interpreter for ``model_path``; returns it and the runtime name.

    ``num_threads`` 0 means one thread per CPU. ``reference`` selects TFLite's reference
    kernels: integer arithmetic fixed by the spec, so every CPU gives the same bits, where the
    fast kernels (XNNPACK, ruy) round differently on x86-64 and aarch64 (features ~0.997 apart
    in cosine, about as far as either is from the reference).
    """
    name, interpreter_cls = find_runtime()
    threads = num_threads or os.cpu_count() or 1
    if reference:
        kwargs["experimental_op_resolver_type"] = _resolver_types(interpreter_cls).BUILTIN_REF
    try:
        with native_stderr_to_log():
            interpreter = interpreter_cls(model_path=str(model_path), num_threads=threads, **kwargs)
            interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"{model_path} is not a usable TFLite model: {exc}") from exc
    return interpreter, name


def _resolver_types(interpreter_cls: Any) -> Any:
    """The runtime's ``OpResolverType`` enum, beside its ``Interpreter``."""
    module = sys.modules[interpreter_cls.__module__]
    types = getattr(module, "OpResolverType", None)
    if types is None:
        raise InterpreterNotFoundError(f"{module.__name__} cannot select reference kernels (no OpResolverType)")
    return types


@contextmanager
def native_stderr_to_log() -> Iterator[None]:
    """Route what native code writes to file descriptor 2 meanwhile to this module's debug log.

    The TFLite runtime prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." from C++
    on every interpreter it builds, past Python's ``sys.stderr``; a command line should print
    only its answer. Held under a lock: Python's own stderr output is flushed first and only
    native writes of the moment land in the log.
    """
    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no usable fd 2 (a closed or replaced stderr)
            yield
            return
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                captured.seek(0)
                for line in captured.read().decode(errors="replace").splitlines():
                    log.debug("runtime: %s", line)


def input_size(details: dict[str, Any]) -> tuple[int, int]:
    """(width, height) of an NHWC image input."""
    shape = details["shape"]
    if len(shape) != 4 or shape[3] != 3:
        raise ModelError(f"expected an NHWC RGB image input, got shape {list(shape)}")
    return int(shape[2]), int(shape[1])


def quantize_input(pixels: np.ndarray, details: dict[str, Any], mean: Any, std: Any) -> np.ndarray:
    """Map uint8 RGB ``pixels`` to the model's input tensor.

    The float model sees ``(pixel - mean) / std`` (``mean`` and ``std`` a scalar
    or one value per channel); a quantized input stores that as
    ``real / scale + zero_point``. When the two affine maps cancel (MobileNet's
    uint8 input: scale 1/128, zero point 128 with mean = std = 128) the pixels go
    in untouched, which is both exact and fastest.
    """
    dtype = details["dtype"]
    scale, zero_point = details["quantization"]
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if dtype == np.float32:
        return ((pixels.astype(np.float32) - mean) / std)[np.newaxis]
    if scale == 0:
        raise ModelError("quantized input without a scale")
    if dtype == np.uint8 and np.all(np.abs(scale * std - 1) < 1e-5) and np.all(np.abs(mean - zero_point) < 1e-5):
        return pixels[np.newaxis]
    info = np.iinfo(dtype)
    # float32 then clip: no intermediate ever wraps around the integer range.
    q = np.rint((pixels.astype(np.float32) - mean) / (std * scale) + zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)[np.newaxis]


def dequantize(values: np.ndarray, details: dict[str, Any]) -> np.ndarray:
    """Real-valued float32 copy of an output tensor (int32 arithmetic, no overflow)."""
    scale, zero_point = details["quantization"]
    if values.dtype == np.float32 or scale == 0:
        return values.astype(np.float32)
    return (values.astype(np.int32) - np.int32(zero_point)).astype(np.float32) * np.float32(scale)
