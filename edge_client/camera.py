"""One frame from a Raspberry Pi camera (picamera2, which comes with the OS)."""
from __future__ import annotations

import io

from .errors import EnfPireError


class CameraError(EnfPireError):
    """No camera library, or the camera did not deliver a frame."""


def capture_jpeg(size: tuple[int, int] = (1640, 1232)) -> bytes:
    """Capture one still as JPEG bytes; imports picamera2 only when called."""
    try:
        from picamera2 import Picamera2  # type: ignore[import-not-found]
    except ImportError:
        raise CameraError("--camera needs picamera2 (Raspberry Pi OS: sudo apt install python3-picamera2)") from None
    camera = Picamera2()
    try:
        camera.configure(camera.create_still_configuration(main={"size": size, "format": "RGB888"}))
        camera.start()
        frame = camera.capture_image("main")
    except Exception as exc:  # noqa: BLE001 (driver errors have no common base)
        raise CameraError(f"the camera did not deliver a frame: {exc}") from exc
    finally:
        camera.close()
    buffer = io.BytesIO()
    frame.convert("RGB").save(buffer, "JPEG", quality=92)
    return buffer.getvalue()
