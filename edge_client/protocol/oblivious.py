"""Every request through an Oblivious HTTP relay: the client's transport when ``relay`` is set.

The request (method, path, content type, body, "gzip accepted"; nothing else) is sealed to
the gateway's key and POSTed to the relay, which sees the device's address
but only sealed bytes; the server sees the content but only the relay's
address. There is no fallback to a direct request.

The key configuration to seal with comes from, in order of preference:

- ``gateway_keys`` holding the configuration itself (hex or base64 of the
  ``application/ohttp-keys`` document): used as given, nothing is fetched. With
  ``server_identity`` too, once the gateway no longer knows it (``400 ohttp_key``) the
  signed document is fetched and followed as below;
- ``gateway_keys`` holding a sha256: the configuration fetched from
  ``/.well-known/ohttp-gateway`` must have it (until a rotation retires it);
- otherwise the **signed key document** (``/.well-known/enfpire-keys``, at the relay's
  origin or ``gateway_keys_url``'s; ``edge_client.protocol.identity``). It must be signed by
  the server's identity: ``server_identity``, or the identity pinned on first use in
  ``<state_dir>/ohttp-pins.json`` (``~/.enfpire`` by default; the app's files directory on
  Android). One that is not is an :class:`IdentityError`, and nothing is sent: a relay
  cannot substitute its key. A new configuration signed by the identity (a rotation) is
  followed with no one's help: the phone switches to the announced next key when it is due,
  fetches the document again after its ``max_age``, and once more (then retries) when the
  gateway answers ``400 ohttp_key``;
- a server that signs nothing (an older one): its configuration is pinned, and a different
  one later is a :class:`GatewayKeyError`. Once an identity is pinned, a server that signs
  nothing is an :class:`IdentityError`.

With ``consistency`` on (the default with a relay), the key the phone is about to seal to
must also be in the *shared copy* of the key configuration
(``<consistency_url or relay origin>/.well-known/ohttp-gateway``, which ``enfpire-relay``
fetches once for all its clients) before it is first used and whenever it changes
(:meth:`ObliviousTransport._take`): the identity proves the server signed a key, the shared
copy that every phone is given the same one. A key of this phone's own is a
:class:`ConsistencyError`, nothing is sealed to it and the pins are left as they were.
"""
from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from requests.structures import CaseInsensitiveDict

from ..config import ClientConfig
from ..errors import (BadResponseError, ConfigError, ConsistencyError, EncapsulationError, GatewayKeyError,
                      IdentityError)
from ..state import write_private
from . import bhttp
from .identity import SIGNED_KEYS_PATH, KeySchedule, open_signed_keys, parse_identity
from .transport import Answer, Send

log = logging.getLogger(__name__)
KEYS_PATH = "/.well-known/ohttp-gateway"
PIN_FILE = "ohttp-pins.json"
SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


class KeyPins:
    """What this phone pinned per server, in one small JSON file (0600): the server's identity with the
    last signed key document it verified, or (a server that signs nothing) its key configuration."""

    def __init__(self, path: Path):
        self.path = path

    def get(self, server: str) -> bytes | dict[str, Any] | None:
        entry = self._read().get(server)
        if isinstance(entry, str):
            return bytes.fromhex(entry)
        if isinstance(entry, dict):
            if not (SHA256_HEX.match(str(entry.get("identity"))) and isinstance(entry.get("document"), dict)):
                raise GatewayKeyError(f"the key pins {self.path} hold a malformed entry for {server}")
            return entry
        return None

    def put(self, server: str, keys: bytes) -> None:
        self._put(server, keys.hex())

    def put_signed(self, server: str, schedule: KeySchedule) -> None:
        self._put(server, {"identity": schedule.identity.hex(), "document": schedule.document,
                           "fetched": schedule.fetched})

    def restore(self, server: str, entry: bytes | dict[str, Any] | None) -> None:
        """Put back what ``get`` returned before (None: no pin)."""
        if entry is not None:
            self._put(server, entry.hex() if isinstance(entry, bytes) else entry)
            return
        pins = self._read()
        if pins.pop(server, None) is not None:
            write_private(self.path, json.dumps(pins, indent=1).encode())

    def _put(self, server: str, entry: Any) -> None:
        pins = self._read()
        if pins.get(server) == entry:
            return
        pins[server] = entry
        write_private(self.path, json.dumps(pins, indent=1).encode())

    def _read(self) -> dict[str, Any]:
        try:
            pins = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise GatewayKeyError(f"cannot read the key pins {self.path}: {exc}") from None
        return pins if isinstance(pins, dict) else {}


