"""The published contract against the live server: what /openapi.json calls a valid candidates
request is accepted, what it calls invalid is refused with a 4xx, and nothing is a 5xx.
Also: a command line prints its answer and nothing from the TFLite runtime."""
from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from edge_client.protocol import wire
from lite_server.api.openapi import MAX_SCALE, spec
from tools.live import LiveServer

# No shrinking: a failing body is reported as found (shrinking kilobytes of base64 takes minutes).
SETTINGS = dict(deadline=None, database=None, max_examples=40, suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate])
FLOATS = {"float16": np.float16, "float32": np.float32}


@pytest.fixture(scope="module")
def document(live_server: LiveServer) -> dict[str, Any]:
    return requests.get(live_server.url + "/openapi.json", timeout=10).json()


@pytest.fixture(scope="module")
def session() -> requests.Session:
    return requests.Session()


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid by ``schema``, for the keywords the request schema uses (hypothesis-jsonschema
    does not run with this Hypothesis): every branch of a ``oneOf``, optional properties or not."""
    if "oneOf" in schema:
        return st.one_of([from_schema(branch) for branch in schema["oneOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema["type"]
    if kind == "object":
        properties = {name: from_schema(sub) for name, sub in schema["properties"].items()}
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries({n: s for n, s in properties.items() if n in required},
                                     optional={n: s for n, s in properties.items() if n not in required})
    if kind == "array":
        return st.lists(from_schema(schema["items"]), min_size=schema.get("minItems", 0),
                        max_size=schema.get("maxItems", 8), unique=schema.get("uniqueItems", False))
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        low = schema.get("exclusiveMinimum", schema.get("minimum"))
        return st.floats(low, schema.get("maximum"), allow_nan=False, exclude_min="exclusiveMinimum" in schema)
    if kind == "string":
        return st.from_regex(schema["pattern"], fullmatch=True) if "pattern" in schema else st.text(max_size=40)
    raise AssertionError(f"a keyword the generator does not know: {schema}")


def _schema(document: dict[str, Any], name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}", "components": document["components"]}


def _finite(body: dict[str, Any]) -> dict[str, Any]:
    """A float vector's data made finite and an exact int8 scale positive: JSON Schema cannot say
    either of base64 (the document says it in words)."""
    vector = body.get("vector")
    if isinstance(vector, dict) and vector.get("dtype") in FLOATS:
        values = np.frombuffer(base64.b64decode(vector["data"]), FLOATS[vector["dtype"]])
        clean = np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=-1.0).astype(values.dtype)
        body = {**body, "vector": {**vector, "data": base64.b64encode(clean.tobytes()).decode()}}
    if isinstance(vector, dict) and isinstance(vector.get("scale"), dict):
        drawn = np.frombuffer(base64.b64decode(vector["scale"]["data"]), np.float16)
        fixed = np.where(np.isfinite(drawn) & (drawn != 0), np.abs(drawn), 1.0).astype(np.float16)
        exact = {**vector["scale"], "data": base64.b64encode(fixed.tobytes()).decode()}
        body = {**body, "vector": {**vector, "scale": exact}}
    return body


def _post(live_server: LiveServer, session: requests.Session, body: Any) -> requests.Response:
    return session.post(live_server.url + "/v1/candidates", json=body, timeout=30)


def test_every_request_valid_by_the_schema_is_answered(live_server: LiveServer, session: requests.Session,
                                                        document: dict[str, Any]) -> None:
    request_schema = document["components"]["schemas"]["CandidatesRequest"]
    response_schema = _schema(document, "CandidatesResponse")

    @settings(**SETTINGS)
    @given(from_schema(request_schema).map(_finite))
    def check(body: dict[str, Any]) -> None:
        response = _post(live_server, session, body)
        assert response.status_code == 200, (response.status_code, response.text[:300])
        jsonschema.validate(response.json(), response_schema)

    check()


# Near-valid bodies: every combination of fields, each good or bad, so the schema and the server disagree
# wherever their rules differ.
_VECTOR = wire.encode(np.random.default_rng(0).standard_normal(1280).astype(np.float32))
VECTORS = st.sampled_from([_VECTOR, wire.encode(np.ones(1280), "float32"), {**_VECTOR, "shape": [1, 1280]},
                           wire.encode(np.ones(1000)), {**_VECTOR, "dtype": "int8"}, {**_VECTOR, "data": "!!"},
                           {"dtype": "uint8", "shape": [1280], "data": wire.encode(np.ones(1280), "uint8")["data"]},
                           wire.encode(np.ones(1280), "uint8"), [], "x"])
FIELDS = {"vector": VECTORS,
          "k": st.sampled_from([1, 5, 64, 65, 0, -1, 2.5, 3.0, "3", True, None]),
          "cells": st.lists(st.integers(-1, 3), max_size=4) | st.sampled_from([[0, 0], "0", [True], [0.5], [0.0],
                                                                               [1.0, 0], [0.0, 0]]),
          "pad": st.sampled_from(["", "xxx", 3, None]),
          "where": st.just("here")}
# Any subset of the fields, and bodies of one kind with one field off, so both answers come up often.
near_valid = (st.fixed_dictionaries({}, optional=FIELDS)
              | st.fixed_dictionaries({"vector": VECTORS, "k": FIELDS["k"]}, optional={"pad": FIELDS["pad"]})
              | st.fixed_dictionaries({"cells": FIELDS["cells"]}, optional={"pad": FIELDS["pad"], "k": FIELDS["k"]}))


def test_the_server_accepts_exactly_what_the_schema_accepts(live_server: LiveServer, session: requests.Session,
                                                             document: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(_schema(document, "CandidatesRequest"))
    seen = {True: 0, False: 0}

    @settings(**{**SETTINGS, "max_examples": 150})
    @given(near_valid)
    def check(body: dict[str, Any]) -> None:
        valid = validator.is_valid(body)
        response = _post(live_server, session, body)
        assert response.status_code < 500, response.text[:300]
        assert (response.status_code == 200) == valid, (body, response.status_code, response.text[:200])
        seen[valid] += 1

    check()
    assert seen[True] and seen[False]  # both sides were exercised


def test_a_body_with_both_vector_and_cells_is_refused_by_both(live_server: LiveServer, session: requests.Session,
                                                              document: dict[str, Any]) -> None:
    body = {"vector": _VECTOR, "k": 3, "cells": [0]}
    assert not jsonschema.Draft202012Validator(_schema(document, "CandidatesRequest")).is_valid(body)
    response = _post(live_server, session, body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "missing_field"


def _cells_schema(document: dict[str, Any]) -> dict[str, Any]:
    return document["components"]["schemas"]["CandidatesRequest"]["oneOf"][1]["properties"]["cells"]


def _edges(document: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Bodies on the schema's edges (found by schemathesis against /openapi.json): a scale just over
    the maximum, integers spelt as floats (integers to JSON Schema), integers beyond any float."""
    last = _cells_schema(document)["maxItems"] - 1
    # every code 1, so the values stay finite float32 up to a scale of 3.4e38: only the maximum refuses
    small = {"dtype": "uint8", "shape": [1280], "data": base64.b64encode(np.ones(1280, np.uint8).tobytes()).decode()}
    signed = wire.encode(np.ones(1280), "int8")
    over = MAX_SCALE * (1 + 2 ** -52)
    return [
        ("scale over the maximum", {"vector": {**small, "scale": over}, "k": 1}),
        ("int8 scale over the maximum", {"vector": {**signed, "scale": [over]}, "k": 1}),
        ("integer scale over the maximum", {"vector": {**small, "scale": 10 ** 37}, "k": 1}),
        ("integer scale beyond any float", {"vector": {**small, "scale": 10 ** 400}, "k": 1}),
        ("scale at the maximum", {"vector": {**small, "scale": MAX_SCALE}, "k": 1}),
        ("large integer scale", {"vector": {**small, "scale": 10 ** 19}, "k": 1}),
        ("cells as floats", {"cells": [0.0]}),
        ("the last cell as a float", {"cells": [float(last)]}),
        ("a cell twice, once as a float", {"cells": [0.0, 0]}),
        ("a fractional cell", {"cells": [0.5]}),
        ("k as a float", {"vector": _VECTOR, "k": 3.0}),
        ("k true", {"vector": _VECTOR, "k": True}),
        ("shape as floats", {"vector": {**_VECTOR, "shape": [1.0, 1280.0]}, "k": 2}),
        ("int8 scale shape as a float", {"vector": {**signed, "scale": {**signed["scale"], "shape": [1.0]}}, "k": 2}),
    ]


