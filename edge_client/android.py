"""Entry points for an Android app through Chaquopy.

Plain functions over primitives only (bytes, str, numbers, JSON strings), so
Kotlin can call them with ``module.callAttr(...)`` and read the result with
``toString()``. They never raise: every answer is a JSON object with
``"ok": true`` and the result, or ``"ok": false`` and an ``error`` with its
``type`` and ``message``. No multiprocessing; files only under ``$HOME``
(Chaquopy points it at the app's private files directory).

Oblivious HTTP: ``config_json`` may carry ``relay`` (the relay's URL) and
``gateway_keys`` (the gateway's key configuration, best shipped with the app,
or its sha256); the key pin is kept in ``$HOME/.enfpire/ohttp-pins.json``.
"""
from __future__ import annotations

import json
import threading
from typing import Any, Callable

from .client import Client
from .config import ClientConfig, load_config
from .dummies import PersonaGenerator
from .errors import EnfPireError
from .extractor import Extractor
from .scheduler import DummyScheduler

_clients: dict[str, Client] = {}
_schedulers: dict[int, DummyScheduler] = {}
_lock = threading.Lock()


def _client(server_url: str, config_json: str) -> Client:
    """One client (and one interpreter) per configuration, reused across calls."""
    key = json.dumps([server_url, config_json])
    with _lock:
        if key not in _clients:
            settings = json.loads(config_json or "{}")
            if not isinstance(settings, dict):
                raise EnfPireError("config_json must be a JSON object")
            config = load_config(ClientConfig, env={}, **{**settings, "server": server_url})
            _clients[key] = Client(config)
        return _clients[key]


def _answer(call: Callable[[], dict[str, Any]]) -> str:
    try:
        return json.dumps({"ok": True, **call()})
    except (EnfPireError, ValueError) as exc:
        return json.dumps({"ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}})


def _scheduler(client: Client) -> DummyScheduler:
    """One running dummy scheduler per client: its personas live as long as the app."""
    with _lock:
        if id(client) not in _schedulers:
            _schedulers[id(client)] = DummyScheduler(client, lambda: PersonaGenerator.from_client(client)).start()
        return _schedulers[id(client)]


def recognize_jpeg(jpeg_bytes: bytes, server_url: str, config_json: str = "{}") -> str:
    """Recognize a photo (JPEG or any image bytes); the JSON of a Recognition.

    With ``dummies`` > 0 in the configuration (the default) the request leaves
    at once, together with its dummy requests, through the client's background
    scheduler; this call returns when the real answer is in, not the dummies'."""
    def run() -> dict[str, Any]:
        client = _client(server_url, config_json)
        if client.config.dummies > 0:
            return _scheduler(client).recognize(bytes(jpeg_bytes)).to_dict()
        return client.recognize(bytes(jpeg_bytes)).to_dict()
    return _answer(run)


def dummy_stats(server_url: str, config_json: str = "{}") -> str:
    """How many real and dummy requests this client's scheduler sent, failed or left out for the cap."""
    return _answer(lambda: {"counts": dict(_scheduler(_client(server_url, config_json)).counts)})


def extract_jpeg(jpeg_bytes: bytes, config_json: str = "{}") -> str:
    """The photo's feature as ``{"dim", "feature"}``."""
    def run() -> dict[str, Any]:
        config = load_config(ClientConfig, env={}, **json.loads(config_json or "{}"))
        extractor = Extractor(config.model_path(), config.num_threads, config.max_pixels)
        return {"dim": extractor.dim, "feature": extractor.extract(bytes(jpeg_bytes)).tolist()}
    return _answer(run)


def server_info(server_url: str, config_json: str = "{}") -> str:
    """The server's ``/v1/info``."""
    return _answer(lambda: {"info": _client(server_url, config_json).info(refresh=True)})


def clear_cache(server_url: str, config_json: str = "{}") -> str:
    """Forget the answers and server info kept for ``server_url`` (a privacy setting's "clear" button)."""
    def run() -> dict[str, Any]:
        client = _client(server_url, config_json)
        client.clear_cache()
        return {"cleared": True}
    return _answer(run)


def close_all() -> str:
    """Stop the dummy schedulers and close every cached client (call from the app's onDestroy)."""
    with _lock:
        schedulers = list(_schedulers.values())
        _schedulers.clear()
    for scheduler in schedulers:
        scheduler.stop(drain=True, timeout=60)  # let started bursts finish, whole
    with _lock:
        for client in _clients.values():
            client.close()
        _clients.clear()
    return json.dumps({"ok": True})
