"""What the device keeps between runs: a private folder, files written whole, and
the device secret that keys its decoys.

Everything lives under ``state_dir`` (``~/.enfpire`` by default; Chaquopy points
``$HOME`` at the app's private files directory), in files only the user can
read. Nothing here ever holds a photo or a feature.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)
DAY = 86400.0
SECRET_FILE = "device-secret"


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole (temporary file, then rename), readable by the user only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # 0600, a new name each call
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def device_secret(state_dir: Path | None, rotate_days: float, now: float | None = None) -> bytes:
    """32 random bytes kept in ``state_dir``, replaced once older than ``rotate_days``.

    Without a folder (``None``) the secret lives as long as the process. A
    missing, unreadable or short file is replaced by a fresh secret.
    """
    if state_dir is None:
        return secrets.token_bytes(32)
    path = state_dir / SECRET_FILE
    now = time.time() if now is None else now
    try:
        raw = path.read_bytes()
        if len(raw) == 32 and now - path.stat().st_mtime < rotate_days * DAY:
            return raw
    except OSError:
        pass
    fresh = secrets.token_bytes(32)
    write_private(path, fresh)
    log.debug("new device secret in %s", path)
    return fresh


def decoy_seed(secret: bytes, real: tuple[int, ...], now: float | None = None) -> int:
    """The decoy generator's seed for real cells ``real`` today: stable within a day, unpredictable without the secret."""
    day = int((time.time() if now is None else now) // DAY)
    message = f"decoys|{day}|{','.join(map(str, sorted(real)))}".encode()
    return int.from_bytes(hmac.new(secret, message, hashlib.sha256).digest()[:16], "big")
