"""Entry points for an Android app through Chaquopy.

Plain functions over primitives only (bytes, str, numbers, JSON strings), so
Kotlin can call them with ``module.callAttr(...)`` and read the result with
``toString()``. They never raise: every answer is a JSON object with
``"ok": true`` and the result, or ``"ok": false`` and an ``error`` with its
``type`` and ``message``. No multiprocessing; files only under ``$HOME``
(Chaquopy points it at the app's private files directory).

A camera frame goes to :func:`recognize_frame` as its raw buffer (CameraX
``ImageAnalysis`` at 640x480): no JPEG is encoded or decoded on the way.

An app that runs the model itself (its own TFLite or NNAPI runtime: Chaquopy
often has no usable interpreter) hands the feature to :func:`recognize_feature`;
that path never builds an extractor.

Oblivious HTTP: ``config_json`` may carry ``relay`` (the relay's URL) and
``gateway_keys`` (the gateway's key configuration, best shipped with the app,
or its sha256); the key pin is kept in ``$HOME/.enfpire/ohttp-pins.json``.

Privacy floors (``min_cell_spots``, ``min_cells``, ``max_decoy_share``,
``decoy_uniform``, ``max_decoy_cell_ratio`` in ``config_json``): a server whose
public document is below them gets no request beyond ``/v1/info`` and
``/v1/public``, and the app gets ``{"ok": false, "error": {"type":
"PrivacyFloorError", "message": ...}}`` naming the floor and the value.

Every answer carries the query's privacy receipt as ``"privacy"``
(:mod:`edge_client.privacy.receipt`: ``plausible_spots``,
``server_top1_probability``, ``answer_probability``, ``cells_sent``,
``request_sent``), computed on the phone and never sent; ``privacy_floor`` in
``config_json`` asks for at least that many plausible spots (decoy groups are
added up to ``privacy_floor_groups``).
"""
from __future__ import annotations

import json
import threading
from typing import Any, Callable

import numpy as np

from .client import Client
from .config import ClientConfig, load_config
from .dummies.generator import PersonaGenerator
from .dummies.scheduler import DummyScheduler
from .errors import EnfPireError, FeatureError, IncompatibleServerError, ModelError, ModelNotFoundError
from .vision.extractor import Extractor, file_sha256, l2_normalize
from .vision.frame import Frame
from .vision.photo import Photo

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


class AppModel:
    """Stands in for the extractor when the app computes features itself: known only by the
    sha256 of the model file it ran, so the client's model check still compares it with the
    server's, and it never extracts."""

    def __init__(self, sha256: str):
        self.sha256 = sha256

    def extract(self, photo: object) -> np.ndarray:
        raise ModelError("this client was given app-computed features: call recognize_feature")


def _parse_feature(feature_json: str, dim: int) -> np.ndarray:
    """The app's feature as a unit float32 vector of the server's dimension, else a FeatureError."""
    try:
        values = json.loads(feature_json)
    except ValueError as exc:
        raise FeatureError(f"feature_json is not JSON: {exc}") from None
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in values):
        raise FeatureError("feature_json must be a JSON list of numbers")
    feature = np.asarray(values, dtype=np.float32)
    if feature.size != dim:
        raise FeatureError(f"the feature has {feature.size} values, the server's model {dim}")
    if not np.all(np.isfinite(feature)) or not np.any(feature):
        raise FeatureError("the feature must be finite and not all zero")
    return l2_normalize(feature)


def recognize_feature(feature_json: str, server_url: str, config_json: str = "{}",
                      model_sha256: str = "") -> str:
    """Recognize a feature the app computed itself; the JSON of a Recognition, as :func:`recognize_jpeg`.

    ``feature_json`` is a JSON list of floats: the output of the same model the
    server indexed with (normalised here to unit length). ``model_sha256`` is the
    hex sha256 of the ``.tflite`` file the app ran; "" means the file at the
    configuration's ``model`` path (an app that ships the file and runs it with
    its own runtime). The server's model must be the same, else the answer is an
    ``IncompatibleServerError`` and nothing is sent but the ``/v1/info`` lookup;
    with no sha256 and no model file it is a ``ModelNotFoundError``. No extractor
    or interpreter is made; dummies, the answer cache and Oblivious HTTP work as
    for photos."""
    def run() -> dict[str, Any]:
        client = _client(server_url, config_json)
        with _lock:
            sha = model_sha256.strip().lower() or _local_model_sha(client)
            if client.extractor is None or client.extractor.sha256 != sha:
                client.extractor = AppModel(sha)  # type: ignore[assignment]
        info = client.info()
        if info["model_sha256"] != sha:
            raise IncompatibleServerError(
                f"the server uses model {str(info['model_sha256'])[:12]}..., the app's feature came from "
                f"{sha[:12]}...: both must run the same extractor")
        feature = _parse_feature(feature_json, int(info["dim"]))
        if client.config.dummies > 0:
            return _scheduler(client).recognize_feature(feature).to_dict()
        return client.recognize_feature(feature).to_dict()
    return _answer(run)


def _local_model_sha(client: Client) -> str:
    if client.extractor is not None:
        return str(client.extractor.sha256)
    path = client.config.model_path()
    if not path.is_file():
        raise ModelNotFoundError(f"no model_sha256 given and no model file at {path}")
    return file_sha256(path)


def recognize_jpeg(jpeg_bytes: bytes, server_url: str, config_json: str = "{}") -> str:
    """Recognize a photo (JPEG or any image bytes); the JSON of a Recognition.

    With ``dummies`` > 0 in the configuration (the default) the request leaves
    at once, together with its dummy requests, through the client's background
    scheduler; this call returns when the real answer is in, not the dummies'.
    A reduced-size JPEG (a 640x480 thumbnail) decodes several times faster than
    a full 12 MP photo; a camera frame (:func:`recognize_frame`) is cheaper still."""
    return _answer(lambda: _recognize_photo(bytes(jpeg_bytes), server_url, config_json))


def recognize_frame(frame_bytes: bytes, width: int, height: int, pixel_format: str, server_url: str,
                    config_json: str = "{}", row_stride: int = 0, rotation: int = 0) -> str:
    """Recognize an uncompressed camera frame; the JSON of a Recognition, as :func:`recognize_jpeg`.

    Made for CameraX ``ImageAnalysis`` at 640x480: with ``OUTPUT_IMAGE_FORMAT_RGBA_8888``
    pass ``planes[0]``'s bytes, ``pixel_format="rgba"`` and the plane's ``rowStride``;
    ``rotation`` is ``imageInfo.rotationDegrees``. YUV frames may come as ``"nv21"``,
    ``"nv12"`` or ``"i420"``; see :class:`edge_client.vision.frame.Frame`. No JPEG is made or
    decoded, so this is the cheapest way from the camera to an answer."""
    def run() -> dict[str, Any]:
        frame = Frame(bytes(frame_bytes), int(width), int(height), str(pixel_format).lower(), int(row_stride),
                      int(rotation))
        return _recognize_photo(frame, server_url, config_json)
    return _answer(run)


def _recognize_photo(photo: Photo, server_url: str, config_json: str) -> dict[str, Any]:
    client = _client(server_url, config_json)
    with _lock:
        if isinstance(client.extractor, AppModel):  # features came from the app so far: now extract here
            client.extractor = None
    if client.config.dummies > 0:
        return _scheduler(client).recognize(photo).to_dict()
    return client.recognize(photo).to_dict()


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