def test_the_edges_of_the_schema_are_the_edges_of_the_server(live_server: LiveServer, session: requests.Session,
                                                             document: dict[str, Any]) -> None:
    """On each edge the server answers as the document says: 200 when valid, else 400 with a code."""
    validator = jsonschema.Draft202012Validator(_schema(document, "CandidatesRequest"))
    verdicts = {}
    for name, body in _edges(document):
        valid = validator.is_valid(body)
        response = _post(live_server, session, body)
        verdicts[name] = (valid, response.status_code)
        if not valid:
            assert response.status_code == 400 and response.json()["error"]["code"], (name, response.text[:200])
        assert (response.status_code == 200) == valid, (name, valid, response.status_code, response.text[:200])
    assert sorted(name for name, (valid, _) in verdicts.items() if valid) == sorted([
        "scale at the maximum", "large integer scale", "cells as floats", "the last cell as a float", "k as a float",
        "shape as floats", "int8 scale shape as a float"])


def test_every_schema_in_the_document_is_a_valid_json_schema() -> None:
    """Each schema (components and the media types of bodies and answers) passes the 2020-12
    metaschema, and the binary bodies say so in both spellings fuzzers read."""
    document = spec(1280, 64, 16)
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    media = [(path, media_type, content["schema"]) for path, item in document["paths"].items()
             for operation in item.values()
             for part in [operation.get("requestBody", {}), *operation["responses"].values()]
             for media_type, content in part.get("content", {}).items()]
    for path, media_type, schema in media:
        jsonschema.Draft202012Validator.check_schema(schema)
        if not media_type.endswith("json"):
            assert schema["format"] == "binary" and schema["contentMediaType"] == media_type, (path, schema)
    body = document["paths"]["/ohttp"]["post"]["requestBody"]["content"]["message/ohttp-req"]["schema"]
    assert body["minLength"] == 55
    assert "/ohttp" not in spec(ohttp=False)["paths"]


def test_cli_prints_nothing_from_the_tflite_runtime(held_out: list[tuple[str, Path]]) -> None:
    out = subprocess.run([sys.executable, "-m", "edge_client.cli", "extract", str(held_out[0][1]), "--json"],
                         capture_output=True, text=True, check=True)
    assert out.stderr == "" and '"dim": 1280' in out.stdout
