"""The Oblivious HTTP gateway (RFC 9458): the server's side of phone -> relay -> server.

    GET  /.well-known/ohttp-gateway   the key configurations (application/ohttp-keys)
    GET  /.well-known/enfpire-keys    the same, the announced next key and the public document's
                                      digest, signed by the server's identity (JSON)
    POST /ohttp                       message/ohttp-req in, message/ohttp-res out

A request arrives from a relay, so the server sees the relay's address, never
the phone's. The gateway opens it and runs the inner request (method, path,
content type, body and whether gzip is accepted; no other header crosses)
through this same Flask app's WSGI stack, so it meets exactly the routes, JSON errors, body limit and
admission control of a direct request. The outer request is not gated by
admission (``lite_server.api.admission.GATED`` lists only the lookup): the inner
one takes its own slot, so one request never holds two and nothing deadlocks.
A large answer is gzipped inside the sealed message when the phone accepts it
(``Content-Encoding`` travels in the binary HTTP response), as it would be
direct; the outer ``message/ohttp-res`` is never compressed again.

A malformed, truncated, tampered, oversized or unknown-key request gets a JSON
400 (413 when over the size limit) and touches nothing else.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Response as WerkzeugResponse

from edge_client.errors import ConfigError, EncapsulationError
from edge_client.protocol import bhttp
from edge_client.protocol.identity import SIGNED_KEYS_PATH
from edge_client.protocol.ohttp import KEYS_TYPE, REQUEST_TYPE, RESPONSE_TYPE, decapsulate_request, encapsulate_response

from ..config import ServerConfig
from ..errors import ApiError
from .keys import GatewayKeys, ServerIdentity, default_path

log = logging.getLogger(__name__)
GATEWAY_PATH = "/ohttp"
KEYS_PATH = "/.well-known/ohttp-gateway"
#: Bytes an encapsulated request may carry beyond ``max_body``: HPKE header, key, tag and binary HTTP framing.
OVERHEAD = 1024
EXTENSION = "enfpire.ohttp"
SERVICE_EXTENSION = "enfpire"  # lite_server.api.app.EXTENSION (not imported: the app imports this module)
#: Inner answer headers that cross back to the phone.
ANSWER_HEADERS = ("Content-Type", "Content-Encoding", "Retry-After")


def keys_path(config: ServerConfig) -> Path | None:
    """Where the gateway's keys live: ``ohttp_keys``, else beside the index; None = no gateway."""
    if config.ohttp_keys.strip().lower() == "off":
        return None
    if config.ohttp_keys:
        return Path(config.ohttp_keys).expanduser()
    return default_path(config.index) if config.index else None


def install_gateway(app: Flask, config: ServerConfig) -> None:
    """Serve the gateway on ``app`` when it has a key file (created here on first start)."""
    path = keys_path(config)
    if path is None:
        return
    try:
        keys = GatewayKeys(path, config.ohttp_grace, config.ohttp_rotate_days * 86400)
    except OSError as exc:
        raise ConfigError(f"cannot create or read the OHTTP key file {path} ({exc.strerror}): "
                          "set ohttp_keys (--ohttp-keys) to a writable place, or 'off'") from None
    if keys.rotate_after > 0:
        keys.start()  # rotates on time even when no request comes
    app.extensions[EXTENSION] = keys
    app.register_blueprint(_routes())


def server_identity(app: Flask) -> ServerIdentity | None:
    """The server's identity (``sign_digest``, ``public_hex``) when ``app`` runs the gateway."""
    keys = app.extensions.get(EXTENSION)
    return keys.identity if keys is not None else None


def _keys() -> GatewayKeys:
    return current_app.extensions[EXTENSION]  # type: ignore[no-any-return]


def _routes() -> Blueprint:
    gateway = Blueprint("ohttp", __name__)

    @gateway.get(KEYS_PATH)
    def key_configs() -> Response:
        return Response(_keys().body(), mimetype=KEYS_TYPE)

    @gateway.get(SIGNED_KEYS_PATH)
    def signed_key_configs() -> Response:
        document: dict[str, Any] = dict(_keys().signed())
        public = _public_digest()
        if public is not None:
            document["public"] = public
        return Response(json.dumps(document), mimetype="application/json")

    @gateway.post(GATEWAY_PATH)
    def oblivious() -> Response:
        if request.mimetype != REQUEST_TYPE:
            raise ApiError(415, "unsupported_media_type", f"send the request as {REQUEST_TYPE}")
        request.max_content_length = current_app.config["MAX_CONTENT_LENGTH"] + OVERHEAD
        try:
            message, context = decapsulate_request(request.get_data(cache=False), _keys().private_keys())
            inner = bhttp.decode_request(message)
        except EncapsulationError as exc:
            raise ApiError(400, exc.code, str(exc)) from None
        answer = dispatch(current_app._get_current_object(), inner)  # type: ignore[attr-defined]
        return Response(encapsulate_response(context, bhttp.encode_response(answer)), mimetype=RESPONSE_TYPE)

    return gateway


def _public_digest() -> dict[str, str] | None:
    """The loaded public document's digest, signed by the identity (None before an index is loaded)."""
    from ..search.publication import document

    lookup = getattr(current_app.extensions.get(SERVICE_EXTENSION), "lookup", None)
    if lookup is None:
        return None
    digest = document(lookup).digest
    return {"index_version": lookup.index.version, "digest": digest, "signature": _keys().identity.sign_digest(digest)}


def _inner_headers(inner: bhttp.Request) -> dict[str, str]:
    """Only ``Accept-Encoding: gzip`` crosses besides the content type: the answer is then gzipped
    inside the sealed message (``Content-Encoding`` travels in the binary HTTP response)."""
    headers = {"Accept": "application/json"}
    if "gzip" in inner.header("accept-encoding"):
        headers["Accept-Encoding"] = "gzip"
    return headers


def dispatch(app: Flask, inner: bhttp.Request) -> bhttp.Response:
    """Run ``inner`` through ``app`` as if it had arrived directly, from the relay's address."""
    path = inner.path.split("?", 1)[0]
    if inner.method not in ("GET", "POST") or not path.startswith("/") or path in (GATEWAY_PATH, KEYS_PATH):
        raise ApiError(400, "bad_inner_request", "the inner request must be a GET or POST of an API path")
    content_type = inner.header("content-type") or None
    environ = EnvironBuilder(path=inner.path, method=inner.method, data=inner.content if inner.content else None,
                             content_type=content_type,
                             environ_base={"REMOTE_ADDR": request.remote_addr or "", "enfpire.ohttp": True},
                             headers=_inner_headers(inner)).get_environ()
    with app.app_context():  # its own flask.g: the admission slot is the inner request's
        answer = WerkzeugResponse.from_app(app.wsgi_app, environ, buffered=True)
    headers = tuple((name.lower(), answer.headers[name]) for name in ANSWER_HEADERS if name in answer.headers)
    return bhttp.Response(answer.status_code, headers, answer.get_data())

