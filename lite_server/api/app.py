"""The Flask application: an app factory and the versioned JSON API.

    GET  /healthz          alive
    GET  /readyz           index loaded, with its counts
    GET  /v1/info          what a client needs before it asks
    POST /v1/candidates    a transformed query in, candidate spots out
    GET  /v1/public        the public parameters of the index version (?since=DIGEST: a delta)
    GET  /openapi.json     the description of all of the above
    GET  /.well-known/enfpire-public   the public document's digest alone, for relays and mirrors to share
    GET  /.well-known/ohttp-gateway, POST /ohttp   Oblivious HTTP (lite_server.ohttp.gateway)
"""
from __future__ import annotations

import gzip
import json
import logging
import threading
from typing import Any

import numpy as np
from flask import Flask, Response, jsonify, request

from edge_client.protocol import wire
from edge_client.protocol.public import SHARED_PATH

from ..config import ServerConfig
from ..errors import ApiError, register_error_handlers
from ..index.store import Index
from ..search.lookup import Lookup
from ..search.publication import Publisher, document
from .admission import Admission, install_admission
from .openapi import MAX_SCALE, spec

log = logging.getLogger(__name__)
PROTOCOL = 1
GZIP_MIN_BYTES = 1024
EXTENSION = "enfpire"
#: What every phone must see the same of, so caches (relays, mirrors) may keep one copy for all:
#: the public document's digest and the OHTTP key configuration. Everything else is no-store.
SHARED = {SHARED_PATH: "public, max-age=60", "/.well-known/ohttp-gateway": "public, max-age=60"}


class Service:
    """The loaded index and its lookup; swapped whole, so a request sees one version."""

    def __init__(self, config: ServerConfig, index: Index | None = None, lookup: Lookup | None = None):
        self.config = config
        self._lock = threading.Lock()
        self.publisher = Publisher()
        self.ohttp = False  # the Oblivious HTTP gateway is served (set by _install_ohttp)
        self.lookup: Lookup | None = lookup
        if lookup is None and (index is not None or config.index):
            self.load(index or Index.load(config.index))

    def load(self, index: Index) -> Lookup:
        lookup = Lookup(index, self.config)
        document(lookup)  # built (and kept beside the index, for later deltas) before the first phone asks
        with self._lock:
            self.lookup = lookup
        log.info("serving index version %s (%d spots, %d photos)", index.version,
                 len(index.spots), len(index.photo_spot))
        return lookup

    def ready(self) -> Lookup:
        lookup = self.lookup
        if lookup is None:
            raise ApiError(503, "not_ready", "no index is loaded yet", retry_after=1)
        return lookup


def create_app(config: ServerConfig | None = None, index: Index | None = None, lookup: Lookup | None = None) -> Flask:
    """Build the app for ``config`` (default: :class:`ServerConfig` defaults), loading its index once.

    ``index`` or a ready ``lookup`` may be handed in (tools that already hold one).
    """
    config = config or (lookup.config if lookup else ServerConfig())
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=config.max_body)
    app.json.sort_keys = False  # Flask 2.3 removed JSON_SORT_KEYS: the provider holds it
    app.extensions[EXTENSION] = Service(config, index, lookup)
    register_error_handlers(app)
    app.register_blueprint(_routes())
    if config.log_peers:
        app.before_request(_log_peer)
    app.after_request(_no_identifiers)
    app.after_request(_gzip)
    install_admission(app, Admission(config.threads, config.max_pending, config.queue_timeout, config.retry_after))
    _install_ohttp(app, config)
    return app


def _install_ohttp(app: Flask, config: ServerConfig) -> None:
    """The Oblivious HTTP gateway (``lite_server.ohttp.gateway``) when the ``ohttp`` extra is installed."""
    try:
        from ..ohttp.gateway import EXTENSION as GATEWAY
        from ..ohttp.gateway import install_gateway
    except ImportError as exc:
        log.warning("no Oblivious HTTP gateway: %s (pip install 'enfpire[ohttp]')", exc)
        return
    install_gateway(app, config)
    app.extensions[EXTENSION].ohttp = GATEWAY in app.extensions


