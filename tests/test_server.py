"""The API on a real index: good answers, and a typed 4xx for every bad request."""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import requests

from edge_client.protocol import wire
from edge_client.vision.extractor import Extractor
from lite_server.api.openapi import spec
from lite_server.index.store import Index


def _validate(payload: Any, schema: str) -> None:
    document = spec()
    jsonschema.validate(payload, {"$ref": f"#/components/schemas/{schema}", "components": document["components"]})


def _vector(values: np.ndarray, dtype: str = "float16") -> dict[str, Any]:
    return wire.encode(values, dtype)


@pytest.fixture(scope="module")
def query(extractor: Extractor, held_out: list[tuple[str, Path]]) -> np.ndarray:
    return extractor.extract(held_out[0][1])


def test_health_ready_and_info_match_the_openapi_document(client: Any, index_dir: Path) -> None:
    for path, schema in (("/healthz", "Health"), ("/readyz", "Ready"), ("/v1/info", "Info")):
        response = client.get(path)
        assert response.status_code == 200, path
        _validate(response.get_json(), schema)
    info = client.get("/v1/info").get_json()
    index = Index.load(index_dir)
    assert info["model_sha256"] == index.model_sha256 and info["dim"] == 1280
    assert info["n_spots"] == len(index.spots) == 24 and info["limits"]["max_k"] >= 1
    assert client.get("/openapi.json").get_json()["openapi"].startswith("3.")


def test_candidates_answer_matches_the_document_and_ranks_the_spot_first(
        client: Any, query: np.ndarray, held_out: list[tuple[str, Path]]) -> None:
    response = client.post("/v1/candidates", json={"vector": _vector(query), "k": 5})
    assert response.status_code == 200
    body = response.get_json()
    _validate(body, "CandidatesResponse")
    assert len(body["candidates"]) == 5 and body["candidates"][0]["id"] == held_out[0][0]
    first = body["candidates"][0]
    assert first["name"] and first["lat"] is not None and isinstance(first["info"], dict)
    assert wire.decode(first["features"], expect_dim=128).shape[0] <= 8  # PCA int8 codes of <= 8 prototypes
    assert "Set-Cookie" not in response.headers


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_coded_queries_are_understood(client: Any, query: np.ndarray, held_out: list[tuple[str, Path]],
                                      dtype: str) -> None:
    response = client.post("/v1/candidates", json={"vector": _vector(query, dtype), "k": 1})
    assert response.status_code == 200 and response.get_json()["candidates"][0]["id"] == held_out[0][0]


