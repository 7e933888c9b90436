"""The public document (GET /v1/public): its contract, its size, and phones catching up on
index updates by delta (one and two versions behind), or by the full document when the base
version is gone or the delta does not check out."""
from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests

from edge_client.client import Client, public_path
from edge_client.config import ClientConfig
from edge_client.protocol import wire
from edge_client.protocol.public import PublicError, PublicParams, PublicStore, Rows, apply_delta, canonical, parse
from edge_client.vision.extractor import Extractor, l2_normalize
from lite_server.api.updates import add_spots, remove_spots
from lite_server.config import ServerConfig
from lite_server.index.store import Index
from lite_server.search.lookup import Lookup
from lite_server.search.publication import budget_rule, build, delta, delta_bytes, public_bytes
from tests.conftest import copy_index, make_subset
from tools.live import LiveServer


def test_document_is_described_by_openapi_and_carries_what_candidates_carry(
        app: Any, client: Any, index_dir: Path) -> None:
    import jsonschema

    from lite_server.api.openapi import spec

    payload = client.get("/v1/public").get_json()
    jsonschema.validate(payload, {"$ref": "#/components/schemas/Public", "components": spec()["components"]})
    doc = parse(payload)
    info = client.get("/v1/info").get_json()
    assert info["public"] == {"index_version": doc.version, "digest": doc.digest}
    index = Index.load(index_dir)
    assert doc.ids.tolist() == sorted(s.id for s in index.spots)
    assert doc.columns["photos"].sum() == len(index.photo_spot)
    # A small catalogue publishes everything it did before: every prototype and look of every spot ...
    lookup = app.extensions["enfpire"].lookup
    order = np.argsort([s.id for s in index.spots], kind="stable")
    assert (doc.columns["n_prototypes"] == np.bincount(lookup.prototype_spot, minlength=len(order))[order]).all()
    assert (doc.columns["n_looks"] == [lookup._encoded[r]["shape"][0] for r in order]).all()
    # ... and the looks are nothing beyond what a candidates answer already carries for the same spot.
    first = np.asarray(index.features[index.photo_spot == 0][:1], np.float32)
    answer = client.post("/v1/candidates", json={"vector": wire.encode(first[0]), "k": 1}).get_json()["candidates"][0]
    row = int(np.flatnonzero(doc.ids == answer["id"])[0])
    start = int(doc.columns["n_looks"][:row].sum())
    published = doc.blocks["looks"].decode()[start:start + int(doc.columns["n_looks"][row])]
    carried = wire.decode(answer["features"])  # int4 codes there, int8 in the document: the same looks
    cosines = np.sum(published * carried, axis=1) / np.linalg.norm(published, axis=1) / np.linalg.norm(carried, axis=1)
    assert published.shape == carried.shape and cosines.min() > 0.97


def test_a_corrupt_document_or_delta_is_refused(client: Any) -> None:
    payload = client.get("/v1/public").get_json()
    doc = parse(payload)
    for broken in ({**payload, "digest": "0" * 64}, {**payload, "kind": "delta"},
                   {**payload, "spots": {**payload["spots"], "ids": payload["spots"]["ids"][1:]}}):
        with pytest.raises(PublicError):
            parse(broken)
    same = client.get("/v1/public", query_string={"since": doc.digest}).get_json()
    assert same["kind"] == "delta" and not same["removed"] and not same["spots"]["ids"]
    assert same["base_digest"] == doc.digest and apply_delta(doc, same).digest == doc.digest
    with pytest.raises(PublicError):
        apply_delta(doc, {**same, "base_digest": "f" * 64})
    # A phone names its document by digest only: a version label, or a digest nobody kept, gets the whole.
    for since in (doc.version, "e" * 64, "../" + doc.digest):
        assert client.get("/v1/public", query_string={"since": since}).get_json()["kind"] == "full"


