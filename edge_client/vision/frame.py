"""A camera frame as a camera API hands it over, turned into the model's input without a JPEG.

A 12-megapixel JPEG costs several bare invokes just to entropy-decode (see
docs/benchmarks.md); a preview-sized frame straight from the camera costs a resize.
An app hands in the raw buffer of a small frame: CameraX ``ImageAnalysis`` at
640x480 (``OUTPUT_IMAGE_FORMAT_RGBA_8888``, or YUV as NV21), or picamera2's
arrays on a Raspberry Pi. The frame is squashed to the input size like a photo
(:mod:`edge_client.vision.photo`), then turned upright by ``rotation``.

YUV is read as full-range BT.601 (JFIF), what Android's camera YUV and JPEG use.
Chroma is resized at its own quarter resolution: only the luma plane is ever
touched at full size, which is what keeps a YUV frame the cheapest input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
from PIL import Image

from ..errors import PhotoError

Buffer = Union[bytes, bytearray, memoryview, np.ndarray]

#: Packed formats: bytes per pixel and Pillow's raw mode that unpacks them to RGB in one pass.
PACKED = {"rgb": (3, "RGB"), "rgba": (4, "RGBX"), "bgr": (3, "BGR"), "bgrx": (4, "BGRX")}
#: Planar YUV 4:2:0 formats: NV21 (Android's camera default), NV12, I420 (picamera2's YUV420).
YUV = ("nv21", "nv12", "i420")
FORMATS = tuple(PACKED) + YUV
ROTATIONS = (0, 90, 180, 270)
#: An image at least twice the input size both ways is first shrunk by whole factors with a box
#: filter (``Image.reduce``), then resized: about 40% less time than one antialiased resize at
#: 640x480, and features within the model's own rounding noise of the one-step resize (measured:
#: cosine 0.991-0.998 on real photos; a +-1 change of every pixel alone gives 0.995). A 12 MP JPEG
#: after draft decoding (500x375) is not twice the input both ways and keeps the one-step resize.
REDUCING_GAP = 1.0


def squash(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` resized to ``size`` (width, height), the whole of it, aspect not kept: the one
    fast resize of every input, so a frame and a file of the same pixels give the same feature."""
    if image.size == size:
        return image
    halvable = image.width >= 2 * size[0] and image.height >= 2 * size[1]
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP if halvable else None)


@dataclass(frozen=True)
class Frame:
    """One uncompressed camera frame (a :class:`~edge_client.errors.PhotoError` when malformed).

    ``data`` holds ``height`` rows of ``row_stride`` bytes (0 means tightly packed);
    Android's buffers may end right after the last row's pixels, so the last row
    may be short. For YUV the chroma plane(s) follow the luma rows, at the same
    stride (NV21/NV12) or half of it (I420). ``rotation`` is the clockwise turn, in
    degrees, that makes the frame upright (CameraX's ``imageInfo.rotationDegrees``).
    """

    data: Buffer
    width: int
    height: int
    pixel_format: str = "rgb"
    row_stride: int = 0
    rotation: int = 0

    def __post_init__(self) -> None:
        """A malformed frame is refused when made, before any model or interpreter is needed."""
        self._check()

    def to_rgb(self, size: tuple[int, int]) -> np.ndarray:
        """The frame squashed to ``size`` (width, height) and turned upright, as HxWx3 uint8."""
        turned = self.rotation in (90, 270)
        target = (size[1], size[0]) if turned else size
        image = _yuv_image(self, target) if self.pixel_format in YUV else _packed_image(self)
        pixels = np.asarray(squash(image, target).convert("RGB"), dtype=np.uint8)
        if self.rotation:
            pixels = np.ascontiguousarray(np.rot90(pixels, k=-self.rotation // 90))
        return pixels

    def _check(self) -> None:
        if self.pixel_format not in FORMATS:
            raise PhotoError(f"unknown frame format {self.pixel_format!r}; one of {', '.join(FORMATS)}")
        if self.rotation not in ROTATIONS:
            raise PhotoError(f"frame rotation must be one of {ROTATIONS}, got {self.rotation}")
        if self.width < 1 or self.height < 1:
            raise PhotoError(f"a frame of {self.width}x{self.height} has no pixels")
        if self.pixel_format in YUV and (self.width % 2 or self.height % 2):
            raise PhotoError(f"a {self.pixel_format} frame needs an even width and height, "
                             f"got {self.width}x{self.height}")
        if self.pixel_format == "i420" and self.row_stride % 2:
            raise PhotoError(f"an i420 frame's chroma rows are half the stride: {self.row_stride} is odd")
        row = self.width * PACKED[self.pixel_format][0] if self.pixel_format in PACKED else self.width
        if self.row_stride and self.row_stride < row:
            raise PhotoError(f"row_stride {self.row_stride} is shorter than a row of {row} bytes")
        need = self.stride() * (self.rows() - 1) + row
        if len(self.buffer()) < need:
            raise PhotoError(f"a {self.width}x{self.height} {self.pixel_format} frame needs at least "
                             f"{need} bytes, got {len(self.buffer())}")

    def stride(self) -> int:
        """Bytes from one row's start to the next's."""
        if self.row_stride:
            return self.row_stride
        return self.width * PACKED[self.pixel_format][0] if self.pixel_format in PACKED else self.width

    def rows(self) -> int:
        """Rows of ``stride`` bytes the buffer holds: the luma's plus the chroma's for YUV."""
        return self.height * 3 // 2 if self.pixel_format in YUV else self.height

    def buffer(self) -> memoryview:
        """The buffer as flat bytes; copied only when it is a non-contiguous array."""
        return memoryview(self.data).cast("B") if not isinstance(self.data, np.ndarray) \
            else memoryview(np.ascontiguousarray(self.data)).cast("B")


def _packed_image(frame: Frame) -> Image.Image:
    """Unpacked to RGB by Pillow's raw decoder, stride and channel order included, in one pass."""
    data = _padded(frame)
    return Image.frombuffer("RGB", (frame.width, frame.height), data, "raw",
                            PACKED[frame.pixel_format][1], frame.stride(), 1)


def _padded(frame: Frame) -> bytes | memoryview:
    """The buffer, with the last row's missing stride padding added when the buffer ends short."""
    data = frame.buffer()
    full = frame.stride() * frame.rows()
    return data if len(data) >= full else bytes(data) + bytes(full - len(data))


def _yuv_image(frame: Frame, size: tuple[int, int]) -> Image.Image:
    """Each plane resized at its own resolution, then merged as YCbCr."""
    rows = np.frombuffer(_padded(frame), np.uint8, frame.stride() * frame.rows()).reshape(frame.rows(), -1)
    w, h = frame.width, frame.height
    luma = rows[:h, :w]
    chroma = rows[h:]
    if frame.pixel_format == "i420":  # U rows then V rows, each half-width at half the stride
        half = chroma.reshape(-1, frame.stride() // 2)
        u, v = half[: h // 2, : w // 2], half[h // 2: h, : w // 2]
    else:
        pairs = chroma[:, :w].reshape(h // 2, w // 2, 2)
        v, u = (pairs[..., 0], pairs[..., 1]) if frame.pixel_format == "nv21" else (pairs[..., 1], pairs[..., 0])
    planes = [squash(Image.fromarray(np.ascontiguousarray(p)), size) for p in (luma, u, v)]
    return Image.merge("YCbCr", planes)
