"""The OpenAPI 3.1 description of the API, served at ``/openapi.json``.

Tests validate real responses against these schemas, so the document cannot
drift from what the server does.
"""
from __future__ import annotations

from typing import Any

MATRIX = {
    "type": "object", "required": ["dtype", "shape", "data"],
    "properties": {
        "dtype": {"enum": ["float16", "float32", "uint8", "int8"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "maxItems": 2},
        "data": {"type": "string", "description": "base64 of the little-endian values"},
        "scale": {"oneOf": [{"type": "number", "exclusiveMinimum": 0},
                            {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}}],
                  "description": "uint8: one scale, value = q * scale; int8: one scale per row"},
    },
}
ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"],
                             "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}},
}
CANDIDATE = {
    "type": "object", "required": ["id", "name", "lat", "lon", "info", "features"],
    "properties": {
        "id": {"type": "string"}, "name": {"type": "string"},
        "lat": {"type": ["number", "null"]}, "lon": {"type": ["number", "null"]},
        "info": {"type": "object", "additionalProperties": {"type": "string"}},
        "features": {"$ref": "#/components/schemas/Matrix"},
    },
}
SCHEMAS: dict[str, Any] = {
    "Matrix": MATRIX,
    "Error": ERROR,
    "Candidate": CANDIDATE,
    "CandidatesRequest": {
        "type": "object", "additionalProperties": False,
        "properties": {
            "vector": {"$ref": "#/components/schemas/Matrix"},
            "cells": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "k": {"type": "integer", "minimum": 1},
            "pad": {"type": "string", "description": "ignored; makes every request one size"},
        },
    },
    "CandidatesResponse": {
        "type": "object", "required": ["index_version", "candidates"],
        "properties": {"index_version": {"type": "string"},
                       "candidates": {"type": "array", "items": {"$ref": "#/components/schemas/Candidate"}}},
    },
    "Info": {
        "type": "object",
        "required": ["protocol", "model_sha256", "dim", "n_spots", "index_version", "limits", "transforms"],
        "properties": {
            "protocol": {"type": "integer"}, "model_sha256": {"type": "string"}, "dim": {"type": "integer"},
            "n_spots": {"type": "integer"}, "n_photos": {"type": "integer"},
            "index_version": {"type": "string"}, "feature_dtype": {"type": "string"},
            "limits": {"type": "object", "required": ["max_k", "max_body"]},
            "query_kinds": {"type": "array", "items": {"type": "string"}},
            "transforms": {"type": "object", "description": "public parameters of the privacy transforms"},
        },
    },
    "Catalogue": {
        "type": "object", "required": ["index_version", "dim", "spots", "spread"],
        "properties": {
            "index_version": {"type": "string"}, "dim": {"type": "integer"},
            "spots": {"type": "array", "items": {"allOf": [
                {"$ref": "#/components/schemas/Candidate"},
                {"type": "object", "required": ["popularity"],
                 "properties": {"popularity": {"type": "number", "minimum": 0,
                                               "description": "share of the gallery's photos"}}}]}},
            "spread": {"type": "object", "required": ["cos_median", "log_tan_sigma"],
                       "description": "leave-one-out spread of photos around their spot's mean",
                       "properties": {"cos_median": {"type": "number"}, "log_tan_sigma": {"type": "number"},
                                      "n": {"type": "integer"}}},
        },
    },
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
    "Ready": {"type": "object", "required": ["status", "index_version", "n_spots", "n_photos"]},
}


def _json(schema: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _op(summary: str, ok: str, errors: tuple[int, ...] = ()) -> dict[str, Any]:
    responses = {"200": {"description": "OK", **_json(ok)}}
    responses.update({str(code): {"description": "error", **_json("Error")} for code in errors})
    return {"summary": summary, "responses": responses}


def _binary(media_type: str, description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {media_type: {"schema": {"type": "string", "contentMediaType": media_type}}}}


def _ohttp_paths() -> dict[str, Any]:
    """Oblivious HTTP (RFC 9458): the key configurations and the gateway (``lite_server.ohttp``)."""
    errors = {str(code): {"description": "error", **_json("Error")} for code in (400, 413, 415)}
    return {
        "/.well-known/ohttp-gateway": {"get": {
            "summary": "The gateway's key configurations, current key first (RFC 9458 section 3)",
            "responses": {"200": _binary("application/ohttp-keys", "each key configuration with a 2-byte length")}}},
        "/ohttp": {"post": {
            "summary": "Oblivious HTTP gateway: an encapsulated binary HTTP request to any route above, "
                       "answered as an encapsulated binary HTTP response (the inner status inside); "
                       "400 with code ohttp_key for an unknown key or algorithm, bad_ohttp_message when "
                       "it does not parse or decrypt; 413 over max_body plus 1024 bytes",
            "requestBody": {"required": True, **_binary("message/ohttp-req", "encapsulated request")},
            "responses": {"200": _binary("message/ohttp-res", "encapsulated response"), **errors}}},
    }


def spec() -> dict[str, Any]:
    """The whole document."""
    candidates = _op("Candidate spots for a transformed query", "CandidatesResponse", (400, 413, 415, 503))
    candidates["requestBody"] = {"required": True, **_json("CandidatesRequest")}
    return {
        "openapi": "3.1.0",
        "info": {"title": "EnfPire lite_server", "version": "1"},
        "paths": {
            "/healthz": {"get": _op("Liveness", "Health")},
            "/readyz": {"get": _op("Readiness: index loaded", "Ready", (503,))},
            "/v1/info": {"get": _op("Model, index, limits and public transform parameters", "Info", (503,))},
            "/v1/candidates": {"post": candidates},
            "/v1/spots": {"get": _op("Public spot catalogue for dummy requests", "Catalogue", (503,))},
            **_ohttp_paths(),
        },
        "components": {"schemas": SCHEMAS},
    }