def _log_peer() -> None:
    """``log_peers`` (off by default): each request's peer address, to show what the server sees."""
    inside = " inside OHTTP" if request.environ.get("enfpire.ohttp") else ""
    log.info("peer %s: %s %s%s", request.remote_addr, request.method, request.path, inside)


def service() -> Service:
    from flask import current_app

    return current_app.extensions[EXTENSION]  # type: ignore[no-any-return]


def _no_identifiers(response: Response) -> Response:
    """Nothing that could link one request to the next: no cookies, no caching (but of :data:`SHARED`)."""
    response.headers.pop("Set-Cookie", None)
    shared = SHARED.get(request.path) if response.status_code == 200 and request.method == "GET" else None
    response.headers["Cache-Control"] = shared or "no-store"
    return response


def _gzip(response: Response) -> Response:
    """Compress large JSON answers for clients that accept gzip.

    Candidate features travel as base64, which gzip packs back to close to
    their raw size, and the spots' info is text: together about a third of
    the bytes a phone pays for on its data plan.
    """
    if (response.status_code != 200 or response.direct_passthrough or response.mimetype != "application/json"
            or "Content-Encoding" in response.headers
            or "gzip" not in request.headers.get("Accept-Encoding", "")):
        return response
    data = response.get_data()
    if len(data) < GZIP_MIN_BYTES:
        return response
    response.set_data(gzip.compress(data, compresslevel=6, mtime=0))
    response.headers["Content-Encoding"] = "gzip"
    response.headers["Vary"] = "Accept-Encoding"
    return response