def test_the_phone_checks_the_learned_basis_like_every_array(index_dir: Path) -> None:
    """The document says honestly which basis it holds (here the gallery's learned whitening),
    float16-exact as the server projects with it, with the coverage basis beside it; a basis of an
    unknown kind, of the wrong shape, not finite or degenerate, and a coverage basis of the wrong
    shape or not orthonormal are refused before the phone projects anything with them."""
    import jsonschema

    from lite_server.api.openapi import spec

    lookup = Lookup(Index.load(index_dir), ServerConfig(codec_kind="learned-whitening"))
    payload = build(lookup).to_payload()
    jsonschema.validate(payload, {"$ref": "#/components/schemas/Public", "components": spec()["components"]})
    doc = parse(payload)
    cover_dim = len(lookup.coverage_basis)
    assert payload["globals"]["codec"] == {"kind": "learned-whitening", "dim": lookup.codec.dim,
                                           "coverage_dim": cover_dim}
    assert np.array_equal(doc.basis.astype(np.float32), lookup.codec.basis_)
    assert np.array_equal(doc.coverage.astype(np.float32), lookup.coverage_basis)
    basis, cover = doc.basis.astype(np.float32), doc.coverage.astype(np.float32)
    codec = payload["globals"]["codec"]
    bad = {"unknown kind": ({**codec, "kind": "lda"}, basis, cover),
           "wrong dim": ({**codec, "dim": lookup.codec.dim + 1}, basis, cover),
           "not finite": (codec, np.where(basis == basis.max(), np.inf, basis), cover),
           "degenerate": (codec, np.repeat(basis[:1], len(basis), 0), cover),
           "coverage of the wrong shape": ({**codec, "coverage_dim": cover_dim - 1}, basis, cover),
           "coverage not orthonormal": (codec, basis, cover * 1.1),
           "coverage of repeated rows": (codec, basis, np.repeat(cover[:1], cover_dim, 0))}
    for name, (codec_, array, cover_) in bad.items():
        globals_ = {**payload["globals"], "codec": codec_, "basis": wire.encode_array(array.astype(np.float16)),
                    "coverage_basis": wire.encode_array(cover_.astype(np.float16))}
        with pytest.raises(PublicError):
            parse({**payload, "globals": globals_})
    # A PCA document measures coverage in its own basis and sends no second one.
    pca = ServerConfig(codec_kind="pca")
    assert "coverage_basis" not in build(Lookup(Index.load(index_dir), pca)).to_payload()["globals"]


# --- size ---------------------------------------------------------------------------------------------

