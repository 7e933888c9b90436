"""The Oblivious HTTP gateway's key file: the server's identity and its X25519 keys, rotated with a
grace period, the next key announced before it is used.

One JSON file (mode 0600) beside the server's index by default
(``<index>/ohttp-keys.json``, or ``ohttp_keys`` in the config), so every
replica that reads the index decrypts the same requests and signs with the same identity::

    {"identity": {"private_key": HEX, "created": T},
     "keys": [{"key_id": 1, "private_key": HEX, "created": T, "activated": T, "retired": T | null}, ...]}

The **identity** is a long-term Ed25519 key, created with the file and never rotated: phones pin
its public half, and it signs every key configuration the gateway serves (the signed key document,
``edge_client.protocol.identity``) and the public document's digest. Losing it strands every phone
that pinned it: back the file up.

Each X25519 **key** is *next* (created, announced in the signed document and already accepted;
``activated`` null), then *current* (exactly one: listed first in ``/.well-known/ohttp-gateway``),
then *retired* (still accepted for ``ohttp_grace`` seconds, then dropped). A rotation
(``enfpire-server ohttp rotate``, or ``ohttp_rotate_days``) makes the next key current, retires the
current one and announces a new next key, under a lock file (``<file>.lock``); with an age limit
the age is checked under the lock, so replicas sharing the file rotate once. A running server
notices a rotated file by its modification time on its next request, and its timer rotates on
schedule and drops expired keys when no request comes.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from edge_client.errors import ConfigError
from edge_client.protocol.identity import DIGEST_LABEL, FORMAT, KEYS_LABEL, MAX_AGE_CAP, MIN_AGE
from edge_client.protocol.ohttp import KeyConfig, encode_key_configs, generate_private_key, public_key

log = logging.getLogger(__name__)
FILE_NAME = "ohttp-keys.json"
#: The timer looks at the file at least this often (seconds), whatever is due.
POLL = 60.0


def default_path(index: str) -> Path:
    return Path(index).expanduser() / FILE_NAME


class ServerIdentity:
    """The server's Ed25519 identity: signs key configurations and public-document digests."""

    def __init__(self, private_key: bytes):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self._key = Ed25519PrivateKey.from_private_bytes(private_key)
        self.public_key: bytes = self._key.public_key().public_bytes_raw()

    @property
    def public_hex(self) -> str:
        """What a phone pins (``server_identity``) and ``enfpire-server ohttp show`` prints."""
        return self.public_key.hex()

    def sign(self, label: bytes, message: bytes) -> bytes:
        return self._key.sign(label + message)  # type: ignore[no-any-return]

    def sign_digest(self, digest: str) -> str:
        """The signature (base64) of a public document's digest (hex sha256); checked on the phone
        with ``edge_client.protocol.identity.verify_digest``."""
        return base64.b64encode(self.sign(DIGEST_LABEL, bytes.fromhex(digest))).decode()

    def signed_keys(self, payload: bytes) -> dict[str, str]:
        """The signed key document for ``payload`` (the exact bytes the signature covers)."""
        return {"identity": self.public_hex, "payload": base64.b64encode(payload).decode(),
                "signature": base64.b64encode(self.sign(KEYS_LABEL, payload)).decode()}


def _new_identity() -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return {"private_key": Ed25519PrivateKey.generate().private_bytes_raw().hex(), "created": time.time()}


def _new_key(key_id: int, activated: float | None) -> dict[str, Any]:
    return {"key_id": key_id, "private_key": generate_private_key().hex(), "created": time.time(),
            "activated": activated, "retired": None}


def _read(path: Path) -> dict[str, Any]:
    """The file's content; a file written before keys had states gets them (its newest key is current)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        keys = data["keys"]
        for key in keys:
            bytes.fromhex(key["private_key"]), int(key["key_id"]), float(key["created"])
            key.setdefault("activated", key["created"])
        if data.get("identity") is not None:
            ServerIdentity(bytes.fromhex(data["identity"]["private_key"]))
        _current(keys)
        return data  # type: ignore[no-any-return]
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as exc:
        raise ConfigError(f"cannot read the OHTTP key file {path}: {type(exc).__name__} {exc}") from None


def _current(keys: list[dict[str, Any]]) -> dict[str, Any]:
    return next(k for k in reversed(keys) if k["retired"] is None and k["activated"] is not None)


def _next(keys: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((k for k in reversed(keys) if k["retired"] is None and k["activated"] is None), None)


def _free_id(keys: list[dict[str, Any]]) -> int:
    used = {k["key_id"] for k in keys}
    top = max(used, default=0)
    return next(i % 256 for i in range(top + 1, top + 257) if i % 256 not in used)


def _write(path: Path, data: dict[str, Any]) -> None:
    """Replace the file whole: a 0600 temporary file beside it, renamed over it."""
    temp = _write_temp(path, data)
    os.replace(temp, path)


def _write_temp(path: Path, data: dict[str, Any]) -> Path:
    fd, name = tempfile.mkstemp(prefix=".ohttp-keys-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as out:  # mkstemp creates it 0600
        json.dump(data, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    return Path(name)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure(path: Path) -> None:
    """Create the key file (identity, current key 1, next key 2) unless it exists; give an older file
    its identity and next key. Safe when several servers start at once."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = _write_temp(path, {"identity": _new_identity(), "keys": [_new_key(1, time.time()), _new_key(2, None)]})
        try:
            os.link(temp, path)  # fails if another process created it first: keep theirs
            log.info("created OHTTP key file %s (identity and key id 1)", path)
        except FileExistsError:
            pass
        finally:
            temp.unlink()
    data = _read(path)
    if data.get("identity") is not None and _next(data["keys"]) is not None:
        return
    with _locked(path):
        data = _read(path)
        if data.get("identity") is None:
            data["identity"] = _new_identity()
            log.warning("OHTTP key file %s had no identity: created one (phones pin it)", path)
        if _next(data["keys"]) is None:
            data["keys"].append(_new_key(_free_id(data["keys"]), None))
        _write(path, data)


