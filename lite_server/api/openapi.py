"""The OpenAPI 3.1 description of the API, served at ``/openapi.json``.

Tests validate real responses against these schemas, so the document cannot
drift from what the server does.
"""
from __future__ import annotations

import math
from typing import Any

from edge_client.privacy.evidence import TERMS
from edge_client.protocol import nibbles

MATRIX = {
    "type": "object", "required": ["dtype", "shape", "data"],
    "properties": {
        "dtype": {"enum": ["float16", "float32", "uint8", "int8", "int4"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "maxItems": 2},
        "data": {"type": "string", "description": "base64 of the little-endian values; int4: two codes -7..7 "
                                                  "a byte, low nibble first, of each row's Hadamard rotation "
                                                  "(rows of a power-of-two length D): row = (codes @ H) * scale "
                                                  "/ sqrt(D), H Sylvester's +-1 matrix (edge_client.protocol.nibbles)"},
        "scale": {"oneOf": [{"type": "number", "exclusiveMinimum": 0},
                            {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}},
                            {"$ref": "#/components/schemas/Array"}],
                  "description": "uint8: one scale, value = q * scale; int8 and int4: one scale per row, "
                                 "a list or (as the server sends them) an exact float16 Array"},
    },
}
ARRAY = {
    "type": "object", "required": ["dtype", "shape", "data"],
    "description": "an exact array: base64 of its little-endian values in its own dtype",
    "properties": {
        "dtype": {"enum": ["float16", "float32", "uint8", "int8", "uint16", "int16", "uint32", "int32"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "maxItems": 2},
        "data": {"type": "string"},
    },
}
CODES = {"allOf": [{"$ref": "#/components/schemas/Array"}, {
    "type": "object", "required": ["scale"], "description": "int8 rows [R, D]: row = codes * scale",
    "properties": {"dtype": {"const": "int8"}, "scale": {"$ref": "#/components/schemas/Array"}}}]}
SPOT_ROWS = {
    "type": "object", "description": "per spot, rows aligned with ids; prototypes and looks are the "
                                     "concatenation of each spot's rows (n_prototypes, n_looks of them)",
    "required": ["ids", "lat", "lon", "cell", "photos", "n_prototypes", "n_looks", "prototypes", "looks"],
    "properties": {"ids": {"type": "array", "items": {"type": "string"}},
                   **{c: {"$ref": "#/components/schemas/Array"} for c in ("lat", "lon", "cell", "photos",
                                                                        "n_prototypes", "n_looks")},
                   "prototypes": {"$ref": "#/components/schemas/Codes"}, "looks": {"$ref": "#/components/schemas/Codes"}},
}
PUBLIC = {
    "type": "object", "required": ["format", "kind", "index_version", "digest", "globals", "spots"],
    "description": "kind full: the whole document; kind delta: what turns the document of base_digest into "
                   "index_version's (drop removed and upserted ids, add the spots rows, take the globals "
                   "sent); digest: sha256 of the resulting document's canonical form (edge_client.protocol.public)",
    "properties": {
        "format": {"const": 1}, "kind": {"enum": ["full", "delta"]}, "index_version": {"type": "string"},
        "base_version": {"type": "string"}, "digest": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "base_digest": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                        "description": "delta: the digest of the document it applies to"},
        "removed": {"type": "array", "items": {"type": "string"}},
        "globals": {"type": "object", "properties": {
            "n_cells": {"type": "integer", "minimum": 0},
            "codec": {"type": "object", "required": ["kind"],
                      "properties": {"kind": {"enum": ["none", "pca", "learned-whitening"]},
                                     "dim": {"type": "integer", "minimum": 1},
                                     "coverage_dim": {"type": "integer", "minimum": 1,
                                                      "description": "rows of coverage_basis, when sent"}}},
            "basis": {"$ref": "#/components/schemas/Array"},
            "coverage_basis": {"$ref": "#/components/schemas/Array",
                               "description": "orthonormal [coverage_dim, D] rows a photo's coverage is measured "
                                              "in (beside a learned whitening); absent: the basis' row space"},
            "spread": {"type": "object", "required": ["cos_median", "log_tan_sigma"],
                       "description": "leave-one-out spread of photos around their spot's mean"}}},
        "spots": {"$ref": "#/components/schemas/SpotRows"},
    },
    "if": {"properties": {"kind": {"const": "delta"}}}, "then": {"required": ["base_version", "base_digest", "removed"]},
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
    "CandidatesResponse": {
        "type": "object", "required": ["index_version", "candidates"],
        "properties": {"index_version": {"type": "string"},
                       "candidates": {"type": "array", "items": {"$ref": "#/components/schemas/Candidate"}}},
    },
    "Info": {
        "type": "object",
        "required": ["protocol", "model_sha256", "dim", "n_spots", "index_version", "limits", "public"],
        "properties": {
            "protocol": {"type": "integer"}, "model_sha256": {"type": "string"}, "dim": {"type": "integer"},
            "n_spots": {"type": "integer"}, "n_photos": {"type": "integer"},
            "index_version": {"type": "string"}, "feature_dtype": {"type": "string"},
            "limits": {"type": "object", "required": ["max_k", "max_body"]},
            "query_kinds": {"type": "array", "items": {"type": "string"}},
            "public": {"type": "object", "required": ["index_version", "digest"],
                       "description": "the digest of this version's public document (GET /v1/public)"},
            "calibration": {"$ref": "#/components/schemas/Calibration"},
            "ohttp_keys": {"type": "string", "pattern": "^([0-9a-f]{2})+$",
                           "description": "the gateway's application/ohttp-keys document (hex), as "
                                          "GET /.well-known/ohttp-gateway serves it; absent without a gateway"},
        },
    },
    "SharedPublic": {
        "type": "object", "required": ["index_version", "digest"],
        "properties": {"index_version": {"type": "string"},
                       "digest": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
    },
    "Calibration": {
        "type": "object",
        "description": "open-set calibration: the weights of the phone's evidence terms and the quantiles of its "
                       "evidence for gallery photos scored leave-one-out that it answers correctly "
                       "(edge_client.privacy.evidence); empty when no spot has two photos",
        "properties": {
            "kind": {"enum": ["leave_one_out_evidence", "leave_one_out_rerank"]},
            "n": {"type": "integer", "minimum": 1},
            "n_unknown": {"type": "integer", "minimum": 0,
                          "description": "gallery photos scored with their spot left out (the fit's unknowns)"},
            "weights": {"type": "object", "required": list(TERMS), "additionalProperties": False,
                        "properties": {t: {"type": "number"} for t in TERMS},
                        "description": "evidence = sum of weight * term over " + ", ".join(TERMS)},
            "coverage_weight": {"type": "number", "minimum": 0,
                                "description": "first kind: evidence = rerank score + coverage_weight * "
                                               "|unit feature inside the basis' row space| (|basis @ unit "
                                               "feature| for a PCA basis)"},
            "levels": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "minItems": 2},
            "scores": {"type": "array", "items": {"type": "number"}, "minItems": 2},
        },
        "dependentRequired": {"kind": ["n", "levels", "scores"]},
    },
    "Array": ARRAY,
    "Codes": CODES,
    "SpotRows": SPOT_ROWS,
    "Public": PUBLIC,
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
    "Ready": {"type": "object", "required": ["status", "index_version", "n_spots", "n_photos"]},
}


