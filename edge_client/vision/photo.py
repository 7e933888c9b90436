"""Turning whatever a device hands us into the model's RGB input.

Policy: apply the EXIF orientation, convert to RGB, and resize the *whole*
photo to the model's input size (no crop, aspect not kept). Landmarks often
fill the frame edge to edge and the gallery is built with the same policy,
so squashing loses less than cropping. A photo already at the input size is
not resampled at all.

A camera frame (:class:`~edge_client.vision.frame.Frame`, or an HxWx3 RGB array) skips
decoding altogether: the cheapest input when the app controls the capture.

Speed: a JPEG is decoded at a reduced scale (libjpeg's DCT scaling through
``Image.draft``) to no less than the input size, then shrunk by a whole factor
with a box filter and resized with an antialiased bilinear one
(:func:`edge_client.vision.frame.squash`), so a 12-megapixel photo never exists at
full size.
"""
from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import PhotoError
from .frame import Frame, squash

Photo = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray, Frame]

# EXIF orientations 5-8 swap width and height.
_TRANSPOSING = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112


def describe(photo: Photo) -> str:
    """A short name for error messages: the path, or the kind of object."""
    if isinstance(photo, (str, os.PathLike)):
        return os.fspath(photo)
    if isinstance(photo, (bytes, bytearray, memoryview)):
        return f"<{len(photo)} bytes>"
    return f"<{type(photo).__name__}>"


def load_rgb(photo: Photo, size: tuple[int, int], max_pixels: int, fast: bool = True) -> np.ndarray:
    """Decode ``photo`` to a ``size`` (width, height) HxWx3 uint8 array.

    ``fast=False`` decodes at full size and resizes with Lanczos: the careful
    reference the fast path is measured against.
    """
    if isinstance(photo, Frame):
        return photo.to_rgb(size)
    if isinstance(photo, np.ndarray):
        return _from_array(photo, size)
    image = photo if isinstance(photo, Image.Image) else _open(photo)
    try:
        _check_pixels(image, max_pixels, photo)
        if fast and image.format == "JPEG":
            image.draft("RGB", _draft_size(image, size))
        image = ImageOps.exif_transpose(image) or image
        image = image.convert("RGB")
        if fast:
            image = squash(image, size)
        elif image.size != size:
            image = image.resize(size, Image.Resampling.LANCZOS)
        return np.asarray(image, dtype=np.uint8)
    except PhotoError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise PhotoError(f"cannot decode photo {describe(photo)}: {exc}") from exc


def _open(photo: Photo) -> Image.Image:
    try:
        if isinstance(photo, (bytes, bytearray, memoryview)):
            if not len(photo):
                raise PhotoError("cannot decode photo <0 bytes>: it is empty")
            return Image.open(io.BytesIO(bytes(photo)))
        return Image.open(os.fspath(photo))
    except FileNotFoundError as exc:
        raise PhotoError(f"photo {describe(photo)} does not exist") from exc
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise PhotoError(f"cannot decode photo {describe(photo)}: {exc}") from exc


def _check_pixels(image: Image.Image, max_pixels: int, photo: Photo) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise PhotoError(f"photo {describe(photo)} has no pixels")
    if width * height > max_pixels:
        raise PhotoError(
            f"photo {describe(photo)} has {width}x{height} pixels, more than the "
            f"limit of {max_pixels} (max_pixels)"
        )


def _draft_size(image: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    """The decode size, in the file's own orientation, that still covers ``size``."""
    orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    return (size[1], size[0]) if orientation in _TRANSPOSING else size


def _from_array(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise PhotoError(f"an array photo must be HxWx3 uint8, got {array.dtype} {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise PhotoError("an array photo has no pixels")
    if (array.shape[1], array.shape[0]) == size:
        return np.ascontiguousarray(array)
    return Frame(array, array.shape[1], array.shape[0], "rgb").to_rgb(size)
