"""One frame from a Raspberry Pi camera (picamera2, which comes with the OS)."""
from __future__ import annotations

from ..errors import EnfPireError
from .frame import Frame

#: The model sees 224x224: a 640x480 frame is plenty, and the ISP scales the whole sensor
#: field of view down to it, so neither a full-size still nor a JPEG is ever made.
FRAME_SIZE = (640, 480)


class CameraError(EnfPireError):
    """No camera library, or the camera did not deliver a frame."""


def capture_frame(size: tuple[int, int] = FRAME_SIZE) -> Frame:
    """Capture one frame as an uncompressed :class:`Frame`; imports picamera2 only when called.

    picamera2's "RGB888" array holds each pixel as B, G, R in memory (libcamera's naming),
    hence ``pixel_format="bgr"``."""
    try:
        from picamera2 import Picamera2  # type: ignore[import-not-found]
    except ImportError:
        raise CameraError("--camera needs picamera2 (Raspberry Pi OS: sudo apt install python3-picamera2)") from None
    camera = Picamera2()
    try:
        camera.configure(camera.create_still_configuration(main={"size": size, "format": "RGB888"}))
        camera.start()
        array = camera.capture_array("main")
    except Exception as exc:  # noqa: BLE001 (driver errors have no common base)
        raise CameraError(f"the camera did not deliver a frame: {exc}") from exc
    finally:
        camera.close()
    height, width = array.shape[:2]
    return Frame(array, width, height, "bgr")
