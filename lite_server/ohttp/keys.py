"""The Oblivious HTTP gateway's key file: created on first start, rotated with a grace period.

One JSON file (mode 0600) beside the server's index by default
(``<index>/ohttp-keys.json``, or ``ohttp_keys`` in the config), so every
replica that reads the index decrypts the same requests. It lists X25519 keys
with a one-byte key id, their creation time and, once replaced, when they
were retired. The newest key is current; retired keys stay valid for
``ohttp_grace`` seconds so phones holding the old configuration keep working
while they learn the new one. A running server notices a rotated file by its
modification time.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from edge_client.errors import ConfigError
from edge_client.protocol.ohttp import KeyConfig, encode_key_configs, generate_private_key, public_key

log = logging.getLogger(__name__)
FILE_NAME = "ohttp-keys.json"


def default_path(index: str) -> Path:
    return Path(index).expanduser() / FILE_NAME


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        keys = json.loads(path.read_text(encoding="utf-8"))["keys"]
        for key in keys:
            bytes.fromhex(key["private_key"]), int(key["key_id"]), float(key["created"])
        return keys  # type: ignore[no-any-return]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the OHTTP key file {path}: {exc}") from None


def _write_temp(path: Path, keys: list[dict[str, Any]]) -> Path:
    """The file's new content in a 0600 temporary file beside it."""
    fd, name = tempfile.mkstemp(prefix=".ohttp-keys-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as out:  # mkstemp creates it 0600
        json.dump({"keys": keys}, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    return Path(name)


def _new_key(key_id: int) -> dict[str, Any]:
    return {"key_id": key_id, "private_key": generate_private_key().hex(), "created": time.time(), "retired": None}


def ensure(path: Path) -> None:
    """Create the key file with one key unless it exists; safe when several servers start at once."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _write_temp(path, [_new_key(1)])
    try:
        os.link(temp, path)  # fails if another process created it first: keep theirs
        log.info("created OHTTP key file %s (key id 1)", path)
    except FileExistsError:
        pass
    finally:
        temp.unlink()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def rotate(path: Path, grace: float, older_than: float = 0.0) -> int:
    """Retire the current key, add a new one, drop keys retired longer than ``grace`` ago; the current id.

    With ``older_than``, only when the current key is that many seconds old (checked under the
    lock, so replicas sharing the file rotate once)."""
    ensure(path)
    with _locked(path):
        now = time.time()
        keys = _read(path)
        if older_than and now - keys[-1]["created"] <= older_than:
            return int(keys[-1]["key_id"])
        keys = [k for k in keys if k["retired"] is None or now - k["retired"] < grace]
        for key in keys:
            key["retired"] = key["retired"] or now
        used = {k["key_id"] for k in keys}
        key_id = next(i % 256 for i in range(max(used, default=0) + 1, max(used, default=0) + 257) if i % 256 not in used)
        keys.append(_new_key(key_id))
        temp = _write_temp(path, keys)
        os.replace(temp, path)
    log.info("OHTTP keys rotated: key id %d is current", key_id)
    return key_id


class GatewayKeys:
    """The keys a running gateway decrypts with, reloaded when the file changes."""

    def __init__(self, path: Path, grace: float, rotate_after: float = 0.0):
        self.path, self.grace, self.rotate_after = path, grace, rotate_after
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._expires = float("inf")
        self._keys: dict[int, tuple[KeyConfig, bytes]] = {}
        self._body = b""
        ensure(path)
        self.refresh()

    def refresh(self) -> None:
        """Reload after a rotation (by another process, or by age here) or when a retired key expires."""
        stat = self.path.stat()
        if (stat.st_mtime_ns, stat.st_size) == self._stamp and time.time() < self._expires:
            return
        with self._lock:
            entries = _read(self.path)
            if self.rotate_after > 0 and time.time() - entries[-1]["created"] > self.rotate_after:
                rotate(self.path, self.grace, older_than=self.rotate_after)
                entries, stat = _read(self.path), self.path.stat()
            self._load(entries)
            self._stamp = (stat.st_mtime_ns, stat.st_size)

    def _load(self, entries: list[dict[str, Any]]) -> None:
        now = time.time()
        valid = [e for e in reversed(entries) if e["retired"] is None or now - e["retired"] < self.grace]
        keys: dict[int, tuple[KeyConfig, bytes]] = {}
        for entry in valid:  # current (newest) first
            private = bytes.fromhex(entry["private_key"])
            keys.setdefault(int(entry["key_id"]), (KeyConfig(int(entry["key_id"]), public_key(private)), private))
        self._keys = keys
        self._body = encode_key_configs([config for config, _ in keys.values()])
        self._expires = min((e["retired"] + self.grace for e in valid if e["retired"] is not None),
                            default=float("inf"))

    def private_keys(self) -> dict[int, tuple[KeyConfig, bytes]]:
        self.refresh()
        return self._keys

    def body(self) -> bytes:
        """The ``application/ohttp-keys`` document: the current key first, then those still in grace."""
        self.refresh()
        return self._body