def configured_keys(text: str) -> bytes | None:
    """``gateway_keys`` as a key configuration document; None when it is a sha256 or empty."""
    text = text.strip()
    if not text or SHA256_HEX.match(text):
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        pass
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ConfigError("gateway_keys must be a sha256 (hex) or a key configuration (hex or base64)") from None


class ObliviousTransport:
    """Seals requests for the gateway and sends them to the relay with the client's ``send``."""

    def __init__(self, config: ClientConfig, send: Send):
        try:
            from . import ohttp
        except ImportError as exc:
            raise ConfigError(f"a relay needs the 'ohttp' extra (pip install 'enfpire[ohttp]'): {exc}") from None
        self.ohttp, self.config, self.send = ohttp, config, send
        self.pins = KeyPins(config.state_path() / PIN_FILE)
        self.identity = parse_identity(config.server_identity) if config.server_identity.strip() else None
        if self.identity is not None and SHA256_HEX.match(config.gateway_keys.strip()):
            raise ConfigError("gateway_keys as a sha256 pins one configuration, which a rotation retires; with "
                              "server_identity leave gateway_keys empty (or give the configuration itself)")
        origin = urlsplit(config.gateway_keys_url or config.relay)
        self.keys_url = config.gateway_keys_url or f"{origin.scheme}://{origin.netloc}{KEYS_PATH}"
        self.signed_url = f"{origin.scheme}://{origin.netloc}{SIGNED_KEYS_PATH}"
        self._schedule: KeySchedule | None = None
        shared = config.shared_origin()
        self.shared_keys_url = shared + KEYS_PATH if shared else ""
        self.generation = 0  # keys taken into use so far: the client checks each against the gateway's word
        self._current: Any = None  # the key last checked and sealed to
        self._pin_before: bytes | dict[str, Any] | None = None  # the pin as the last resolve found it
        self._lock = threading.Lock()

    @property
    def key(self) -> Any:
        """The key configuration requests are sealed to now (None before the first request)."""
        return self._current

    def exchange(self, method: str, path: str, data: bytes | None) -> Answer:
        """One request through the relay; the inner answer with the outer (wire) byte counts."""
        answer, context = self._post(method, path, data)
        if answer.status == 400 and _error_code(answer) == "ohttp_key":
            log.info("the gateway no longer knows the key; fetching its configuration again")
            with self._lock:
                self._schedule = self._resolve(fresh=True)
            answer, context = self._post(method, path, data)
        if answer.status != 200:
            return answer  # the relay's or gateway's own error: the client's retries and errors apply
        if answer.headers.get("Content-Type", "").split(";")[0] != self.ohttp.RESPONSE_TYPE:
            raise BadResponseError("the relay's answer is not an encapsulated response")
        try:
            inner = bhttp.decode_response(self.ohttp.decapsulate_response(context, answer.content))
        except EncapsulationError as exc:
            raise BadResponseError(f"the gateway's answer does not open: {exc}") from None
        content = gzip.decompress(inner.content) if inner.header("content-encoding") == "gzip" else inner.content
        return Answer(inner.status, CaseInsensitiveDict(dict(inner.headers)), content, "", answer.sent, answer.received)

    def _post(self, method: str, path: str, data: bytes | None) -> tuple[Answer, Any]:
        with self._lock:
            key = self._take(self._key())
        # gzip inside the sealed answer, as direct: a third fewer bytes on the phone's data plan
        headers = (("accept-encoding", "gzip"),) + ((("content-type", "application/json"),) if data is not None else ())
        message = bhttp.encode_request(bhttp.Request(method, path, headers=headers, content=data or b""))
        sealed, context = self.ohttp.encapsulate_request(key, message)
        return self.send("POST", self.config.relay, sealed, {"Content-Type": self.ohttp.REQUEST_TYPE,
                                                             "Accept": self.ohttp.RESPONSE_TYPE}), context

    def _key(self) -> Any:
        """The key configuration to seal with now; the signed document fetched again once it is too old.

        A verified document that cannot be fetched again for now (the relay or gateway failing) is
        kept; one that does not verify is never used."""
        now = time.time()
        if self._schedule is None:
            self._schedule = self._resolve()
        elif self._schedule.stale(now):
            try:
                self._schedule = self._resolve(fresh=True)
            except IdentityError:
                raise
            except GatewayKeyError as exc:
                log.warning("keeping the signed key configuration held: %s", exc)
        try:
            return self.ohttp.decode_key_configs(self._schedule.config(now))[0]
        except EncapsulationError as exc:
            raise GatewayKeyError(f"unusable gateway key configuration: {exc}") from None

    def _resolve(self, fresh: bool = False) -> KeySchedule:
        """The key configurations to seal with: configured, pinned, or fetched and checked.

        ``fresh``: not from the pins (the gateway refused the key, or the document is too old)."""
        server, wanted = self.config.server.rstrip("/"), self.config.gateway_keys.strip().lower()
        shipped = configured_keys(wanted)
        pin = self._pin_before = self.pins.get(server)
        signed = pin if isinstance(pin, dict) and (self.identity is None or
                                                   pin["identity"] == self.identity.hex()) else None
        if shipped is not None and (self.identity is None or (signed is None and not fresh)):
            return KeySchedule(shipped)  # shipped with the app: nothing fetched
        if shipped is None and wanted:  # a sha256
            return KeySchedule(self._by_sha256(server, wanted, pin if isinstance(pin, bytes) else None, fresh))
        identity = self.identity or (bytes.fromhex(signed["identity"]) if signed else None)
        if signed is not None and not fresh:
            try:
                schedule = open_signed_keys(signed["document"], identity, float(signed.get("fetched", 0.0)))
                if not schedule.stale(time.time()):
                    return schedule
            except (IdentityError, TypeError, ValueError) as exc:  # a damaged pin: fetch the document again
                log.warning("the pinned key document of %s is unusable (%s)", server, exc)
        document = self._fetch_signed()
        if document is None:
            if identity is not None:
                raise IdentityError(f"{self.signed_url} serves no signed key configuration, yet this server's "
                                    f"identity is {identity.hex()[:16]}...: refusing (a relay substituting its key?)")
            return KeySchedule(self._unsigned(server, pin if isinstance(pin, bytes) else None, fresh))
        schedule = open_signed_keys(document, identity, time.time())
        if identity is None:  # first use: pin the identity that signed it
            if isinstance(pin, bytes) and not self._lists(schedule, pin):
                raise GatewayKeyError(f"the gateway's key configuration changed (sha256 {_sha(schedule.keys)}, "
                                      f"pinned {_sha(pin)}); set server_identity to {schedule.identity.hex()} "
                                      "(or gateway_keys to the new sha256) to accept it")
            log.info("pinned server identity %s for %s", schedule.identity.hex(), server)
        self.pins.put_signed(server, schedule)
        return schedule

    def _take(self, key: Any) -> Any:
        """``key``, checked against the shared copy when this transport has not sealed to it yet.

        A key configured whole (shipped with the app) is the same for every phone and is not
        checked. A key the shared copy does not list is resolved once more without the pins (the
        pin is stale, or was this phone's own); still not listed, it is a :class:`ConsistencyError`
        and the pins are put back as they were.
        """
        if key == self._current:
            return key
        if self.shared_keys_url and configured_keys(self.config.gateway_keys) is None:
            shared = self._shared_keys()
            if key not in shared:
                before = self._pin_before
                self._schedule = self._resolve(fresh=True)
                key = self.ohttp.decode_key_configs(self._schedule.config(time.time()))[0]
                if key not in shared:
                    self._schedule = None
                    self.pins.restore(self.config.server.rstrip("/"), before)
                    raise ConsistencyError(
                        f"the gateway key this phone got (id {key.key_id}) is not in the shared copy at "
                        f"{self.shared_keys_url} (ids {', '.join(str(c.key_id) for c in shared)}): "
                        "a key of its own would link its requests; refused, nothing sealed to it")
        self._current = key
        self.generation += 1
        return key

    def _shared_keys(self) -> list[Any]:
        answer = self.send("GET", self.shared_keys_url, None, {"Accept": self.ohttp.KEYS_TYPE})
        if answer.status != 200 or answer.headers.get("Content-Type", "").split(";")[0] != self.ohttp.KEYS_TYPE:
            raise ConsistencyError(f"{self.shared_keys_url} answered {answer.status}, not a shared key configuration: "
                                   "set consistency_url to a place that serves one, or consistency off")
        try:
            return list(self.ohttp.decode_key_configs(answer.content))
        except EncapsulationError as exc:
            raise ConsistencyError(f"the shared key configuration at {self.shared_keys_url} is unusable: "
                                   f"{exc}") from None

    def _by_sha256(self, server: str, wanted: str, pinned: bytes | None, fresh: bool) -> bytes:
        if pinned is not None and not fresh and _sha(pinned) == wanted:
            return pinned
        body = self._fetch()
        if _sha(body) != wanted:
            raise GatewayKeyError(f"the gateway's key configuration has sha256 {_sha(body)}, not the configured {wanted}")
        self.pins.put(server, body)
        return body

    def _unsigned(self, server: str, pinned: bytes | None, fresh: bool) -> bytes:
        """A server that signs nothing: its configuration pinned on first use, a change refused."""
        if pinned is not None and not fresh:
            return pinned
        body = self._fetch()
        if pinned is not None and body != pinned:
            raise GatewayKeyError(f"the gateway's key configuration changed (sha256 {_sha(body)}, pinned "
                                  f"{_sha(pinned)}); set gateway_keys to the new sha256 to accept it")
        self.pins.put(server, body)
        return body

    def _lists(self, schedule: KeySchedule, pinned: bytes) -> bool:
        """Whether a signed schedule holds the configuration pinned before the server signed anything."""
        try:
            held = self.ohttp.decode_key_configs(pinned)[0]
            return held in self.ohttp.decode_key_configs(schedule.keys) + \
                (self.ohttp.decode_key_configs(schedule.next) if schedule.next else [])
        except EncapsulationError:
            return False

    def _fetch(self) -> bytes:
        answer = self.send("GET", self.keys_url, None, {"Accept": self.ohttp.KEYS_TYPE})
        if answer.status != 200 or answer.headers.get("Content-Type", "").split(";")[0] != self.ohttp.KEYS_TYPE:
            raise GatewayKeyError(f"{self.keys_url} answered {answer.status}, not a key configuration")
        return answer.content

    def _fetch_signed(self) -> Any:
        """The signed key document; None when there is none (404 or 405: a server that signs nothing)."""
        answer = self.send("GET", self.signed_url, None, {"Accept": "application/json"})
        if answer.status in (404, 405):
            return None
        if answer.status != 200 or answer.headers.get("Content-Type", "").split(";")[0] != "application/json":
            raise GatewayKeyError(f"{self.signed_url} answered {answer.status}, not a signed key configuration")
        try:
            return json.loads(answer.content)
        except ValueError:
            raise IdentityError(f"{self.signed_url} answered something that is not JSON") from None


def _sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _error_code(answer: Answer) -> str:
    try:
        return str(json.loads(answer.content)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""
