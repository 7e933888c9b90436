"""Layered configuration: defaults, then a JSON file, then ``ENFPIRE_*``
environment variables, then explicit overrides (command-line flags).

Each side has one frozen dataclass (:class:`ClientConfig` here, the server's
in ``lite_server.config``); :func:`load_config` builds either, so both sides
read their settings the same way.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar
from urllib.parse import urlsplit

from .errors import ConfigError
from .privacy import floors
from .vision import registry

ENV_PREFIX = "ENFPIRE_"
T = TypeVar("T")

#: The prepared extractor made by ``python -m tools.model prepare``.
DEFAULT_MODEL_FILE = "mobilenet_v2_1.0_224_quant_avgpool.tflite"


def default_model_dir() -> Path:
    """Where prepared models live: the checkout's ``models/`` when running
    from one, else ``~/.enfpire/models`` (a phone or a pip install)."""
    checkout = Path(__file__).resolve().parent.parent / "models"
    if checkout.is_dir():
        return checkout
    return Path.home() / ".enfpire" / "models"


def default_model_path() -> Path:
    return default_model_dir() / DEFAULT_MODEL_FILE


@dataclass(frozen=True)
class ClientConfig:
    """Everything the device side can be told. Empty or ``None`` means "the default"."""

    model: str = ""                 # extractor: a path, or a name registered in the models' manifest.json;
                                    # "" = default_model_path()
    model_dir: str = ""             # where registered names are looked up; "" = default_model_dir()
    num_threads: int = 0            # interpreter threads; 0 = CPU count
    max_pixels: int = 100_000_000   # larger photos are refused (decompression bombs)
    reference_kernels: bool = False # TFLite's reference kernels: the same feature on every CPU, far slower
    server: str = "http://127.0.0.1:8080"
    transform: str = ""             # "" = the library's default transform
    strength: float | None = None   # None = the transform's default strength
    k: int = 0                      # 0 = the transform's default candidate count
    keep: float = 0.95              # open set: the share of photos of known spots still answered (calibrated by
                                    # the server); a lower score is "not a known spot". 1 = always answer
    threshold: float | None = None  # explicit rerank score below which the answer is "not a known spot" (overrides keep)
    connect_timeout: float = 3.05
    read_timeout: float = 10.0
    retries: int = 3
    backoff: float = 0.25
    max_retry_after: float = 10.0   # never wait longer than this for a Retry-After
    dummies: int = 2                # dummy requests per real one
    dummies_per_hour: int = 120     # hard cap for battery and data plans
    dummy_window: float = 6.0       # passed to the generator; the persona default ignores it (bursts leave at once)
    dummy_day_start: int = 8        # personas only set off between these local hours
    dummy_day_end: int = 20
    cache: bool = True              # answer a photo of cells fetched recently on the device, with no request
    cache_entries: int = 32         # answers kept (the oldest go first)
    cache_max_age: float = 21600.0  # seconds an answer (and the server's /v1/info) is kept: 6 h
    stable_decoys: bool = True      # decoys keyed on the real cells and a device secret: a repeat says nothing new
    secret_days: float = 7.0        # the device secret that keys the decoys is replaced this often
    state_dir: str = ""             # cache and secret; "" = ~/.enfpire (Chaquopy: under the app's files)
    seed: int | None = None         # fixes every random draw, the device secret and decoy day too (tests, evaluation)
    relay: str = ""                 # Oblivious HTTP relay URL: every request goes through it ("" = direct)
    gateway_keys: str = ""          # the gateway's key configuration (hex/base64) or its sha256; "" = pin the first seen
    gateway_keys_url: str = ""      # where to fetch the key configuration; "" = <relay origin>/.well-known/ohttp-gateway
    server_identity: str = ""       # the server's Ed25519 public key (hex/base64, `enfpire-server ohttp show`): every
                                    # key configuration must be signed by it; "" = pin the identity first seen
    consistency: bool = True        # before first use and on every change, compare the key configuration and the
                                    # public document's digest with the shared copies at consistency_url; a
                                    # mismatch is a ConsistencyError and nothing is sent (docs/ohttp.md)
    consistency_url: str = ""       # where the shared copies are; "" = the relay's origin (enfpire-relay serves
                                    # them); with neither a relay nor this, there is nothing to compare with
    # Privacy floors the phone holds itself (edge_client.privacy.floors): a public document below one is
    # refused with PrivacyFloorError and nothing is sent. The defaults pass the honest default server.
    min_cell_spots: int = floors.MIN_CELL_SPOTS     # fewest spots (with photos and prototypes) in every cell
    min_cells: int = floors.MIN_CELLS               # fewest cells
    max_decoy_share: float = floors.MAX_DECOY_SHARE  # largest share of the decoy draw any one spot may take
    decoy_uniform: float = floors.DECOY_UNIFORM     # share of the decoy draw that is uniform over the spots
    max_decoy_cell_ratio: float = floors.MAX_DECOY_CELL_RATIO  # no cell's share of the decoy draw above this
                                                    # many times its share of the spots
    privacy_floor: float = 0.0      # add decoy groups until at least this many spots are plausible by the
                                    # phone's own receipt (edge_client.privacy.receipt); 0 = off (docs/privacy.md)
    privacy_floor_groups: int = 6   # the most decoy groups the floor adds; every request is padded to this

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"keep must be in (0, 1], got {self.keep}")
        if self.server_identity.strip():
            from .protocol.identity import parse_identity

            parse_identity(self.server_identity)  # a ConfigError naming the setting
        parts = urlsplit(self.consistency_url)
        if self.consistency_url and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise ConfigError(f"consistency_url must be an http(s) URL, got {self.consistency_url!r}")
        if self.min_cell_spots < 1 or self.min_cells < 1:
            raise ConfigError(f"min_cell_spots and min_cells must be at least 1, got {self.min_cell_spots}, "
                              f"{self.min_cells}")
        if not 0.0 < self.max_decoy_share <= 1.0:
            raise ConfigError(f"max_decoy_share must be in (0, 1], got {self.max_decoy_share}")
        if not 0.0 <= self.decoy_uniform <= 1.0:
            raise ConfigError(f"decoy_uniform must be in [0, 1], got {self.decoy_uniform}")
        if not self.privacy_floor >= 0.0 or self.privacy_floor_groups < 0:
            raise ConfigError(f"privacy_floor and privacy_floor_groups must be at least 0, got {self.privacy_floor}, "
                              f"{self.privacy_floor_groups}")
        if not self.max_decoy_cell_ratio >= 1.0:
            raise ConfigError(f"max_decoy_cell_ratio must be at least 1, got {self.max_decoy_cell_ratio}")
        server = origin(self.server, "server")
        parts = urlsplit(self.server)
        if parts.query or parts.fragment or self.server.endswith(("?", "#")):
            raise ConfigError(f"server {self.server!r} must not carry a query or fragment: the API paths follow it")
        if self.gateway_keys_url:
            origin(self.gateway_keys_url, "gateway_keys_url")
        # A relay is there to hide the device's address from the server: one at the server's own origin
        # hides nothing, and the key fetched through it would be pinned as if it came through a relay.
        if self.relay and origin(self.relay, "relay") == server:
            raise ConfigError(f"relay {self.relay!r} is the server itself ({_spell(server)}): the server would see "
                              "this device's address; give a separate Oblivious HTTP relay, or no relay")

    def model_path(self) -> Path:
        """The extractor's file: ``model`` as a path, or the file registered under that name."""
        if not self.model:
            return default_model_path()
        if registry.is_name(self.model):
            return registry.resolve(self.model, Path(self.model_dir).expanduser() if self.model_dir
                                    else default_model_dir())
        return Path(self.model).expanduser()

    def shared_origin(self) -> str:
        """Where the consistency check reads the shared copies (``scheme://host:port``); "" = no check."""
        if not self.consistency:
            return ""
        parts = urlsplit(self.consistency_url or self.relay)
        return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""

    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser() if self.state_dir else Path.home() / ".enfpire"


