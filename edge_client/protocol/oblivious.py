"""Every request through an Oblivious HTTP relay: the client's transport when ``relay`` is set.

The request (method, path, content type, body, "gzip accepted"; nothing else) is sealed to
the gateway's key and POSTed to the relay, which sees the device's address
but only sealed bytes; the server sees the content but only the relay's
address. There is no fallback to a direct request.

The gateway's key configuration is, in order of preference:

- ``gateway_keys`` holding the configuration itself (hex or base64 of the
  ``application/ohttp-keys`` document): used as given, nothing is fetched;
- fetched once through the relay (``<relay origin>/.well-known/ohttp-gateway``,
  or ``gateway_keys_url``), then pinned per server in
  ``<state_dir>/ohttp-pins.json`` (``~/.enfpire`` by default; the app's files
  directory on Android). A different configuration later is a
  :class:`GatewayKeyError` unless ``gateway_keys`` is its sha256 (hex):
  the configuration signs the change off.

With ``consistency`` on (the default with a relay), a fetched or pinned key must
also be in the *shared copy* of the key configuration
(``<consistency_url or relay origin>/.well-known/ohttp-gateway``, which
``enfpire-relay`` fetches once for all its clients) before it is first used and
whenever it changes (:meth:`ObliviousTransport._use`): a key of this phone's
own is a :class:`ConsistencyError`, nothing is sealed to it and it is not pinned.
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
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from requests.structures import CaseInsensitiveDict

from ..config import ClientConfig
from ..errors import BadResponseError, ConfigError, ConsistencyError, EncapsulationError, GatewayKeyError
from ..state import write_private
from . import bhttp
from .transport import Answer, Send

log = logging.getLogger(__name__)
KEYS_PATH = "/.well-known/ohttp-gateway"
PIN_FILE = "ohttp-pins.json"
SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


class KeyPins:
    """The pinned key configuration of each server, in one small JSON file (0600)."""

    def __init__(self, path: Path):
        self.path = path

    def get(self, server: str) -> bytes | None:
        entry = self._read().get(server)
        return bytes.fromhex(entry) if isinstance(entry, str) else None

    def put(self, server: str, keys: bytes) -> None:
        pins = self._read()
        if pins.get(server) == keys.hex():
            return
        pins[server] = keys.hex()
        write_private(self.path, json.dumps(pins, indent=1).encode())

    def restore(self, server: str, keys: bytes | None) -> None:
        """Put back what ``get`` returned before (None: no pin)."""
        if keys is not None:
            self.put(server, keys)
            return
        pins = self._read()
        if pins.pop(server, None) is not None:
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
        origin = urlsplit(config.relay)
        self.keys_url = config.gateway_keys_url or f"{origin.scheme}://{origin.netloc}{KEYS_PATH}"
        shared = config.shared_origin()
        self.shared_keys_url = shared + KEYS_PATH if shared else ""
        self.generation = 0  # keys taken into use so far: the client checks each against the gateway's word
        self._key: Any = None
        self._lock = threading.Lock()

    @property
    def key(self) -> Any:
        """The key configuration requests are sealed to now (None before the first request)."""
        return self._key

    def exchange(self, method: str, path: str, data: bytes | None) -> Answer:
        """One request through the relay; the inner answer with the outer (wire) byte counts."""
        answer, context = self._post(method, path, data)
        if answer.status == 400 and _error_code(answer) == "ohttp_key":
            log.info("the gateway no longer knows the pinned key; fetching its configuration")
            with self._lock:
                self._key = self._use(refetch=True)
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
            if self._key is None:
                self._key = self._use()
        # gzip inside the sealed answer, as direct: a third fewer bytes on the phone's data plan
        headers = (("accept-encoding", "gzip"),) + ((("content-type", "application/json"),) if data is not None else ())
        message = bhttp.encode_request(bhttp.Request(method, path, headers=headers, content=data or b""))
        sealed, context = self.ohttp.encapsulate_request(self._key, message)
        return self.send("POST", self.config.relay, sealed, {"Content-Type": self.ohttp.REQUEST_TYPE,
                                                             "Accept": self.ohttp.RESPONSE_TYPE}), context

    def _resolve(self, refetch: bool = False) -> Any:
        """The key configuration to seal with: configured, pinned, or fetched and checked."""
        server, wanted = self.config.server.rstrip("/"), self.config.gateway_keys.strip().lower()
        body = configured_keys(wanted)
        if body is None:
            pinned = self.pins.get(server)
            if pinned is not None and not refetch and (not wanted or _sha(pinned) == wanted):
                body = pinned
            else:
                body = self._fetch()
                if wanted and _sha(body) != wanted:
                    raise GatewayKeyError(f"the gateway's key configuration has sha256 {_sha(body)}, "
                                          f"not the configured {wanted}")
                if not wanted and pinned is not None and body != pinned:
                    raise GatewayKeyError(f"the gateway's key configuration changed (sha256 {_sha(body)}, pinned "
                                          f"{_sha(pinned)}); set gateway_keys to the new sha256 to accept it")
        try:
            key = self.ohttp.decode_key_configs(body)[0]
        except EncapsulationError as exc:
            raise GatewayKeyError(f"unusable gateway key configuration: {exc}") from None
        self.pins.put(server, body)
        return key

    def _use(self, refetch: bool = False) -> Any:
        """The key to seal with (:meth:`_resolve`), checked against the shared copy before it is used.

        A key configured whole (shipped with the app) is the same for every phone and is not
        checked. A pinned key the shared copy no longer lists is fetched again (the pin is stale,
        or was this phone's own). A key still not in the shared copy is a :class:`ConsistencyError`,
        and the pins are left as they were.
        """
        server = self.config.server.rstrip("/")
        before = self.pins.get(server)
        key = self._resolve(refetch)
        if self.shared_keys_url and configured_keys(self.config.gateway_keys) is None:
            shared = self._shared_keys()
            if key not in shared and before is not None and not refetch:  # the pin: fetch again
                key = self._resolve(refetch=True)
            if key not in shared:
                self.pins.restore(server, before)
                raise ConsistencyError(
                    f"the gateway key this phone got (id {key.key_id}, from {self.keys_url}) is not in the shared "
                    f"copy at {self.shared_keys_url} (ids {', '.join(str(c.key_id) for c in shared)}): "
                    "a key of its own would link its requests; refused, nothing sealed to it")
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

    def _fetch(self) -> bytes:
        answer = self.send("GET", self.keys_url, None, {"Accept": self.ohttp.KEYS_TYPE})
        if answer.status != 200 or answer.headers.get("Content-Type", "").split(";")[0] != self.ohttp.KEYS_TYPE:
            raise GatewayKeyError(f"{self.keys_url} answered {answer.status}, not a key configuration")
        return answer.content


def _sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _error_code(answer: Answer) -> str:
    try:
        return str(json.loads(answer.content)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""
