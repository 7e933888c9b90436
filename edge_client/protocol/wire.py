"""The compact wire format for feature matrices, shared by phone and server.

A matrix travels as ``{"dtype", "shape", "data"}`` with ``data`` the base64 of
its little-endian bytes. ``float16`` is exact enough for cosine ranking;
``uint8`` halves that again for non-negative features (MobileNet's AvgPool
is a mean of ReLU6 outputs) with one ``scale`` per matrix: ``x = q * scale``.
``int8`` is for signed codes (projected features), with one scale per row so
every vector keeps its full 8-bit resolution. The server sends those scales as
an exact float16 array (:func:`encode_array`, 2 bytes a row) rather than a JSON
list of decimal floats, which was a tenth of every candidate; a list is still
read (older servers, hand-written queries). ``int4`` packs two 4-bit codes a byte,
of the row's Hadamard rotation, with the same float16 scale a row (:mod:`.nibbles`): a server
with ``look_bits`` 4 sends its candidates' looks so, twice as many per byte.

Arrays that must arrive bit-exact (the public parameters, see
:mod:`edge_client.protocol.public`) travel with :func:`encode_array` in their own dtype,
integers included; their int8 codes carry their per-row scales as such an
array of float16 rather than a JSON list of floats.
"""
from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np

from ..errors import EnfPireError
from . import nibbles

DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "uint8": np.dtype("u1"), "int8": np.dtype("i1")}
#: Exact arrays (encode_array / decode_array) may also be integers of these widths.
ARRAY_DTYPES = {**DTYPES, "uint16": np.dtype("<u2"), "int16": np.dtype("<i2"), "uint32": np.dtype("<u4"),
                "int32": np.dtype("<i4")}
#: Matrices whose data packs two values a byte (nibbles): not a numpy dtype, so not in DTYPES.
PACKED = ("int4",)
MAX_ELEMENTS = 1 << 24  # a bound on what one decoded matrix may allocate
FLOAT32_MAX = float(np.finfo(np.float32).max)


class WireError(EnfPireError, ValueError):
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
        raw, scales = quantize(matrix if matrix.ndim else matrix.reshape(1, 1))
        out["scale"] = encode_array(scales)
    elif dtype == "int4":
        raw, scales = quantize4(matrix.reshape(-1, matrix.shape[-1]) if matrix.ndim else matrix.reshape(1, 1))
        out["scale"] = encode_array(scales)
    elif dtype in DTYPES:
        raw = matrix.astype(DTYPES[dtype])
    else:
        raise WireError(f"unknown dtype {dtype!r}")
    out["data"] = base64.b64encode(raw.tobytes()).decode("ascii")
    return out


def encode_groups(matrix: np.ndarray, bounds: np.ndarray, dtype: str = "float16") -> list[dict[str, Any]]:
    """``[encode(matrix[a:b], dtype) for a, b in consecutive bounds]``, equal to the dict, with
    the rows converted in one pass: a server start encodes 100,000 spots' looks this way
    (one :func:`encode` per spot took ~10 s there, this well under a second)."""
    matrix = np.asarray(matrix, dtype=np.float32)
    if dtype not in ("int8", "int4", "float16", "float32") or matrix.ndim != 2:
        return [encode(matrix[a:b], dtype) for a, b in zip(bounds[:-1], bounds[1:])]
    coder = {"int8": quantize, "int4": quantize4}.get(dtype)
    raw, scales = coder(matrix) if coder else (matrix.astype(DTYPES[dtype]), None)
    out = []
    for a, b in zip(np.asarray(bounds[:-1]).tolist(), np.asarray(bounds[1:]).tolist()):
        group: dict[str, Any] = {"dtype": dtype, "shape": [b - a, matrix.shape[1]]}
        if scales is not None:
            group["scale"] = encode_array(scales[a:b])
        group["data"] = base64.b64encode(raw[a:b].tobytes()).decode("ascii")
        out.append(group)
    return out


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """Encode ``array`` (one or two axes) exactly, in its own dtype (one of :data:`ARRAY_DTYPES`)."""
    array = np.asarray(array)
    name = next((n for n, d in ARRAY_DTYPES.items() if d == array.dtype.newbyteorder("<")), None)
    if name is None:
        raise WireError(f"dtype {array.dtype} does not travel exactly")
    raw = np.ascontiguousarray(array, dtype=ARRAY_DTYPES[name])
    return {"dtype": name, "shape": list(array.shape), "data": base64.b64encode(raw.tobytes()).decode("ascii")}