def _routes() -> Any:
    from flask import Blueprint

    api = Blueprint("api", __name__)

    @api.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    @api.get("/readyz")
    def readyz() -> Response:
        index = service().ready().index
        return jsonify({"status": "ready", "index_version": index.version,
                        "n_spots": len(index.spots), "n_photos": int(len(index.photo_spot))})

    @api.get("/v1/info")
    def info() -> Response:
        return jsonify(info_payload(service()))

    @api.post("/v1/candidates")
    def candidates() -> Response:
        svc = service()
        lookup = svc.ready()
        query = parse_candidates(_json_body(), lookup.index.dim, svc.config.max_k, lookup.n_cells)
        if "cells" in query:
            rows = lookup.spots_in_cells(query["cells"])
        else:
            rows = lookup.nearest_spots(query["vector"][np.newaxis], query["k"])[0]
        # Assembled from per-spot cached JSON: encoding ~1 MB of base64 anew cost ~13 ms a request.
        body = f'{{"index_version":{json.dumps(lookup.index.version)},"candidates":{lookup.candidates_json(rows)}}}'
        return Response(body, mimetype="application/json")

    @api.get("/v1/public")
    def public() -> Response:
        svc = service()
        text, packed = svc.publisher.answer(svc.ready(), request.args.get("since", "")[:200] or None)
        if "gzip" not in request.headers.get("Accept-Encoding", ""):
            return Response(text, mimetype="application/json")
        response = Response(packed, mimetype="application/json")  # compressed once, not per phone
        response.headers.update({"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
        return response

    @api.get(SHARED_PATH)
    def shared_public() -> Response:
        """The public document's digest alone: the resource relays and mirrors keep one copy of for
        every phone, which phones compare their own document with (docs/ohttp.md)."""
        lookup = service().ready()
        return jsonify({"index_version": lookup.index.version, "digest": document(lookup).digest})

    @api.get("/openapi.json")
    def openapi() -> Response:
        svc = service()
        lookup = svc.lookup
        if lookup is None:
            return jsonify(spec(ohttp=svc.ohttp))
        return jsonify(spec(lookup.index.dim, svc.config.max_k, lookup.n_cells, ohttp=svc.ohttp))

    return api


def info_payload(svc: Service) -> dict[str, Any]:
    lookup = svc.ready()
    index, config = lookup.index, svc.config
    return {
        "protocol": PROTOCOL,
        "model_sha256": index.model_sha256, "model_file": index.manifest.get("model_file"),
        "dim": index.dim, "n_spots": len(index.spots), "n_photos": int(len(index.photo_spot)),
        "index_version": index.version, "feature_dtype": config.feature_dtype,
        "limits": {"max_k": config.max_k, "max_body": config.max_body,
                   "features_per_spot": config.features_per_spot},
        "query_kinds": ["vector", "cells"],
        "public": {"index_version": index.version, "digest": document(lookup).digest},
        "calibration": lookup.calibration,
        **_gateway_keys(),
    }


def _gateway_keys() -> dict[str, str]:
    """The gateway's key configurations as it serves them (hex), stated inside the sealed channel too:
    the phone compares them with the relay's shared copy (the consistency check, docs/ohttp.md)."""
    from flask import current_app

    try:
        from ..ohttp.gateway import EXTENSION as OHTTP
    except ImportError:  # no ohttp extra: no gateway
        return {}
    keys = current_app.extensions.get(OHTTP)
    return {"ohttp_keys": keys.body().hex()} if keys is not None else {}


def _json_body() -> dict[str, Any]:
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send the request as application/json")
    raw = request.get_data(cache=False)  # over max_body: Werkzeug raises 413 here
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


def parse_candidates(body: dict[str, Any], dim: int, max_k: int, n_cells: int) -> dict[str, Any]:
    """Validate a candidates request: either ``vector`` (``dim`` finite values) with
    ``1 <= k <= max_k``, or ``cells`` (distinct cell ids). ``pad`` is ignored."""
    unknown = set(body) - {"vector", "k", "cells", "pad"}
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    if not isinstance(body.get("pad", ""), str):
        raise ApiError(400, "bad_pad", "pad must be a string")
    if ("vector" in body) == ("cells" in body):
        raise ApiError(400, "missing_field", "the query needs exactly one of 'vector' or 'cells'")
    if "cells" in body:
        if "k" in body:
            raise ApiError(400, "unknown_field", "k goes with a vector query, not with cells")
        return {"cells": _cells(body["cells"], n_cells)}
    k = wire.integer(body.get("k"))  # 3.0 is an integer to JSON Schema, so here too
    if k is None:
        raise ApiError(400, "bad_k", "k must be an integer")
    if not 1 <= k <= max_k:
        raise ApiError(400, "bad_k", f"k must be between 1 and {max_k}")
    try:
        vector = wire.decode(body["vector"], expect_dim=dim, max_scale=MAX_SCALE)
    except wire.WireError as exc:
        raise ApiError(400, "bad_vector", str(exc)) from None
    if vector.size != dim:
        raise ApiError(400, "bad_vector", f"send one vector of dimension {dim}")
    # Spots rank by cosine: scaled to unit length (in float64) so that huge finite values
    # (a uint8 code times a scale near float32's limit) cannot overflow the scores.
    vector = vector.reshape(dim).astype(np.float64)
    norm = float(np.linalg.norm(vector))
    return {"vector": (vector / norm if norm > 0 else vector).astype(np.float32), "k": k}


def _cells(cells: Any, n_cells: int) -> list[int]:
    """Cell ids as ints: integers in JSON Schema's sense, so ``0.0`` is cell 0 (``true`` is no cell)."""
    ids = [wire.integer(c) for c in cells] if isinstance(cells, list) and 0 < len(cells) <= n_cells else []
    valid = [c for c in ids if c is not None and 0 <= c < n_cells]
    if not valid or len(valid) != len(ids):
        raise ApiError(400, "bad_cells", f"cells must be a non-empty list of distinct cell ids in [0, {n_cells})")
    if len(set(valid)) != len(valid):
        raise ApiError(400, "bad_cells", "cells must be distinct")
    return valid
