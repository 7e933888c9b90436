"""The server's long-term identity (Ed25519) and what it signs, as the phone checks it.

The server keeps one Ed25519 key for as long as it exists, in its OHTTP key file
(``lite_server.ohttp.keys``); ``enfpire-server ohttp show`` prints the public half, which
an app ships (``server_identity``) or a phone pins on first use. The identity signs:

- the **signed key document**, ``GET /.well-known/enfpire-keys`` (JSON)::

      {"identity": HEX, "payload": BASE64, "signature": BASE64,
       "public": {"index_version": V, "digest": HEX, "signature": BASE64}}   # "public" when an index is loaded

  ``payload`` is the exact signed bytes, a JSON object: ``keys`` (hex of the
  ``application/ohttp-keys`` body the gateway serves, current key first), ``next``
  (hex of the announced next key's configuration, already accepted by the gateway),
  ``next_at`` (when it becomes current; null when rotation is manual) and ``max_age``
  (seconds the phone may use the document before fetching it again);
- the **digest of the public document** (``public.signature``, :func:`verify_digest`).

Every signature covers a label naming what it signs, so neither can pass for the other.
A standard OHTTP client never asks for this document: ``/.well-known/ohttp-gateway`` is
unchanged. Only ``cryptography`` is needed.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, IdentityError

SIGNED_KEYS_PATH = "/.well-known/enfpire-keys"
KEYS_LABEL = b"enfpire signed ohttp keys v1\x00"
DIGEST_LABEL = b"enfpire public document digest v1\x00"
FORMAT = 1
#: The phone fetches the signed document again at least this often, whatever the server says.
MAX_AGE_CAP = 86400.0
MIN_AGE = 1.0
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def parse_identity(text: str) -> bytes:
    """An Ed25519 public key given as hex (64 digits) or base64 (of its 32 bytes)."""
    text = text.strip()
    if _HEX64.match(text):
        return bytes.fromhex(text)
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != 32:
        raise ConfigError("server_identity must be the server's Ed25519 public key: 64 hex digits or base64 "
                          "of 32 bytes (enfpire-server ohttp show prints it)")
    return raw


def verify(identity: bytes, label: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``identity``'s Ed25519 signature of ``label + message``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(identity).verify(signature, label + message)
        return True
    except (InvalidSignature, ValueError):
        return False


def verify_digest(identity: bytes, digest: str, signature: str) -> None:
    """Raise :class:`IdentityError` unless ``signature`` (base64) is ``identity``'s signature of the
    public document's ``digest`` (hex sha256)."""
    try:
        ok = verify(identity, DIGEST_LABEL, bytes.fromhex(digest), base64.b64decode(signature, validate=True))
    except (ValueError, binascii.Error):
        ok = False
    if not ok:
        raise IdentityError(f"the public document's digest {digest[:16]}... is not signed by the server's identity")


@dataclass(frozen=True)
class KeySchedule:
    """The key configurations a phone seals with, and until when it may use them without asking again.

    ``identity`` is empty for a configuration that is not signed (shipped with the app, or a legacy pin)."""

    keys: bytes                     # application/ohttp-keys, current key first
    next: bytes = b""               # application/ohttp-keys of the announced next key ("" = none)
    next_at: float | None = None    # when ``next`` becomes current (None = not scheduled)
    max_age: float = math.inf       # seconds after ``fetched`` the phone fetches the document again
    fetched: float = 0.0
    identity: bytes = b""
    document: dict[str, Any] = field(default_factory=dict, compare=False)  # the signed document, as pinned

    def config(self, now: float) -> bytes:
        """The ``application/ohttp-keys`` body to seal with at ``now``: the next key once it is due."""
        return self.next if self.next and self.next_at is not None and now >= self.next_at else self.keys

    def stale(self, now: float) -> bool:
        return now - self.fetched > self.max_age or now < self.fetched - 300  # or the clock went back


def open_signed_keys(document: Any, identity: bytes | None, fetched: float) -> KeySchedule:
    """Check a signed key document: signed by ``identity`` (or, for a first use, by the identity it names).

    Anything that does not verify is an :class:`IdentityError`; nothing of it is used."""
    if not isinstance(document, dict):
        raise IdentityError("the signed key document is not a JSON object")
    try:
        named = bytes.fromhex(str(document["identity"]))
        payload = base64.b64decode(str(document["payload"]), validate=True)
        signature = base64.b64decode(str(document["signature"]), validate=True)
    except (KeyError, ValueError, binascii.Error):
        raise IdentityError("the signed key document is malformed") from None
    if identity is not None and named != identity:
        raise IdentityError(f"the key configuration is signed by identity {named.hex()[:16]}..., not the server's "
                            f"{identity.hex()[:16]}...: refusing it (a relay or another server substituting its key?)")
    if len(named) != 32 or not verify(named, KEYS_LABEL, payload, signature):
        raise IdentityError("the key configuration's signature does not verify under the server's identity")
    try:
        body = json.loads(payload)
        if body["format"] != FORMAT:
            raise IdentityError(f"signed key document format {body['format']} is not {FORMAT}")
        keys, nxt = bytes.fromhex(body["keys"]), bytes.fromhex(body.get("next") or "")
        next_at = None if body.get("next_at") is None else float(body["next_at"])
        max_age = min(max(float(body["max_age"]), MIN_AGE), MAX_AGE_CAP)
    except (KeyError, ValueError, TypeError) as exc:
        raise IdentityError(f"the signed key document's payload is malformed ({type(exc).__name__})") from None
    if not keys or (next_at is not None and not math.isfinite(next_at)):
        raise IdentityError("the signed key document lists no key configuration")
    return KeySchedule(keys, nxt, next_at, max_age, fetched, named, dict(document))
