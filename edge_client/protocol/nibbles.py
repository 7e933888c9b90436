"""4-bit codes of codec-space rows (the wire's ``int4``): twice the looks a candidate carries per byte.

A row ``x`` of ``D`` values (``D`` a power of two) is rotated by the orthonormal Hadamard matrix
``H / sqrt(D)`` (Sylvester's, ``H`` of +-1 entries, ``H @ H = D * I``), and the rotated row is
coded as symmetric integers -7..7 with one float16 scale a row, packed two a byte, low nibble
first: ``x = (codes @ H) * scale / sqrt(D)``.

The rotation is what makes 4 bits enough. In the gallery's uncentred PCA basis a unit row holds
most of its length in the first component (the gallery's mean direction), so a per-row scale set
by that peak rounded the small components, where spots differ, to 0: plain 4-bit codes lost 0.07
of the phone's rerank ceiling on wa-landmarks' tuning split. Rotated, every component carries
about ``1 / sqrt(D)`` of the row and none dominates (docs/privacy.md#4-bit-looks). A rotation
keeps cosines, so the phone decodes back into the codec space and compares as with int8 codes.

Decoding is exact: the codes times ``H`` (the fast transform, ``D log D`` additions) are integers
(at most ``7 D``), exact in int32 and in float32, then one float32 product by ``scale * (1 / sqrt(D))``;
the server quantises against exactly what the phone decodes (:func:`dequantize`).
"""
from __future__ import annotations

import numpy as np

#: The codes' range: symmetric, so nibble 0b1000 (-8) is never written and never read.
LEVELS = 7


def fits(dim: int) -> bool:
    """Whether rows of ``dim`` values can travel as 4-bit codes (a power of two, 2 at least)."""
    return dim >= 2 and dim & (dim - 1) == 0


def hadamard(rows: np.ndarray) -> np.ndarray:
    """``rows @ H`` for Sylvester's +-1 Hadamard matrix ``H`` of the rows' (power-of-two) length,
    ``H_2n = [[H_n, H_n], [H_n, -H_n]]``, by the fast transform: ``log2 D`` passes of sums and
    differences, in the rows' own dtype (exact for integers), never the ``D x D`` matrix."""
    out = np.array(rows, copy=True)
    count, dim = out.shape
    half = 1
    while half < dim:
        pairs = out.reshape(count, dim // (2 * half), 2, half)
        first, second = pairs[:, :, 0, :].copy(), pairs[:, :, 1, :]
        pairs[:, :, 0, :] += second
        pairs[:, :, 1, :] = first - second
        half *= 2
    return out


def quantize(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 [R, D/2], float16 scales [R]) of float ``rows`` [R, D]: what :func:`dequantize`
    turns back into the nearest such rows. The scale is rounded to float16 before the codes are
    taken, as for int8 (:func:`edge_client.protocol.wire.quantize`). ValueError for a scale
    float16 cannot hold (a row far from unit length)."""
    rows = np.asarray(rows, np.float64)
    dim = rows.shape[1]
    rotated = hadamard(rows) / np.sqrt(dim)
    peaks = np.abs(rotated).max(axis=1) if rows.size else np.zeros(len(rows))
    with np.errstate(over="ignore"):
        scales = np.where(peaks > 0, peaks / LEVELS, 1.0).astype(np.float16)
    if not (np.isfinite(scales) & (scales > 0)).all():
        raise ValueError("int4 rows need peaks between 1e-4 and 4e5 (their scale is a float16)")
    codes = np.clip(np.rint(rotated / scales.astype(np.float64)[:, None]), -LEVELS, LEVELS).astype(np.int8)
    return pack(codes), scales


def dequantize(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 rows [R, D] of ``packed`` codes [R, D/2] and float32 ``scales`` [R] (see the module
    docstring); ValueError for a nibble outside -7..7."""
    codes = unpack(packed)
    dim = codes.shape[1]
    factor = np.asarray(scales, np.float32) * np.float32(1.0 / np.sqrt(dim))
    return hadamard(codes.astype(np.int32)).astype(np.float32) * factor[:, None]


def pack(codes: np.ndarray) -> np.ndarray:
    """int8 codes [R, D] (-8..7, D even) as uint8 [R, D/2]: column ``2i`` in the low nibble."""
    nibbles = np.asarray(codes, np.int8).view(np.uint8) & 0x0F
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray) -> np.ndarray:
    """int8 codes [R, 2 W] of uint8 ``packed`` [R, W]; ValueError for the unused nibble -8."""
    packed = np.asarray(packed, np.uint8)
    nibbles = np.empty((packed.shape[0], 2 * packed.shape[1]), np.uint8)
    nibbles[:, 0::2], nibbles[:, 1::2] = packed & 0x0F, packed >> 4
    if (nibbles == 0x08).any():
        raise ValueError(f"4-bit codes lie in -{LEVELS}..{LEVELS}; nibble 8 (-8) is not one")
    return (nibbles.astype(np.int8) ^ 0x08) - 0x08  # sign-extend the nibble