#: Values a coded query vector's scale may take: its largest code times it stays a finite float32.
MAX_SCALE = 1e36
PAD = {"type": "string", "description": "ignored; makes every request one size"}


def _base64(n_bytes: int) -> dict[str, Any]:
    """A base64 string of exactly ``n_bytes`` bytes (standard alphabet, padded)."""
    pad = (3 - n_bytes % 3) % 3
    return {"type": "string", "pattern": f"^[A-Za-z0-9+/]{{{4 * math.ceil(n_bytes / 3) - pad}}}={{{pad}}}$"}


def query_vector(dim: int | None) -> dict[str, Any]:
    """One query vector as the server takes it: ``dim`` values of one dtype; uint8 with one scale,
    int8 (and int4, for a power-of-two ``dim``) with a list of one or an exact float16 array of one
    (what ``wire.encode`` writes). Values must be finite, scales positive and int4 codes within -7..7
    too, which JSON Schema cannot say of base64."""
    if dim is None:
        return {"$ref": "#/components/schemas/Matrix"}
    scale = {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SCALE}
    variants = []
    for dtype, size in (("float16", 2), ("float32", 4), ("uint8", 1), ("int8", 1), ("int4", 0.5)):
        if dtype == "int4" and not nibbles.fits(dim):  # 4-bit codes rotate rows of a power-of-two length
            continue
        properties = {"dtype": {"const": dtype}, "shape": {"enum": [[dim], [1, dim]]},
                      "data": _base64(int(dim * size))}
        required = ["dtype", "shape", "data"]
        if dtype == "uint8":
            properties["scale"], required = scale, required + ["scale"]
        if dtype in ("int8", "int4"):
            exact = {"type": "object", "required": ["dtype", "shape", "data"], "properties": {
                "dtype": {"const": "float16"}, "shape": {"const": [1]}, "data": _base64(2)}}
            properties["scale"] = {"oneOf": [{"type": "array", "items": scale, "minItems": 1, "maxItems": 1}, exact]}
            required = required + ["scale"]
        variants.append({"type": "object", "required": required, "properties": properties})
    return {"oneOf": variants,
            "description": "finite values, positive scales and int4 codes -7..7 only (others get 400)"}


