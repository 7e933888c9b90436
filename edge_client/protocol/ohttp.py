"""Oblivious HTTP (RFC 9458): key configurations and message encapsulation, both ends.

The client seals a binary HTTP request to the gateway's public key (HPKE,
RFC 9180, through ``pyhpke``); the gateway opens it and seals its answer with
keys exported from the same HPKE context (section 4.4, with ``cryptography``'s
HKDF and AEADs). Needs the ``ohttp`` extra (``pyhpke``, ``cryptography``).

Suites: DHKEM(X25519, HKDF-SHA256) with HKDF-SHA256 and AES-128-GCM (the
RFC's), AES-256-GCM or ChaCha20-Poly1305.
"""
from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKeyPair
from pyhpke.exceptions import PyHPKEError

from ..errors import EncapsulationError

REQUEST_LABEL = b"message/bhttp request"
RESPONSE_LABEL = b"message/bhttp response"
REQUEST_TYPE, RESPONSE_TYPE, KEYS_TYPE = "message/ohttp-req", "message/ohttp-res", "application/ohttp-keys"
KEM_X25519 = KEMId.DHKEM_X25519_HKDF_SHA256.value
KDF_SHA256 = KDFId.HKDF_SHA256.value
AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305 = 0x0001, 0x0002, 0x0003
#: AEAD id -> (Nk, Nn, the cryptography class)
AEADS: dict[int, tuple[int, int, Callable[[bytes], Any]]] = {
    AES_128_GCM: (16, 12, AESGCM), AES_256_GCM: (32, 12, AESGCM), CHACHA20_POLY1305: (32, 12, ChaCha20Poly1305)}
SUITES = ((KDF_SHA256, AES_128_GCM), (KDF_SHA256, AES_256_GCM), (KDF_SHA256, CHACHA20_POLY1305))
N_ENC = 32  # X25519 encapsulated key
HEADER = struct.Struct(">BHHH")  # key id, kem, kdf, aead


@dataclass(frozen=True)
class KeyConfig:
    """One gateway key configuration (RFC 9458 section 3)."""

    key_id: int
    public_key: bytes
    suites: tuple[tuple[int, int], ...] = SUITES
    kem_id: int = KEM_X25519

    def encode(self) -> bytes:
        algorithms = b"".join(struct.pack(">HH", kdf, aead) for kdf, aead in self.suites)
        return struct.pack(">BH", self.key_id, self.kem_id) + self.public_key + \
            struct.pack(">H", len(algorithms)) + algorithms

    @classmethod
    def decode(cls, data: bytes) -> "KeyConfig":
        if len(data) < 3 + N_ENC + 2:
            raise EncapsulationError("the key configuration is truncated", "ohttp_key")
        key_id, kem_id = struct.unpack_from(">BH", data)
        if kem_id != KEM_X25519:
            raise EncapsulationError(f"unsupported KEM {kem_id:#06x}", "ohttp_key")
        public_key = data[3:3 + N_ENC]
        (length,) = struct.unpack_from(">H", data, 3 + N_ENC)
        algorithms = data[5 + N_ENC:]
        if length != len(algorithms) or length % 4 or not length:
            raise EncapsulationError("the key configuration's algorithm list is malformed", "ohttp_key")
        suites = tuple(struct.unpack_from(">HH", algorithms, i) for i in range(0, length, 4))
        return cls(key_id, public_key, suites, kem_id)  # type: ignore[arg-type]


def encode_key_configs(configs: list[KeyConfig]) -> bytes:
    """The ``application/ohttp-keys`` body: each configuration with a 2-byte length prefix."""
    return b"".join(struct.pack(">H", len(raw)) + raw for raw in (c.encode() for c in configs))


def decode_key_configs(data: bytes) -> list[KeyConfig]:
    """Parse ``application/ohttp-keys``; at least one configuration."""
    configs, pos = [], 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise EncapsulationError("the key configuration list is truncated", "ohttp_key")
        (length,) = struct.unpack_from(">H", data, pos)
        if pos + 2 + length > len(data):
            raise EncapsulationError("the key configuration list is truncated", "ohttp_key")
        configs.append(KeyConfig.decode(data[pos + 2:pos + 2 + length]))
        pos += 2 + length
    if not configs:
        raise EncapsulationError("the key configuration list is empty", "ohttp_key")
    return configs


@functools.lru_cache(maxsize=8)
def _suite(aead_id: int) -> CipherSuite:
    return CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId(aead_id))


# Parsing a key costs about 0.4 ms; a gateway and a phone reuse a handful of keys for days.
@functools.lru_cache(maxsize=32)
def _private_key(raw: bytes) -> Any:
    return _suite(AES_128_GCM).kem.deserialize_private_key(raw)


@functools.lru_cache(maxsize=32)
def _public_key(raw: bytes) -> Any:
    return _suite(AES_128_GCM).kem.deserialize_public_key(raw)