#: The port part of a URL's authority: digits only (``urlsplit`` alone also takes "+80" or " 80").
_PORT = re.compile(r"(?:\[[^\]]*\]|[^:\[\]]*)(?::([0-9]*))?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str, name: str = "url") -> tuple[str, str, int]:
    """The origin ``(scheme, host, port)`` of ``url``, which must be an ``http(s)://`` URL with a host and,
    if any, a port in 1-65535; a one-line :class:`ConfigError` naming ``name`` otherwise.

    Scheme and host are lower-cased, an IP address written canonically and the default port filled in,
    so two spellings of one origin compare equal. Host names are not resolved: ``localhost`` and
    ``127.0.0.1`` are different origins here.
    """
    if not isinstance(url, str) or not url:
        raise ConfigError(f"{name} must be an http:// or https:// URL, got {url!r}")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ConfigError(f"{name} {url!r} holds a space or control character")
    try:
        parts = urlsplit(url)
        port = parts.port  # out of range or not a number: ValueError
    except ValueError as exc:  # also a bad IPv6 literal
        raise ConfigError(f"{name} {url!r} is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not url[len(scheme) + 1:].startswith("//"):
        hint = "" if "://" in url or url.lower().startswith(("http:", "https:")) else f" (did you mean 'http://{url}'?)"
        raise ConfigError(f"{name} must be an http:// or https:// URL, got {url!r}{hint}")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ConfigError(f"{name} {url!r} has no host")
    if _PORT.fullmatch(parts.netloc.rpartition("@")[2]) is None or port == 0:
        raise ConfigError(f"{name} {url!r} is not a valid URL: the port must be a number in 1-65535")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        try:
            host.encode("idna")  # what the connection will do: an empty or over-long label fails there
        except UnicodeError:
            raise ConfigError(f"{name} {url!r} is not a valid URL: {host!r} is not a host name") from None
    return scheme, host, port or _DEFAULT_PORTS[scheme]


def _spell(where: tuple[str, str, int]) -> str:
    scheme, host, port = where
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def load_config(
    cls: type[T],
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> T:
    """Build ``cls`` from its defaults, a JSON ``path``, ``ENFPIRE_*`` variables
    in ``env`` (default ``os.environ``) and ``overrides`` whose value is not None."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if path:
        values.update(read_settings(Path(path)))
    env = os.environ if env is None else env
    for name in fields:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = raw
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    coerced = {k: _coerce(k, v, str(fields[k].type)) for k, v in values.items()}
    return cls(**coerced)


def read_settings(path: Path) -> dict[str, Any]:
    """The settings a JSON config file holds (an object of field names), unchecked: a ConfigError when
    the file cannot be read or holds something else."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return data


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """Turn a file or environment value into the field's declared type."""
    optional = "None" in annotation
    base = annotation.replace("| None", "").replace("None |", "").strip()
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("", "none")):
        if optional:
            return None
        raise ConfigError(f"{name} must not be empty")
    try:
        if base == "bool":
            return _to_bool(value)
        if base == "int" and not isinstance(value, bool):
            return int(value)
        if base == "float" and not isinstance(value, bool):
            return float(value)
        if base == "str":
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{name}: {value!r} is not a valid {base}")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)