def test_int8_scales_travel_as_exact_float16_and_lists_still_decode() -> None:
    """A candidate's per-row scales cost 2 bytes a row (a JSON list of float32 decimals was a
    tenth of every candidate); a list, as earlier servers sent it, still decodes the same."""
    rows = np.random.default_rng(1).normal(size=(8, 128)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    encoded = wire.encode(rows, "int8")
    codes, scales = wire.quantize(rows)
    assert encoded["scale"]["dtype"] == "float16" and encoded["scale"]["shape"] == [8]
    exact = codes.astype(np.float32) * scales.astype(np.float32)[:, None]
    assert np.array_equal(wire.decode(encoded), exact)
    assert np.array_equal(wire.decode({**encoded, "scale": scales.astype(float).tolist()}), exact)
    assert len(json.dumps(encoded["scale"])) < len(json.dumps((np.abs(rows).max(axis=1) / 127).tolist())) / 2
    with pytest.raises(wire.WireError, match="float16"):
        wire.encode(rows * 1e9, "int8")


@pytest.mark.parametrize("dtype", ["int8", "int4", "float16", "float32", "uint8"])
def test_groups_encode_exactly_as_each_group_alone(dtype: str) -> None:
    """A server start encodes every spot's looks in one pass; candidates must carry the same bytes."""
    rows = np.abs(np.random.default_rng(0).normal(size=(40, 16))).astype(np.float32)
    rows[5] = 0.0  # a zero row keeps scale 1
    bounds = np.array([0, 0, 3, 11, 11, 40])
    alone = [wire.encode(rows[a:b], dtype) for a, b in zip(bounds[:-1], bounds[1:])]
    assert wire.encode_groups(rows, bounds, dtype) == alone
    decoded = np.concatenate([wire.decode(g) for g in alone])
    if dtype == "int4":  # 15 levels over the rotated row's peak (a large one here: rows all positive)
        assert (np.linalg.norm(decoded - rows, axis=1) <= 0.2 * np.linalg.norm(rows, axis=1)).all()
    else:
        assert np.allclose(decoded, rows, atol=0.02)


def _sylvester(dim: int) -> np.ndarray:
    """Sylvester's +-1 Hadamard matrix as its definition builds it (int64; the codec uses a fast transform)."""
    matrix = np.ones((1, 1), np.int64)
    while len(matrix) < dim:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix


def _unit_rows(count: int, dim: int = 128, seed: int = 1) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_int4_rows_decode_exactly_to_their_rotated_codes_in_half_the_bytes_of_int8() -> None:
    """The phone decodes what the format says, bit for bit: nibbles low first, -7..7, times the
    Hadamard matrix, times the row's float16 scale / sqrt(D); close to the row, half int8's bytes."""
    rows = _unit_rows(8)
    encoded = wire.encode(rows, "int4")
    packed = np.frombuffer(base64.b64decode(encoded["data"]), np.uint8).reshape(8, 64)
    codes = np.empty((8, 128), np.int64)
    codes[:, 0::2], codes[:, 1::2] = packed & 0x0F, packed >> 4
    codes = np.where(codes > 7, codes - 16, codes)
    assert np.abs(codes).max() == 7 and encoded["scale"]["dtype"] == "float16" and encoded["scale"]["shape"] == [8]
    scales = wire.decode_array(encoded["scale"], "float16").astype(np.float32)
    exact = (codes @ _sylvester(128)).astype(np.float32) * (scales * np.float32(1 / np.sqrt(128)))[:, None]
    decoded = wire.decode(encoded, expect_dim=128)
    assert np.array_equal(decoded, exact)
    assert np.array_equal(wire.decode({**encoded, "scale": scales.astype(float).tolist()}), exact)
    cosines = (decoded * rows).sum(axis=1) / np.linalg.norm(decoded, axis=1)
    assert cosines.min() > 0.97
    assert 2 * len(base64.b64decode(encoded["data"])) == len(base64.b64decode(wire.encode(rows, "int8")["data"]))
    assert np.array_equal(wire.decode(wire.encode(rows[0], "int4")), exact[0])  # one vector: one row


def _bad_int4() -> list[tuple[dict[str, Any], str]]:
    good = wire.encode(_unit_rows(2), "int4")
    raw = bytearray(base64.b64decode(good["data"]))
    raw[0] = (raw[0] & 0xF0) | 0x08  # the nibble -8, which the symmetric codes never use
    text = base64.b64encode(bytes(raw)).decode()
    return [({**good, "data": good["data"][:-4]}, "bytes"),
            ({**good, "shape": [2, 96]}, "power-of-two"),
            ({**good, "shape": [2, 256]}, "bytes"),
            ({**good, "data": text}, "nibble 8"),
            ({**good, "scale": wire.encode_array(np.array([np.inf, 1], np.float16))}, "finite"),
            ({**good, "scale": wire.encode_array(np.array([0, 1], np.float16))}, "positive"),
            ({**good, "scale": [0.01]}, "2 scale"),
            ({k: v for k, v in good.items() if k != "scale"}, "2 scale")]


@pytest.mark.parametrize("bad, message", _bad_int4())
def test_malformed_int4_is_refused_like_int8(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(wire.WireError, match=message):
        wire.decode(bad)
    with pytest.raises(wire.WireError, match="power-of-two"):
        wire.encode(np.ones((2, 100), np.float32), "int4")


def _post(client: Any, body: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    if "data" not in kwargs:
        kwargs["json"] = body
    response = client.post("/v1/candidates", **kwargs)
    payload = response.get_json(silent=True)
    assert payload is not None, response.data[:200]
    _validate(payload, "Error")
    return response.status_code, payload["error"]


def test_not_json(client: Any) -> None:
    assert _post(client, None, data=b"{nope", content_type="application/json") == \
        (400, {"code": "bad_json", "message": "the body is not valid JSON"})


def test_wrong_content_type(client: Any) -> None:
    assert _post(client, None, data=b"{}", content_type="text/plain")[0] == 415


def test_body_not_an_object(client: Any) -> None:
    assert _post(client, [1, 2, 3])[1]["code"] == "bad_request"


def test_missing_vector(client: Any) -> None:
    assert _post(client, {"k": 3})[1]["code"] == "missing_field"


def test_unknown_field(client: Any, query: np.ndarray) -> None:
    assert _post(client, {"vector": _vector(query), "k": 3, "where": "here"})[1]["code"] == "unknown_field"


def test_wrong_dimension(client: Any) -> None:
    status, error = _post(client, {"vector": _vector(np.ones(1000) / 32), "k": 3})
    assert status == 400 and "dimension 1280" in error["message"]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_infinity(client: Any, query: np.ndarray, bad: float) -> None:
    vector = query.copy()
    vector[7] = bad
    status, error = _post(client, {"vector": _vector(vector), "k": 3})
    assert status == 400 and "finite" in error["message"]


def test_bad_base64(client: Any) -> None:
    body = {"vector": {"dtype": "float16", "shape": [1280], "data": "!!not base64!!"}, "k": 3}
    assert "base64" in _post(client, body)[1]["message"]


@pytest.mark.parametrize("shape", [[0, 1 << 62], [1 << 62, 0], [1 << 25]])
def test_a_shape_too_large_is_refused_even_without_elements(client: Any, shape: list[int]) -> None:
    """Found by the soak fuzzer: [0, 2**62] holds nothing, yet numpy refused to make it (a 500)."""
    status, error = _post(client, {"vector": {"dtype": "float16", "shape": shape, "data": ""}, "k": 1})
    assert status == 400 and "too large" in error["message"]


def test_truncated_data(client: Any, query: np.ndarray) -> None:
    encoded = _vector(query)
    encoded["data"] = base64.b64encode(base64.b64decode(encoded["data"])[:-2]).decode()
    assert _post(client, {"vector": encoded, "k": 3})[0] == 400


@pytest.mark.parametrize("k", [0, -1, 10**9, 2.5, "3", True, None])
def test_bad_k(client: Any, query: np.ndarray, k: Any) -> None:
    status, error = _post(client, {"vector": _vector(query), "k": k})
    assert status == 400 and error["code"] == "bad_k"


def test_body_over_the_limit_is_413(client: Any) -> None:
    big = json.dumps({"pad": "x" * (65 * 1024)}).encode()
    assert _post(client, None, data=big, content_type="application/json")[0] == 413


def test_unknown_route_and_method_are_json(client: Any) -> None:
    assert client.get("/nope").status_code == 404 and client.get("/nope").get_json()["error"]["code"] == "not_found"
    response = client.get("/v1/candidates")
    assert response.status_code == 405 and "POST" in response.headers["Allow"]
    _validate(response.get_json(), "Error")


def test_large_answers_are_gzipped_for_clients_that_accept_it(client: Any, query: np.ndarray) -> None:
    import gzip

    body = {"vector": _vector(query), "k": 10}
    plain = client.post("/v1/candidates", json=body)
    packed = client.post("/v1/candidates", json=body, headers={"Accept-Encoding": "gzip, deflate"})
    assert "Content-Encoding" not in plain.headers and packed.headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(packed.data)) == plain.get_json()
    assert len(packed.data) < 0.85 * len(plain.data)


def test_the_document_lists_the_gateway_only_where_it_is_served(client: Any, index_dir: Path) -> None:
    """A fuzzer reads /openapi.json: without a gateway (ohttp_keys off) it must not be sent to one that
    answers 404, and with one it finds the sealed body described as bytes."""
    from lite_server.api.app import create_app
    from lite_server.config import ServerConfig

    served = client.get("/openapi.json").get_json()["paths"]
    body = served["/ohttp"]["post"]["requestBody"]["content"]["message/ohttp-req"]["schema"]
    assert body["format"] == "binary" and body["minLength"] == 55
    assert client.post("/ohttp", data=bytes(54), content_type="message/ohttp-req").status_code == 400
    off = create_app(ServerConfig(index=str(index_dir), ohttp_keys="off")).test_client()
    assert not {"/ohttp", "/.well-known/ohttp-gateway"} & set(off.get("/openapi.json").get_json()["paths"])
    assert off.get("/.well-known/ohttp-gateway").status_code == 404


@pytest.mark.parametrize("body", [{"cells": [0.0]}, {"cells": [1.0, -0.0]}, {"k": 3.0}], ids=["0.0", "1.0 and -0.0", "k 3.0"])
def test_integers_spelt_as_floats_are_integers(client: Any, query: np.ndarray, body: dict[str, Any]) -> None:
    """JSON Schema (the published contract) calls 0.0 an integer, so the server does too."""
    if "k" in body:
        body = {**body, "vector": _vector(query)}
        same = {**body, "k": 3}
    else:
        same = {"cells": [int(c) for c in body["cells"]]}
    response = client.post("/v1/candidates", json=body)
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == client.post("/v1/candidates", json=same).get_json()


@pytest.mark.parametrize("scale", [1e36 * (1 + 2 ** -52), 3e38, 10 ** 37, 10 ** 400], ids=["just over", "float32 max",
                                                                                         "big int", "huge int"])
def test_a_scale_over_the_documented_maximum_is_400(client: Any, scale: float) -> None:
    """The document says a scale is at most 1e36 (its largest code times it stays a finite float32):
    the server says so too, never 200 nor 500."""
    ones = base64.b64encode(np.ones(1280, np.uint8).tobytes()).decode()
    for vector in ({"dtype": "uint8", "shape": [1280], "data": ones, "scale": scale},
                   {"dtype": "int8", "shape": [1280], "data": ones, "scale": [scale]}):
        status, error = _post(client, {"vector": vector, "k": 1})
        assert status == 400 and error["code"] == "bad_vector" and "scale" in error["message"], (status, error)


def test_a_server_with_4_bit_looks_sends_more_looks_and_the_phone_still_recognizes(
        index_dir: Path, extractor: Extractor, held_out: list[tuple[str, Path]], tmp_path: Path) -> None:
    """``ENFPIRE_LOOK_BITS=4`` with twice the looks: a real server on loopback answers int4 looks, more
    of them per spot, in about the bytes of int8's; the real client decodes and reranks them and names
    the held-out photo's spot; the public document's looks stay int8."""
    from edge_client.client import Client
    from edge_client.config import ClientConfig
    from tests.conftest import copy_index
    from tools.live import LiveServer

    env = {"ENFPIRE_LOOK_BITS": "4", "ENFPIRE_FEATURES_PER_SPOT": "16"}
    server = LiveServer(copy_index(index_dir, tmp_path), env=env)
    try:
        body = {"vector": _vector(extractor.extract(held_out[0][1])), "k": 5}
        answer = requests.post(server.url + "/v1/candidates", json=body, timeout=30).json()
        _validate(answer, "CandidatesResponse")
        looks = [candidate["features"] for candidate in answer["candidates"]]
        assert {f["dtype"] for f in looks} == {"int4"} and max(f["shape"][0] for f in looks) > 8
        assert all(len(base64.b64decode(f["data"])) == 64 * f["shape"][0] for f in looks)  # 128 codes a look
        with Client(ClientConfig(server=server.url, state_dir=str(tmp_path / "phone")), extractor) as client:
            recognition = client.recognize(held_out[0][1])
        assert recognition.best == held_out[0][0] and recognition.confidence is not None
        public = requests.get(server.url + "/v1/public", timeout=30).json()
        assert public["spots"]["looks"]["dtype"] == "int8"
    finally:
        server.stop()
