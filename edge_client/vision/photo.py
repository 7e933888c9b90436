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
import logging
import os
import threading
import warnings
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import PhotoError
from .frame import Frame, squash

log = logging.getLogger(__name__)
#: ``warnings.catch_warnings`` swaps process-wide state: photos decoded on several threads take turns.
_WARNINGS_LOCK = threading.Lock()

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
    opened = None if isinstance(photo, Image.Image) else _open(photo)
    image = photo if opened is None else opened
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
    finally:
        if opened is not None:  # the file closes now, a refused photo's too, not when collected
            opened.close()


def _open(photo: Photo) -> Image.Image:
    """The photo opened (its header read), with Pillow's ``DecompressionBombWarning`` sent to the log.

    ``max_pixels`` is the limit this library keeps (checked next); Pillow's own warning threshold
    (``Image.MAX_IMAGE_PIXELS``, ~89 megapixels) lies below the default limit, so a large photo that
    is accepted would otherwise print a library warning on the user's terminal. Pillow warns when it
    reads the header, so only the opening is watched (cheap: no pixels are decoded). The record is
    INFO: the photo is within the limit the user set, so nothing needs doing (``-v`` shows it).
    """
    try:
        if isinstance(photo, (bytes, bytearray, memoryview)):
            if not len(photo):
                raise PhotoError("cannot decode photo <0 bytes>: it is empty")
            source: object = io.BytesIO(bytes(photo))
        else:
            source = os.fspath(photo)
        with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            image = Image.open(source)  # type: ignore[arg-type]
        _pass_on(caught, photo)
        return image
    except FileNotFoundError as exc:
        raise PhotoError(f"photo {describe(photo)} does not exist") from exc
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise PhotoError(f"cannot decode photo {describe(photo)}: {exc}") from exc


def _pass_on(caught: list[warnings.WarningMessage], photo: Photo) -> None:
    """Pillow's decompression-bomb warnings to the log; any other warning (another thread's,
    caught meanwhile) back to the warnings machinery as it came."""
    for warning in caught:
        if issubclass(warning.category, Image.DecompressionBombWarning):
            log.info("photo %s: Pillow warns: %s (the limit kept is max_pixels)", describe(photo), warning.message)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno,
                                   source=warning.source)


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