def candidates_request(dim: int | None = None, max_k: int | None = None, n_cells: int | None = None) -> dict[str, Any]:
    """Exactly one of a vector query (``vector`` and ``k``) or a cells query (``cells``), as
    ``lite_server.api.app.parse_candidates`` accepts them; the loaded index fills in its limits."""
    k = {"type": "integer", "minimum": 1, **({"maximum": max_k} if max_k else {})}
    cell = {"type": "integer", "minimum": 0, **({"maximum": n_cells - 1} if n_cells else {})}
    cells = {"type": "array", "items": cell, "minItems": 1, "uniqueItems": True,
             **({"maxItems": n_cells} if n_cells else {})}
    return {"oneOf": [
        {"type": "object", "additionalProperties": False, "required": ["vector", "k"],
         "properties": {"vector": query_vector(dim), "k": k, "pad": PAD}},
        {"type": "object", "additionalProperties": False, "required": ["cells"],
         "properties": {"cells": cells, "pad": PAD}},
    ]}


def _json(schema: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _op(summary: str, ok: str, errors: tuple[int, ...] = ()) -> dict[str, Any]:
    responses = {"200": {"description": "OK", **_json(ok)}}
    responses.update({str(code): {"description": "error", **_json("Error")} for code in errors})
    return {"summary": summary, "responses": responses}


#: The shortest encapsulated request (RFC 9458 section 4.3): key id, KEM, KDF and AEAD ids (7 bytes),
#: the X25519 encapsulated key (32) and an AEAD tag (16) around an empty binary HTTP message.
MIN_OHTTP_REQUEST = 7 + 32 + 16


def _binary(media_type: str, description: str, **limits: int) -> dict[str, Any]:
    """Raw bytes of ``media_type``: ``format: binary`` (OpenAPI 3.0's spelling, which fuzzers and code
    generators read) besides 3.1's ``contentMediaType``; ``limits`` (minLength...) count bytes."""
    schema = {"type": "string", "format": "binary", "contentMediaType": media_type, **limits}
    return {"description": description, "content": {media_type: {"schema": schema}}}


def _ohttp_paths() -> dict[str, Any]:
    """Oblivious HTTP (RFC 9458): the key configurations and the gateway (``lite_server.ohttp.gateway``)."""
    errors = {"400": {"description": "code ohttp_key: an unknown key id or algorithms (fetch the key "
                                     "configurations again); bad_ohttp_message: it does not parse or decrypt",
                      **_json("Error")},
              "413": {"description": "larger than max_body plus 1024 bytes", **_json("Error")},
              "415": {"description": "another Content-Type than message/ohttp-req", **_json("Error")}}
    return {
        "/.well-known/ohttp-gateway": {"get": {
            "summary": "The gateway's key configurations, current key first (RFC 9458 section 3)",
            "responses": {"200": _binary("application/ohttp-keys", "each key configuration with a 2-byte length",
                                         minLength=2)}}},
        "/.well-known/enfpire-keys": {"get": {
            "summary": "The same key configurations, the announced next key and the public document's digest, "
                       "signed by the server's Ed25519 identity (docs/ohttp.md; edge_client.protocol.identity)",
            "responses": {"200": {"description": "the signed key document", "content": {"application/json": {
                "schema": {"type": "object", "required": ["identity", "payload", "signature"], "properties": {
                    "identity": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    "payload": {"type": "string", "contentEncoding": "base64"},
                    "signature": {"type": "string", "contentEncoding": "base64"},
                    "public": {"type": "object", "required": ["index_version", "digest", "signature"]}}}}}}}}},
        "/ohttp": {"post": {
            "summary": "Oblivious HTTP gateway: an encapsulated binary HTTP request to any route above, "
                       "answered as an encapsulated binary HTTP response (the inner status inside)",
            "description": "The body is sealed to a key of /.well-known/ohttp-gateway (HPKE): no schema can "
                           "describe one that opens, so bytes a fuzzer makes up get 400 (never a 5xx). To "
                           "send them with Schemathesis, register the media type as raw bytes: "
                           "schemathesis.serializer.alias('message/ohttp-req', 'application/octet-stream').",
            "requestBody": {"required": True, **_binary("message/ohttp-req", "encapsulated request",
                                                        minLength=MIN_OHTTP_REQUEST)},
            "responses": {"200": _binary("message/ohttp-res", "encapsulated response"), **errors}}},
    }


def spec(dim: int | None = None, max_k: int | None = None, n_cells: int | None = None,
         ohttp: bool = True) -> dict[str, Any]:
    """The whole document; with the loaded index's ``dim``, ``max_k`` and ``n_cells`` the
    candidates request is described exactly, and the gateway's paths only when it is served (``ohttp``)."""
    candidates = _op("Candidate spots for a transformed query", "CandidatesResponse", (400, 413, 415, 503))
    candidates["requestBody"] = {"required": True, **_json("CandidatesRequest")}
    public = _op("The public parameters (cells, prototypes, dummies' catalogue, codec) of the index version; "
                 "with since=DIGEST a delta from the document of that digest when it is still kept, "
                 "else the full document",
                 "Public", (503,))
    public["parameters"] = [{"name": "since", "in": "query", "required": False, "schema": {"type": "string"},
                             "description": "the digest (sha256 hex, as the phone computed it) of the document "
                                            "the phone holds"}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "EnfPire lite_server", "version": "1"},
        "paths": {
            "/healthz": {"get": _op("Liveness", "Health")},
            "/readyz": {"get": _op("Readiness: index loaded", "Ready", (503,))},
            "/v1/info": {"get": _op("Model, index, limits, calibration and the public document's digest", "Info", (503,))},
            "/v1/candidates": {"post": candidates},
            "/v1/public": {"get": public},
            "/.well-known/enfpire-public": {"get": _op(
                "The public document's digest alone (cacheable): relays and mirrors keep one copy for every "
                "phone, which compares its own document's digest with it", "SharedPublic", (503,))},
            **(_ohttp_paths() if ohttp else {}),
        },
        "components": {"schemas": {**SCHEMAS, "CandidatesRequest": candidates_request(dim, max_k, n_cells)}},
    }