def generate_private_key() -> bytes:
    """A fresh X25519 private key (32 bytes)."""
    return _suite(AES_128_GCM).kem.derive_key_pair(os.urandom(32)).private_key.to_private_bytes()


def public_key(private_key: bytes) -> bytes:
    """The X25519 public key of ``private_key``."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


@dataclass
class Context:
    """What one exchange keeps to open or seal the response."""

    hpke: Any   # the HPKE context (sender on the client, recipient on the gateway)
    enc: bytes  # the encapsulated key, part of the response keys' salt
    aead_id: int


def encapsulate_request(config: KeyConfig, message: bytes, aead_id: int | None = None,
                        ephemeral_private: bytes | None = None) -> tuple[bytes, Context]:
    """Seal ``message`` (binary HTTP) to ``config``: the encapsulated request and its context.

    ``ephemeral_private`` fixes the ephemeral key (test vectors only)."""
    if aead_id is None:
        aead_id = next((a for k, a in config.suites if k == KDF_SHA256 and a in AEADS), 0)
    if (KDF_SHA256, aead_id) not in config.suites or aead_id not in AEADS:
        raise EncapsulationError("the gateway offers no supported algorithm", "ohttp_key")
    header = HEADER.pack(config.key_id, config.kem_id, KDF_SHA256, aead_id)
    suite = _suite(aead_id)
    eks = None
    if ephemeral_private is not None:
        eks = KEMKeyPair(suite.kem.deserialize_private_key(ephemeral_private),
                         suite.kem.deserialize_public_key(public_key(ephemeral_private)))
    enc, sender = suite.create_sender_context(_public_key(config.public_key),
                                              REQUEST_LABEL + b"\x00" + header, eks=eks)
    return header + enc + sender.seal(message), Context(sender, enc, aead_id)


def decapsulate_request(data: bytes, private_keys: Mapping[int, tuple[KeyConfig, bytes]]) -> tuple[bytes, Context]:
    """Open an encapsulated request with the gateway's keys (key id -> (config, private key))."""
    if len(data) < HEADER.size + N_ENC + 16:
        raise EncapsulationError("the encapsulated request is truncated")
    key_id, kem_id, kdf_id, aead_id = HEADER.unpack_from(data)
    if key_id not in private_keys:
        raise EncapsulationError(f"unknown key id {key_id}", "ohttp_key")
    config, private_key = private_keys[key_id]
    if kem_id != config.kem_id or (kdf_id, aead_id) not in config.suites or aead_id not in AEADS:
        raise EncapsulationError("the request's algorithms are not offered for its key", "ohttp_key")
    enc = data[HEADER.size:HEADER.size + N_ENC]
    suite = _suite(aead_id)
    try:
        recipient = suite.create_recipient_context(enc, _private_key(private_key),
                                                   REQUEST_LABEL + b"\x00" + data[:HEADER.size])
        message = recipient.open(data[HEADER.size + N_ENC:])
    except (PyHPKEError, ValueError) as exc:
        raise EncapsulationError(f"the encapsulated request does not decrypt ({type(exc).__name__})") from None
    return message, Context(recipient, enc, aead_id)


def response_keys(context: Context, response_nonce: bytes) -> tuple[bytes, bytes]:
    """The response's AEAD key and nonce (RFC 9458 section 4.4)."""
    nk, nn, _ = AEADS[context.aead_id]
    secret = context.hpke.export(RESPONSE_LABEL, max(nn, nk))
    salt = context.enc + response_nonce

    def expand(info: bytes, length: int) -> bytes:
        return HKDF(hashes.SHA256(), length, salt, info).derive(secret)  # Extract(salt, secret) then Expand

    return expand(b"key", nk), expand(b"nonce", nn)


def encapsulate_response(context: Context, message: bytes, response_nonce: bytes | None = None) -> bytes:
    """Seal the gateway's binary HTTP response: ``response_nonce || ct``."""
    nk, nn, aead = AEADS[context.aead_id]
    response_nonce = os.urandom(max(nn, nk)) if response_nonce is None else response_nonce
    key, nonce = response_keys(context, response_nonce)
    return response_nonce + aead(key).encrypt(nonce, message, None)


def decapsulate_response(context: Context, data: bytes) -> bytes:
    """Open the gateway's encapsulated response on the client."""
    from cryptography.exceptions import InvalidTag

    nk, nn, aead = AEADS[context.aead_id]
    size = max(nn, nk)
    if len(data) < size + 16:
        raise EncapsulationError("the encapsulated response is truncated")
    key, nonce = response_keys(context, data[:size])
    try:
        return aead(key).decrypt(nonce, data[size:], None)  # type: ignore[no-any-return]
    except InvalidTag:
        raise EncapsulationError("the encapsulated response does not decrypt") from None
