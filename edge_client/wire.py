"""The compact wire format for feature matrices, shared by phone and server.

A matrix travels as ``{"dtype", "shape", "data"}`` with ``data`` the base64 of
its little-endian bytes. ``float16`` is exact enough for cosine ranking;
``uint8`` halves that again for non-negative features (MobileNet's AvgPool
is a mean of ReLU6 outputs) with one ``scale`` per matrix: ``x = q * scale``.
``int8`` is for signed codes (projected features), with one scale per row
(a list) so every vector keeps its full 8-bit resolution.
"""
from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np

DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "uint8": np.dtype("u1"), "int8": np.dtype("i1")}
MAX_ELEMENTS = 1 << 24  # a bound on what one decoded matrix may allocate


class WireError(ValueError):
    """An encoded matrix is malformed; the message says which part."""


def encode(matrix: np.ndarray, dtype: str = "float16") -> dict[str, Any]:
    """Encode a float matrix (any shape) for JSON."""
    matrix = np.asarray(matrix, dtype=np.float32)
    out: dict[str, Any] = {"dtype": dtype, "shape": list(matrix.shape)}
    if dtype == "uint8":
        if matrix.size and float(matrix.min()) < 0:
            raise WireError("uint8 encoding needs non-negative values")
        peak = float(matrix.max()) if matrix.size else 0.0
        scale = peak / 255.0 if peak > 0 else 1.0
        out["scale"] = scale
        raw = np.clip(np.rint(matrix / scale), 0, 255).astype(np.uint8)
    elif dtype == "int8":
        rows = matrix.reshape(-1, matrix.shape[-1]) if matrix.ndim else matrix.reshape(1, 1)
        peaks = np.abs(rows).max(axis=1) if rows.size else np.zeros(len(rows), np.float32)
        scales = np.where(peaks > 0, peaks / 127.0, 1.0).astype(np.float32)
        out["scale"] = [float(s) for s in scales]
        raw = np.clip(np.rint(rows / scales[:, None]), -127, 127).astype(np.int8)
    elif dtype in DTYPES:
        raw = matrix.astype(DTYPES[dtype])
    else:
        raise WireError(f"unknown dtype {dtype!r}")
    out["data"] = base64.b64encode(raw.tobytes()).decode("ascii")
    return out


def decode(obj: Any, expect_dim: int | None = None) -> np.ndarray:
    """Decode an encoded matrix to float32, checking every field; ``WireError`` otherwise.

    With ``expect_dim`` the last axis must have that length.
    """
    if not isinstance(obj, dict):
        raise WireError("an encoded matrix must be an object with dtype, shape and data")
    name = obj.get("dtype")
    dtype = DTYPES.get(name) if isinstance(name, str) else None  # a list or dict is unhashable
    if dtype is None:
        raise WireError(f"dtype must be one of {sorted(DTYPES)}")
    shape = _shape(obj.get("shape"))
    data = obj.get("data")
    if not isinstance(data, str):
        raise WireError("data must be a base64 string")
    try:
        raw = base64.b64decode(data.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise WireError(f"data is not valid base64: {exc}") from None
    if len(raw) != math.prod(shape) * dtype.itemsize:
        raise WireError(f"data holds {len(raw)} bytes, shape {shape} of {dtype.name} needs "
                        f"{math.prod(shape) * dtype.itemsize}")
    if expect_dim is not None and (not shape or shape[-1] != expect_dim):
        raise WireError(f"expected vectors of dimension {expect_dim}, got shape {shape}")
    matrix = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(np.float32)
    if dtype == np.uint8:
        matrix *= _scale(obj.get("scale"))
    elif dtype == np.int8:
        matrix *= _row_scales(obj.get("scale"), shape)
    if not np.isfinite(matrix).all():
        raise WireError("values must be finite (no NaN or infinity)")
    return matrix


def _shape(shape: Any) -> list[int]:
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise WireError("shape must be a list of one or two non-negative integers")
    if math.prod(shape) > MAX_ELEMENTS:  # Python ints: numpy's int64 product can wrap to 0
        raise WireError(f"shape {shape} is too large")
    return shape


def _row_scales(scales: Any, shape: list[int]) -> np.ndarray:
    rows = shape[0] if len(shape) == 2 else 1
    if not isinstance(scales, list) or len(scales) != rows:
        raise WireError(f"an int8 matrix needs a list of {rows} scale(s), one per row")
    column = np.array([_scale(s) for s in scales], dtype=np.float32)
    return column[:, None] if len(shape) == 2 else column


def _scale(scale: Any) -> np.float32:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale) or scale <= 0:
        raise WireError("a uint8 matrix needs a positive, finite scale")
    return np.float32(scale)
