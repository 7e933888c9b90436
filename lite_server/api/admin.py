"""The admin API: reload the index and add or remove spots on a running server.

Security model (see README, "Security and operations"):

- Off unless ``admin_token`` (``ENFPIRE_ADMIN_TOKEN``) is set; tokens shorter
  than :data:`MIN_TOKEN` characters are refused at start-up.
- A separate Flask app on its own listener (``admin_host:admin_port``,
  127.0.0.1 by default). The lookup app has no admin routes at all, so the
  lookup port answers 404 to every admin path, token or not.
- Every request needs ``Authorization: Bearer <token>``: 401 without one,
  403 with a wrong one; tokens are compared with :func:`hmac.compare_digest`.

Routes::

    GET  /admin/v1/status        serving version, counts, queue
    POST /admin/v1/reload        switch to the index directory's current version
    POST /admin/v1/spots         {"photos": dir, "spots_csv": file?}: add, publish, switch
    POST /admin/v1/spots/remove  {"ids": [...]}: remove, publish, switch
"""
from __future__ import annotations

import hmac
import logging
import threading
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request

from edge_client.config import ClientConfig
from edge_client.errors import ConfigError, EnfPireError
from edge_client.vision.extractor import Extractor

from ..config import ServerConfig
from ..errors import ApiError, register_error_handlers
from ..index.structure import StructureParams
from .app import Service, _json_body, _no_identifiers
from .updates import add_spots, reload_service, remove_spots

log = logging.getLogger(__name__)
MIN_TOKEN = 16
_extractor_lock = threading.Lock()


def check_token(config: ServerConfig) -> None:
    """Refuse a configured token too short to resist guessing."""
    if config.admin_token and len(config.admin_token) < MIN_TOKEN:
        raise ConfigError(f"admin_token must have at least {MIN_TOKEN} characters")


def create_admin_app(service: Service) -> Flask:
    """The admin app over ``service`` (the lookup app's), for its own listener."""
    config = service.config
    if not config.admin_token:
        raise ConfigError("the admin API is off: set admin_token (ENFPIRE_ADMIN_TOKEN)")
    check_token(config)
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=config.max_body)
    app.extensions["enfpire"] = service
    register_error_handlers(app)
    app.register_blueprint(_routes(service))
    app.after_request(_no_identifiers)
    return app


def authorize(header: str | None, token: str) -> None:
    """401 without a Bearer credential, 403 with the wrong one; constant-time comparison."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(401, "unauthorized", "send Authorization: Bearer <admin token>")
    if not hmac.compare_digest(given.strip().encode("utf-8", "surrogatepass"),
                               token.encode("utf-8", "surrogatepass")):
        raise ApiError(403, "forbidden", "the admin token is not valid")


def _routes(service: Service) -> Blueprint:
    admin = Blueprint("admin", __name__, url_prefix="/admin/v1")
    extractor: list[Extractor] = []

    @admin.before_request
    def _auth() -> None:
        authorize(request.headers.get("Authorization"), service.config.admin_token)

    @admin.get("/status")
    def status() -> Response:
        return jsonify(_status(service))

    @admin.post("/reload")
    def reload() -> Response:
        return jsonify(_switch(service))

    @admin.post("/spots")
    def add() -> Response:
        body = _fields(_json_body(), {"photos"}, {"spots_csv"})
        photos, csv = _path(body["photos"], dir=True), body.get("spots_csv")
        index = _guard(lambda: add_spots(Path(service.config.index), photos, _extractor(service, extractor),
                                         _path(csv, dir=False) if csv is not None else None,
                                         params=StructureParams.from_config(service.config)))
        log.info("admin: added photos, index version %s", index.version)
        return jsonify({**_switch(service), "n_spots": len(index.spots), "n_photos": int(len(index.photo_spot))})

    @admin.post("/spots/remove")
    def remove() -> Response:
        ids = _fields(_json_body(), {"ids"}, set())["ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise ApiError(400, "bad_ids", "ids must be a non-empty list of spot ids")
        index = _guard(lambda: remove_spots(Path(service.config.index), ids,
                                            StructureParams.from_config(service.config)))
        log.info("admin: removed %d spot(s), index version %s", len(ids), index.version)
        return jsonify({**_switch(service), "n_spots": len(index.spots), "n_photos": int(len(index.photo_spot))})

    return admin


def _status(service: Service) -> dict[str, Any]:
    index = service.ready().index
    return {"index_version": index.version, "n_spots": len(index.spots), "n_photos": int(len(index.photo_spot))}


def _switch(service: Service) -> dict[str, Any]:
    switched, version = _guard(lambda: reload_service(service))
    return {"switched": switched, "index_version": version}


def _guard(call: Any) -> Any:
    """Run an index operation; its deliberate failures become 400s naming the problem."""
    try:
        return call()
    except EnfPireError as exc:
        raise ApiError(400, "update_refused", str(exc)) from None


def _fields(body: dict[str, Any], required: set[str], optional: set[str]) -> dict[str, Any]:
    unknown, missing = set(body) - required - optional, required - set(body)
    if unknown or missing:
        raise ApiError(400, "bad_fields", f"expected {sorted(required)} and optionally {sorted(optional)}")
    return body


def _path(value: Any, dir: bool) -> Path:
    try:
        path = Path(value) if isinstance(value, str) and value else None
        found = path is not None and (path.is_dir() if dir else path.is_file())
    except (OSError, ValueError):  # a name too long, a NUL byte
        found = False
    if not found:
        raise ApiError(400, "bad_path", f"{'a folder' if dir else 'a file'} on the server is expected")
    return path  # type: ignore[return-value]


def _extractor(service: Service, cache: list[Extractor]) -> Extractor:
    """The server's extractor, built on first use (most servers never add spots)."""
    with _extractor_lock:
        if not cache:
            model = Path(service.config.model) if service.config.model else ClientConfig().model_path()
            cache.append(Extractor(model, num_threads=1))
        return cache[0]