def decode_array(obj: Any, dtype: str | tuple[str, ...] | None = None) -> np.ndarray:
    """Decode an :func:`encode_array` object to its exact values (no scale, no finiteness check).

    ``dtype`` restricts what is accepted (a name or several).
    """
    if not isinstance(obj, dict):
        raise WireError("an encoded array must be an object with dtype, shape and data")
    name = obj.get("dtype")
    allowed = (dtype,) if isinstance(dtype, str) else dtype
    if not isinstance(name, str) or name not in ARRAY_DTYPES or (allowed and name not in allowed):
        raise WireError(f"dtype must be one of {sorted(allowed or ARRAY_DTYPES)}")
    return _raw(obj, ARRAY_DTYPES[name])


def _raw(obj: dict[str, Any], dtype: np.dtype) -> np.ndarray:
    shape = _shape(obj.get("shape"))
    return np.frombuffer(_data(obj, math.prod(shape) * dtype.itemsize, f"shape {shape} of {dtype.name}"),
                         dtype=dtype).reshape(shape)


def _data(obj: dict[str, Any], size: int, what: str) -> bytes:
    """The decoded base64 ``data`` of ``obj``, which must hold ``size`` bytes (``what`` needs them)."""
    data = obj.get("data")
    if not isinstance(data, str):
        raise WireError("data must be a base64 string")
    try:
        raw = base64.b64decode(data.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise WireError(f"data is not valid base64: {exc}") from None
    if len(raw) != size:
        raise WireError(f"data holds {len(raw)} bytes, {what} needs {size}")
    return raw


def decode(obj: Any, expect_dim: int | None = None, max_scale: float | None = None) -> np.ndarray:
    """Decode an encoded matrix to float32, checking every field; ``WireError`` otherwise.

    With ``expect_dim`` the last axis must have that length; with ``max_scale`` no scale may exceed it.
    """
    if not isinstance(obj, dict):
        raise WireError("an encoded matrix must be an object with dtype, shape and data")
    name = obj.get("dtype")
    dtype = DTYPES.get(name) if isinstance(name, str) else None  # a list or dict is unhashable
    if dtype is None and name not in PACKED:
        raise WireError(f"dtype must be one of {sorted([*DTYPES, *PACKED])}")
    matrix = _int4(obj, max_scale) if dtype is None else _raw(obj, dtype).astype(np.float32)
    shape = list(matrix.shape)
    if expect_dim is not None and (not shape or shape[-1] != expect_dim):
        raise WireError(f"expected vectors of dimension {expect_dim}, got shape {shape}")
    if dtype == np.uint8:
        matrix *= _scale(obj.get("scale"), max_scale)
    elif dtype == np.int8:
        matrix *= _row_scales(obj.get("scale"), shape, max_scale)
    if not np.isfinite(matrix).all():
        raise WireError("values must be finite (no NaN or infinity)")
    return matrix


def _int4(obj: dict[str, Any], max_scale: float | None) -> np.ndarray:
    """The float32 rows of an ``int4`` matrix (:mod:`.nibbles`), its scales checked as int8's are."""
    shape = _shape(obj.get("shape"))
    dim, rows = shape[-1], math.prod(shape[:-1])
    if not nibbles.fits(dim):
        raise WireError(f"int4 rows need a power-of-two length (2 at least), got shape {shape}")
    packed = np.frombuffer(_data(obj, rows * dim // 2, f"shape {shape} of int4"), np.uint8).reshape(rows, dim // 2)
    scales = _row_scales(obj.get("scale"), [rows, dim], max_scale)[:, 0]
    try:
        return nibbles.dequantize(packed, scales).reshape(shape)
    except ValueError as exc:
        raise WireError(str(exc)) from None


def quantize4(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(packed 4-bit codes [R, D/2], float16 scales [R]) of float rows [R, D] (see :mod:`.nibbles`)."""
    matrix = np.asarray(matrix, np.float32)
    if matrix.ndim != 2 or not nibbles.fits(matrix.shape[1]):
        raise WireError(f"int4 encodes rows of a power-of-two length, not shape {list(matrix.shape)}")
    try:
        return nibbles.quantize(matrix)
    except ValueError as exc:
        raise WireError(str(exc)) from None


def encode_codes(codes: np.ndarray, scales: np.ndarray) -> dict[str, Any]:
    """int8 rows with their float16 per-row scales, each an exact array (see :func:`quantize`)."""
    return {**encode_array(np.asarray(codes, np.int8)), "scale": encode_array(np.asarray(scales, np.float16))}


def quantize(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes [R, D], float16 scales [R]) of float rows: ``row ~ codes * scale``.

    The scale is rounded to float16 *before* the codes are taken, so the phone
    decodes exactly what the server quantized against.
    """
    matrix = np.asarray(matrix, np.float32)
    rows = matrix.reshape(-1, matrix.shape[-1])
    peaks = np.abs(rows).max(axis=1) if rows.size else np.zeros(len(rows), np.float32)
    with np.errstate(over="ignore"):
        scales = np.where(peaks > 0, peaks / 127.0, 1.0).astype(np.float16)
    if not (np.isfinite(scales) & (scales > 0)).all():  # only rows far from unit length get here
        raise WireError("int8 rows need peaks between 1e-5 and 8e6 (their scale is a float16)")
    codes = np.clip(np.rint(rows / scales.astype(np.float32)[:, None]), -127, 127).astype(np.int8)
    return codes, scales


def integer(value: Any) -> int | None:
    """``value`` as an int when JSON Schema calls it an integer (``3`` or ``3.0``, never ``true``), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _shape(shape: Any) -> list[int]:
    sizes = [integer(n) for n in shape] if isinstance(shape, list) and len(shape) <= 2 else []
    if not 1 <= len(sizes) <= 2 or not all(n is not None and n >= 0 for n in sizes):
        raise WireError("shape must be a list of one or two non-negative integers")
    shape = sizes
    # Python ints: numpy's int64 product can wrap to 0. Each axis too: numpy refuses a giant axis
    # even beside a zero one ([0, 2**62] has no elements but is "too big"; the fuzzer found it).
    if math.prod(shape) > MAX_ELEMENTS or max(shape) > MAX_ELEMENTS:
        raise WireError(f"shape {shape} is too large")
    return shape


def _row_scales(scales: Any, shape: list[int], max_scale: float | None = None) -> np.ndarray:
    rows = shape[0] if len(shape) == 2 else 1
    if isinstance(scales, dict):  # exact float16 scales (encode_codes)
        scales = decode_array(scales, "float16").astype(np.float64).tolist()
    if not isinstance(scales, list) or len(scales) != rows:
        raise WireError(f"an int8 or int4 matrix needs a list of {rows} scale(s), one per row")
    column = np.array([_scale(s, max_scale) for s in scales], dtype=np.float32)
    return column[:, None] if len(shape) == 2 else column


def _scale(scale: Any, max_scale: float | None = None) -> np.float32:
    """A positive, finite scale (at most ``max_scale``); a JSON integer too, however large."""
    try:
        value = float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else math.nan
    except OverflowError:  # an integer beyond any float
        value = math.inf
    if not math.isfinite(value) or value <= 0 or value > FLOAT32_MAX:
        raise WireError("a scale must be a positive, finite number (a float32)")
    if max_scale is not None and value > max_scale:
        raise WireError(f"a scale must be at most {max_scale:g}")
    return np.float32(value)