def rotate(path: Path, grace: float, older_than: float = 0.0) -> int:
    """Make the next key current, retire the current one, announce a new next key and drop keys
    retired longer than ``grace`` ago; the current key id.

    With ``older_than``, only when the current key has been current that many seconds (checked
    under the lock, so replicas sharing the file rotate once)."""
    ensure(path)
    with _locked(path):
        now = time.time()
        data = _read(path)
        keys = data["keys"]
        current = _current(keys)
        if older_than and now - current["activated"] < older_than:
            return int(current["key_id"])
        keys = [k for k in keys if k["retired"] is None or now - k["retired"] < grace]
        upcoming = _next(keys)
        if upcoming is None:  # none announced (a file from before keys had states): straight to current
            upcoming = _new_key(_free_id(keys), None)
            keys.append(upcoming)
        current["retired"], upcoming["activated"] = now, now
        keys.append(_new_key(_free_id(keys), None))
        data["keys"] = keys
        _write(path, data)
    log.info("OHTTP keys rotated: key id %d is current, %d announced", upcoming["key_id"], keys[-1]["key_id"])
    return int(upcoming["key_id"])


class GatewayKeys:
    """The keys a running gateway decrypts with and serves, reloaded when the file changes.

    ``rotate_after`` (seconds, 0 = never) rotates the current key once it has been current that
    long; :meth:`start` runs a timer that does so on time, without waiting for a request."""

    def __init__(self, path: Path, grace: float, rotate_after: float = 0.0):
        self.path, self.grace, self.rotate_after = path, grace, rotate_after
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._due = math.inf
        self._keys: dict[int, tuple[KeyConfig, bytes]] = {}
        self._body = b""
        self._signed: dict[str, str] = {}
        self.identity: ServerIdentity
        self._stop = threading.Event()
        ensure(path)
        self.refresh()

    def refresh(self) -> None:
        """Reload after a rotation (by another process, or due here) or when a retired key expires."""
        stat = self.path.stat()
        if (stat.st_ino, stat.st_mtime_ns, stat.st_size) == self._stamp and time.time() < self._due:
            return
        with self._lock:
            stat = self.path.stat()  # before the read: a change after it is seen next time
            data = _read(self.path)
            if self.rotate_after > 0 and time.time() - _current(data["keys"])["activated"] >= self.rotate_after:
                rotate(self.path, self.grace, older_than=self.rotate_after)
                stat = self.path.stat()
                data = _read(self.path)
            self._load(data)
            self._stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def _load(self, data: dict[str, Any]) -> None:
        now = time.time()
        entries = data["keys"]
        current, upcoming = _current(entries), _next(entries)
        retired = [e for e in reversed(entries) if e["retired"] is not None and now - e["retired"] < self.grace]

        def config(entry: dict[str, Any]) -> tuple[KeyConfig, bytes]:
            private = bytes.fromhex(entry["private_key"])
            return KeyConfig(int(entry["key_id"]), public_key(private)), private

        # the current key first (what a standard client seals to), then the announced next one and those
        # in grace: every key the gateway accepts, so a phone's consistency check finds the one it uses
        served = [config(current)] + ([config(upcoming)] if upcoming is not None else []) + \
            [config(e) for e in retired if e["key_id"] != current["key_id"]]
        keys = {c.key_id: (c, p) for c, p in served}
        next_at = current["activated"] + self.rotate_after if self.rotate_after > 0 else None
        self.identity = ServerIdentity(bytes.fromhex(data["identity"]["private_key"]))
        self._keys = keys
        self._body = encode_key_configs([c for c, _ in served])
        payload = {"format": FORMAT, "keys": self._body.hex(),
                   "next": encode_key_configs([config(upcoming)[0]]).hex() if upcoming else "",
                   "next_at": next_at, "max_age": self.max_age()}
        self._signed = self.identity.signed_keys(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
        self._due = min([e["retired"] + self.grace for e in retired] + ([next_at] if next_at else []),
                        default=math.inf)

    def max_age(self) -> float:
        """How long a phone may keep the signed document: half the grace and half the rotation period,
        so a phone that fetches it this often never holds a key the gateway has dropped."""
        limits = [self.grace, MAX_AGE_CAP] + ([self.rotate_after] if self.rotate_after > 0 else [])
        return max(MIN_AGE, min(limits) / 2)

    def private_keys(self) -> dict[int, tuple[KeyConfig, bytes]]:
        """Every key the gateway accepts: current, next, and retired ones in their grace period."""
        self.refresh()
        return self._keys

    def body(self) -> bytes:
        """The ``application/ohttp-keys`` document: the current key first, then the next, then those in grace."""
        self.refresh()
        return self._body

    def signed(self) -> dict[str, str]:
        """The signed key document (``edge_client.protocol.identity``)."""
        self.refresh()
        return self._signed

    def start(self) -> None:
        """Rotate on time and drop expired keys without waiting for a request (a daemon thread)."""
        threading.Thread(target=self._run, name="ohttp-keys", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(max(0.005, min(self._due - time.time(), POLL))):
            try:
                self.refresh()
            except (OSError, ConfigError) as exc:  # keep serving the keys already loaded
                log.error("OHTTP keys: %s", exc)