def _synthetic(n: int, seed: int = 0, dim: int = 128) -> PublicParams:
    """A random but valid document of ``n`` spots, shaped as the budget rule publishes it."""
    rng = np.random.default_rng(seed)
    looks, per_spot = budget_rule(n, 3 * n, 8 * n, dim, ServerConfig().public_budget)
    per_spot = min(per_spot, 3)
    rows = rng.standard_normal((n * per_spot, dim)) * np.linspace(2, 0.3, dim)  # PCA-like spread
    look_rows = rng.standard_normal((8 * n if looks else 0, dim))
    columns = {"lat": rng.uniform(30, 45, n).astype(np.float32), "lon": rng.uniform(130, 145, n).astype(np.float32),
               "cell": rng.integers(0, max(1, n // 10), n).astype(np.uint16),
               "photos": rng.zipf(1.8, n).clip(1, 60000).astype(np.uint16),
               "n_prototypes": np.full(n, per_spot, np.uint8), "n_looks": np.full(n, 8 if looks else 0, np.uint8)}
    return canonical(PublicParams(
        "v1", np.array([f"spot-{i:06d}" for i in rng.permutation(n)]), columns,
        {"prototypes": Rows(*wire.quantize(rows)), "looks": Rows(*wire.quantize(look_rows.reshape(-1, dim)))},
        (rng.standard_normal((dim, 1280)) / 36).astype(np.float16),
        {"n_cells": max(1, n // 10), "spread": {"cos_median": 0.8, "log_tan_sigma": 0.25}, "codec": {"kind": "pca", "dim": dim}}))


def _one_percent_changed(doc: PublicParams, seed: int = 1) -> PublicParams:
    """``doc`` with 0.5% of its spots removed and as many new ones (the rest keep their rows)."""
    rng = np.random.default_rng(seed)
    n, m = len(doc), max(1, len(doc) // 200)
    keep = np.sort(rng.choice(n, n - m, replace=False))
    like = rng.choice(keep, m)  # new spots shaped like existing ones, with fresh prototypes
    count = doc.columns["n_prototypes"]
    fresh = Rows(*wire.quantize(rng.standard_normal((int(count[like].sum()), doc.blocks["prototypes"].codes.shape[1]))))
    kept = doc.blocks["prototypes"].take(count, keep)
    rows = np.concatenate([keep, like])
    return canonical(dataclasses.replace(
        doc, version="v2", ids=np.concatenate([doc.ids[keep], [f"new-{i:06d}" for i in range(m)]]),
        columns={c: a[rows] for c, a in doc.columns.items()},
        blocks={"prototypes": Rows(np.concatenate([kept.codes, fresh.codes]), np.concatenate([kept.scales, fresh.scales])),
                "looks": doc.blocks["looks"].take(doc.columns["n_looks"], rows)}))


def test_document_size_per_spot_is_within_budget_and_a_one_percent_delta_is_small() -> None:
    for n, target in ((3000, 2 << 20), (10000, 2 << 20)):  # the 2 MB at 10,000 spots
        doc = _synthetic(n)
        full = public_bytes(doc)
        assert full <= target, f"{n} spots: {full} bytes"
        new = _one_percent_changed(doc)
        assert delta_bytes(doc, new) <= 0.05 * full
        assert apply_delta(doc, json.loads(json.dumps(delta(doc, new)))).digest == new.digest
    # The rule publishes what fits whole: the real datasets' sizes keep every prototype and look.
    assert budget_rule(296, 3 * 296, 8 * 296, 128, ServerConfig().public_budget) == (True, 888)
    assert budget_rule(100_000, 300_000, 800_000, 128, ServerConfig().public_budget) == (False, 1)


def test_fewer_prototypes_a_spot_when_the_budget_is_small(app: Any) -> None:
    lookup = app.extensions["enfpire"].lookup
    index = lookup.index
    doc = build(lookup, budget=130 * len(index.spots))
    assert (doc.columns["n_prototypes"] == 1).all() and not doc.columns["n_looks"].any()
    heaviest = doc.blocks["prototypes"].decode()  # each spot's first prototype, in codec space
    row = int(np.flatnonzero(doc.ids == index.spots[0].id)[0])
    first = l2_normalize(lookup.prototypes[lookup.prototype_spot == 0][:1])[0]  # derived in codec space
    assert float(heaviest[row] @ first) / float(np.linalg.norm(heaviest[row])) > 0.999


# --- phones catching up on index updates --------------------------------------------------------------

@pytest.fixture(scope="module")
def own_index(index_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_index(index_dir, tmp_path_factory.mktemp("public"))


@pytest.fixture(scope="module")
def server(own_index: Path) -> Iterator[LiveServer]:
    live = LiveServer(own_index)
    yield live
    live.stop()


def _switch(server: LiveServer, index: Index) -> None:
    """SIGHUP the server and wait until it serves ``index``'s version."""
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if requests.get(server.url + "/readyz", timeout=10).json().get("index_version") == index.version:
            return
        time.sleep(0.2)
    raise AssertionError("the server did not switch")


def _phone(server: LiveServer, home: Path, extractor: Extractor) -> Client:
    return Client(ClientConfig(server=server.url, state_dir=str(home), seed=1), extractor)


def _catch_up(server: LiveServer, home: Path, extractor: Extractor) -> tuple[Client, PublicParams]:
    with _phone(server, home, extractor) as phone:
        phone.info(refresh=True)
        doc = phone.public()
        phone.check_model()  # the transform fits on what arrived
        return phone, doc


def test_phones_catch_up_by_delta_or_full_download(
        server: LiveServer, own_index: Path, extractor: Extractor, tmp_path: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    homes = {name: tmp_path / name for name in ("one", "two", "gone", "corrupt")}
    for home in homes.values():  # every phone starts on the first version: one full download each
        phone, doc = _catch_up(server, home, extractor)
        assert phone.last_public[0] == "full" and public_path(phone.config).exists()
    full_bytes = phone.last_public[1]
    first = Index.load(own_index)

    second = remove_spots(own_index, [first.spots[0].id])
    _switch(server, second)
    phone, doc = _catch_up(server, homes["one"], extractor)  # one version behind: a delta
    # Its size is what changed: on this branch every version re-derives the codec basis and cells, so
    # nearly everything does; with a derivation that keeps them, a 1% update costs ~0.5% (docs/benchmarks.md).
    assert phone.last_public[0] == "delta" and phone.last_public[1] <= full_bytes * 1.05
    assert doc.version == second.version and first.spots[0].id not in doc.ids
    assert doc.digest == requests.get(server.url + "/v1/info", timeout=10).json()["public"]["digest"]

    again = _catch_up(server, homes["one"], extractor)[0]  # up to date: nothing is downloaded
    assert again.last_public == ("kept", 0)

    added = make_subset(tmp_path_factory.mktemp("added"), spots=1, per_spot=2, first=30)
    third = add_spots(own_index, added / "images", extractor)
    _switch(server, third)
    phone, doc = _catch_up(server, homes["two"], extractor)  # two versions behind: a delta from two back
    assert phone.last_public[0] == "delta" and doc.version == third.version
    assert len(doc) == len(third.spots) and set(doc.ids) == {s.id for s in third.spots}

    # A phone whose kept document is not what the server had for that version: the delta cannot check out.
    store = PublicStore(public_path(_phone(server, homes["corrupt"], extractor).config))
    kept = store.load()
    assert kept is not None
    extra = canonical(dataclasses.replace(  # a spot the server never had: no delta removes it
        kept, ids=np.append(kept.ids, "zz-not-a-spot"), columns={c: np.append(a, a[:1]) for c, a in kept.columns.items()},
        blocks={b: Rows(*(np.concatenate([x, x[:int(kept.columns["n_" + b][0])]]) for x in (r.codes, r.scales)))
                for b, r in kept.blocks.items()}))
    store.save(extra)
    phone, doc = _catch_up(server, homes["corrupt"], extractor)
    assert phone.last_public[0] == "full" and doc.version == third.version

    fourth = remove_spots(own_index, [third.spots[-1].id])  # the first version leaves the disk
    _switch(server, fourth)
    assert not (own_index / "versions" / first.version).exists()
    phone, doc = _catch_up(server, homes["gone"], extractor)
    assert phone.last_public[0] == "full" and doc.version == fourth.version
