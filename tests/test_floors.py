"""Privacy floors the phone holds itself (issue 26): a server that lies about its structure is
refused before anything is sent, and one that lies about popularity cannot steer the decoys.

The attacks run against real server code on loopback: ``enfpire-server serve`` run with
``cell_min_spots: 1``, whose own request log shows what reached it, and the real app behind a
wrapper that rewrites its public document (a popularity "sink") and records every request.
"""
from __future__ import annotations

import dataclasses
import io
import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from edge_client import android, cli
from edge_client.client import Client
from edge_client.config import ClientConfig, load_config
from edge_client.dummies.generator import PersonaGenerator
from edge_client.errors import ConfigError, EnfPireError, PrivacyFloorError
from edge_client.privacy import floors
from edge_client.privacy.floors import Floors, check, decoy_weights
from edge_client.privacy.transforms import Cells, make_transform
from edge_client.protocol import wire
from edge_client.protocol.public import PublicParams, Rows, canonical, parse
from edge_client.vision.extractor import Extractor
from lite_server.config import ServerConfig
from tests.conftest import copy_index
from tools.live import LiveServer

# --- the floor check --------------------------------------------------------------------------------


def _doc(cells: list[int], photos: list[int] | None = None, prototypes: list[int] | None = None,
         n_cells: int | None = None, dim: int = 8) -> PublicParams:
    """A valid document with one spot per entry of ``cells``."""
    n = len(cells)
    photos = [5] * n if photos is None else photos
    prototypes = [2] * n if prototypes is None else prototypes
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((sum(prototypes), dim))
    columns = {"lat": np.zeros(n, np.float32), "lon": np.zeros(n, np.float32), "cell": np.array(cells, np.uint16),
               "photos": np.array(photos, np.uint32), "n_prototypes": np.array(prototypes, np.uint8),
               "n_looks": np.zeros(n, np.uint8)}
    return canonical(PublicParams(
        "v1", np.array([f"spot-{i:04d}" for i in range(n)]), columns,
        {"prototypes": Rows(*wire.quantize(rows)), "looks": Rows(*wire.quantize(np.zeros((0, dim))))}, None,
        {"n_cells": max(cells, default=-1) + 1 if n_cells is None else n_cells, "spread": {}, "codec": {"kind": "none"}}))


def test_an_honest_structure_passes_the_default_floors() -> None:
    check(_doc([c for c in range(3) for _ in range(10)]), Floors())  # 3 cells of 10
    check(_doc([]), Floors())  # nothing to hide behind, nothing to check
    check(_doc([0] * 15), Floors())  # a small catalogue is one cell: its queries name it whole
    with pytest.raises(PrivacyFloorError, match="min_cells 1 is below this phone's floor 2"):
        check(_doc([0] * 15), Floors(min_cells=2))  # unless a phone asks for more
    assert Floors() == Floors.from_config(ClientConfig())


@pytest.mark.parametrize("doc, floor, value", [
    (_doc([0] * 10 + [1] * 9), "min_cell_spots", 9),                             # one cell one spot short
    (_doc(list(range(30))), "min_cell_spots", 1),                                 # cell_min_spots: 1
    (_doc([0] * 30, n_cells=0), "min_cells", 0),                                 # no cells
    (_doc([0] * 10 + [1] * 10, photos=[5] * 11 + [0] * 9), "min_cell_spots", 1),  # "nobody photographs them"
    (_doc([0] * 10 + [1] * 10, prototypes=[2] * 19 + [0]), "min_cell_spots", 9),  # a spot no photo can be of
    (_doc([0] * 10 + [1] * 9 + [5], n_cells=2), "min_cell_spots", 0),             # a spot beyond n_cells
])
def test_a_structure_below_a_floor_is_refused_naming_the_floor_and_the_value(
        doc: PublicParams, floor: str, value: int) -> None:
    with pytest.raises(PrivacyFloorError) as caught:
        check(doc, Floors())
    assert caught.value.floor == floor and caught.value.value == value
    assert floor in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value, EnfPireError)
    if value:
        check(doc, Floors(min_cell_spots=value))  # a phone may lower its floors


def test_floors_are_layered_settings_and_checked() -> None:
    config = load_config(ClientConfig, env={"ENFPIRE_MIN_CELL_SPOTS": "20", "ENFPIRE_DECOY_UNIFORM": "0.5"})
    assert (config.min_cell_spots, config.decoy_uniform) == (20, 0.5)
    for bad in ({"min_cell_spots": 0}, {"min_cells": 0}, {"max_decoy_share": 0}, {"max_decoy_share": 1.5},
                {"decoy_uniform": -0.1}, {"decoy_uniform": 2}, {"max_decoy_cell_ratio": 0.5}):
        with pytest.raises(ConfigError):
            ClientConfig(**bad)  # type: ignore[arg-type]


# --- the decoy draw ------------------------------------------------------------------------------------


def test_decoy_weights_mix_in_a_uniform_share_and_cap_every_spot() -> None:
    honest = np.array([5.0, 10, 20, 15, 50] + [10] * 15)
    p = honest / honest.sum()
    q = decoy_weights(honest, max_share=0.5, uniform=0.25)
    assert np.allclose(q, 0.75 * p + 0.25 / len(p)) and abs(q.sum() - 1) < 1e-12  # nothing over the cap
    assert np.allclose(decoy_weights(honest, 1.0, 0.0), p)  # no cap and no uniform share: the popularity
    sink = np.zeros(100)
    sink[7] = 1.0
    q = decoy_weights(sink, max_share=0.1, uniform=0.25)
    assert q[7] == pytest.approx(0.1) and np.allclose(np.delete(q, 7), 0.9 / 99)
    two = np.array([1000.0, 1000.0] + [1.0] * 18)  # the excess of one capped spot must not push another over
    q = decoy_weights(two, max_share=0.1, uniform=0.0)
    assert q.max() <= 0.1 + 1e-12 and abs(q.sum() - 1) < 1e-12
    assert np.allclose(decoy_weights(np.ones(5), max_share=0.01), 0.2)  # a cap below 1/n cannot be met: uniform
    assert np.allclose(decoy_weights(np.zeros(4), uniform=0.0), 0.25)
    assert np.allclose(decoy_weights(np.array([np.nan, np.inf, -1.0, 1.0]), 1.0, 0.0), [0, 0, 0, 1])


def test_decoy_weights_cap_every_cell_too() -> None:
    """A sink spread over the spots of one cell, each under the spot cap, is capped as a cell."""
    cells = np.repeat(np.arange(20), 10)
    sink = np.where(cells == 0, 6000.0, 1.0)
    uncapped = np.bincount(cells, decoy_weights(sink, 0.1, 0.25))
    assert uncapped[0] > 0.7  # the spot cap alone: three quarters of the decoys in one cell
    q = decoy_weights(sink, 0.1, 0.25, cells, max_cell_ratio=3.0)
    mass = np.bincount(cells, q)
    assert mass[0] == pytest.approx(3.0 * 10 / 200) and np.allclose(mass[1:], mass[1])
    assert q.max() <= 0.1 + 1e-12 and abs(q.sum() - 1) < 1e-12
    honest = np.random.default_rng(0).zipf(2.0, 200).astype(float)  # under both caps: left as it was
    assert np.allclose(decoy_weights(honest, 1.0, 0.25, cells, 1e9), decoy_weights(honest, 1.0, 0.25))
    zero_cell = np.where(cells == 3, 0.0, 1.0)  # no weight in a cell and no uniform share: still capped, summing to 1
    q = decoy_weights(zero_cell, 1.0, 0.0, cells, 1.0)
    assert np.allclose(np.bincount(cells, q), 0.05)


def _cells_doc(n_cells: int = 10, per_cell: int = 10, dim: int = 16, seed: int = 0) -> PublicParams:
    """A document whose cells are real clusters: each spot's prototypes near its cell's centre."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_cells, dim))
    cells = np.repeat(np.arange(n_cells), per_cell)
    protos = np.repeat(centres[cells], 2, axis=0) + 0.3 * rng.standard_normal((2 * len(cells), dim))
    doc = _doc(cells.tolist(), dim=dim)
    return dataclasses.replace(doc, blocks={**doc.blocks, "prototypes": Rows(*wire.quantize(protos))})


def _sink(doc: PublicParams, sink: int, rest: int = 0) -> PublicParams:
    """``doc`` whose every spot has ``rest`` photos but ``sink``, which has all the others."""
    photos = np.full(len(doc), rest, np.uint32)
    photos[sink] = 60000
    return dataclasses.replace(doc, columns={**doc.columns, "photos": photos})


def test_a_popularity_sink_cannot_steer_the_cells_decoys() -> None:
    doc = _cells_doc()
    sink = 17
    transform = Cells().fit(_sink(doc, sink, rest=1))
    rng = np.random.default_rng(0)
    # The decoys' spots: the sink gets its capped share, every other spot its uniform part at least.
    assert transform.popularity_[sink] == pytest.approx(floors.MAX_DECOY_SHARE)
    assert transform.popularity_.min() >= floors.DECOY_UNIFORM / len(doc)
    groups = Counter(tuple(sorted(transform.choose(transform.decoy(rng)))) for _ in range(2000))
    sink_cell = int(doc.columns["cell"][sink])
    with_sink = sum(n for g, n in groups.items() if sink_cell in g) / 2000
    assert with_sink < 0.4, with_sink  # the sink's cell is in few decoy groups, not in all
    assert len(groups) >= 10
    # Uncapped (the phone before its floors) every decoy group was the sink's own.
    steered = Cells()
    steered.max_decoy_share, steered.decoy_uniform, steered.max_decoy_cell_ratio = 1.0, 0.0, 1e9
    steered.fit(_sink(doc, sink, rest=1))
    assert all(sink_cell in steered.choose(steered.decoy(rng)) for _ in range(200))


def test_a_one_cell_sink_cannot_steer_the_cells_decoys() -> None:
    doc = _cells_doc()
    photos = np.where(doc.columns["cell"] == 4, 6000, 1).astype(np.uint32)
    transform = Cells().fit(dataclasses.replace(doc, columns={**doc.columns, "photos": photos}))
    in_cell = transform.popularity_[doc.columns["cell"] == 4].sum()
    assert in_cell == pytest.approx(floors.MAX_DECOY_CELL_RATIO * 10 / len(doc))


def test_mix_decoys_are_capped_per_spot_too() -> None:
    doc = dataclasses.replace(_sink(_cells_doc(dim=16), 3, rest=1), basis=np.eye(16, 32).astype(np.float16),
                              settings={"n_cells": 10, "spread": {}, "codec": {"kind": "pca", "dim": 16}})
    transform = make_transform("mix").fit(doc)
    per_spot = np.bincount(doc.spot_of("prototypes"), weights=transform.weights_)
    assert per_spot[3] == pytest.approx(floors.MAX_DECOY_SHARE) and abs(per_spot.sum() - 1) < 1e-9


# --- a server run with cell_min_spots: 1 ------------------------------------------------------------


@pytest.fixture(scope="module")
def one_spot_cells(index_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The real server with ``cell_min_spots: 1`` in its config file, logging every request it gets."""
    home = tmp_path_factory.mktemp("lying")
    config = home / "server.json"
    config.write_text(json.dumps({"cell_min_spots": 1, "log_peers": True}))
    server = LiveServer(copy_index(index_dir, home), "--config", str(config), "-v")
    yield server
    server.stop()


def _received(server: LiveServer, path: str) -> int:
    """How many requests for ``path`` the server's own request log shows."""
    return server.output().count(f"POST {path}" if path == "/v1/candidates" else f"GET {path}")


def test_a_server_with_one_spot_cells_is_refused_and_gets_no_candidates_request(
        one_spot_cells: LiveServer, extractor: Extractor, held_out: list[tuple[str, Path]],
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    server = one_spot_cells
    photo = held_out[0][1]
    feature = extractor.extract(photo)
    before = _received(server, "/v1/candidates")
    # The library, with its dummies: refused before any request leaves.
    with Client(ClientConfig(server=server.url, seed=0), extractor) as client:
        with pytest.raises(PrivacyFloorError) as caught:
            client.recognize_feature(feature)
    assert caught.value.floor == "min_cell_spots" and caught.value.value == 1
    # The command line: one line on stderr, exit 2.
    assert cli.main(["recognize", str(photo), "--server", server.url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: refused") and "min_cell_spots" in err
    # Android: a JSON error like its others.
    answer = json.loads(android.recognize_jpeg(photo.read_bytes(), server.url, json.dumps({"state_dir": str(tmp_path)})))
    android.close_all()
    assert answer["ok"] is False and answer["error"]["type"] == "PrivacyFloorError"
    assert "min_cell_spots" in answer["error"]["message"]
    assert _received(server, "/v1/public") >= 3  # each of them did ask for the document ...
    assert _received(server, "/v1/candidates") == before  # ... and sent nothing after it
    # A phone that lowers its own floor to the server's structure is served (the log does count).
    with Client(ClientConfig(server=server.url, seed=0, min_cell_spots=1, dummies=0), extractor) as client:
        client.recognize_feature(feature)
    assert _received(server, "/v1/candidates") == before + 1


# --- a server whose document sinks all popularity into one spot --------------------------------------


class Lying:
    """The real server app on loopback behind a wrapper that rewrites its public document with
    ``lie`` (and the digest ``/v1/info`` names to match) and records every request it receives."""

    def __init__(self, app: Any, lie: Callable[[PublicParams], PublicParams]):
        from werkzeug.serving import make_server

        self.app, self.lie = app, lie
        self.hits: Counter[str] = Counter()
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.server = make_server("127.0.0.1", 0, self, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def document(self) -> PublicParams:
        return self.lie(parse(self.app.test_client().get("/v1/public").get_json()))

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        from werkzeug.wrappers import Request, Response

        request = Request(environ)
        with self._lock:
            self.hits[request.path] += 1
        if request.path == "/v1/candidates":
            body = request.get_data()
            with self._lock:
                self.bodies.append(json.loads(body))
            environ["wsgi.input"] = io.BytesIO(body)
        if request.path == "/v1/public":
            payload = self.document().to_payload()  # the whole (lying) document, also for ?since=
            return Response(json.dumps(payload), mimetype="application/json")(environ, start_response)
        if request.path == "/v1/info":
            info = self.app.test_client().get("/v1/info").get_json()
            info["public"]["digest"] = self.document().digest
            return Response(json.dumps(info), mimetype="application/json")(environ, start_response)
        return self.app(environ, start_response)

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(10)


@pytest.fixture(scope="module")
def fine_app(index_dir: Path) -> Any:
    """The session index in cells of 3 spots (8 cells): room for decoys to go elsewhere."""
    from lite_server.api.app import create_app

    return create_app(ServerConfig(index=str(index_dir), cell_min_spots=3))


def _sink_row(doc: PublicParams) -> int:
    return int(np.argmax(doc.columns["photos"]))


def test_a_popularity_sink_of_zeros_is_refused_and_gets_no_candidates_request(
        app: Any, extractor: Extractor, held_out: list[tuple[str, Path]]) -> None:
    """Every spot popularity 0 but one: no cell holds the floor's spots with photos."""
    lying = Lying(app, lambda doc: _sink(doc, sink=0, rest=0))
    try:
        with Client(ClientConfig(server=lying.url, seed=0), extractor) as client:
            with pytest.raises(PrivacyFloorError) as caught:
                client.recognize_feature(extractor.extract(held_out[0][1]))
        assert caught.value.floor == "min_cell_spots"
        assert lying.hits["/v1/public"] >= 1 and lying.hits["/v1/candidates"] == 0
    finally:
        lying.stop()


def test_a_popularity_sink_does_not_steer_decoys_or_dummies(
        fine_app: Any, extractor: Extractor, held_out: list[tuple[str, Path]]) -> None:
    """Every spot 1 photo but one with 60,000: accepted (the structure is honest) but the decoys
    are capped and mixed, so the real cells do not stand out and the dummies are not all the sink's."""
    lying = Lying(fine_app, lambda doc: _sink(doc, sink=0, rest=1))
    try:
        doc = lying.document()
        sink_cell = int(doc.columns["cell"][_sink_row(doc)])
        # Fresh decoys each request: with stable decoys (the default) a day's photos in the same real
        # cells repeat one message, so 24 photos in 8 cells were a handful of draws and the count below
        # swung from one day's decoys to another's (0 to 11 of 24 over 60 days, measured). Each photo is
        # asked twice: 48 draws.
        config = ClientConfig(server=lying.url, seed=0, min_cell_spots=3, dummies=0, cache=False,
                              stable_decoys=False)
        features = [extractor.extract(p) for _, p in held_out] * 2
        reals = []
        with Client(config, extractor) as client:
            for feature in features:
                client.recognize_feature(feature)
                reals.append(set(client.transform.real_cells(feature)))
            # The personas of the dummy requests start by the (capped) popularity.
            starts = [PersonaGenerator(client.catalogue(), personas=1, seed=s).plan(0.0, 1, 0.0).dummies[0].spot_id
                      for s in range(60)]
        assert lying.hits["/v1/candidates"] == len(features)
        # The server's view: each request less the cells that decoys drawn from the sink name (the
        # lying server knows them). Steered decoys all land there, leaving only the real cells: the
        # true spot among a few. The sink's groups, as the phone without floors would draw them:
        steered = make_transform("cells")
        steered.max_decoy_share, steered.decoy_uniform, steered.max_decoy_cell_ratio = 1.0, 0.0, 1e9
        steered.fit(doc)
        rng = np.random.default_rng(1)
        sunk = {c for _ in range(300) for c in steered.choose(steered.decoy(rng))}
        stand_out = sum(set(b["cells"]) - sunk <= real for b, real in zip(lying.bodies, reals))
        assert sink_cell in sunk and len(sunk) < doc.n_cells // 2, sunk
        # Measured: 5 of 48; 0.15 of requests over 40 seeds (at most 9 of 24); without the floors every one.
        assert stand_out <= len(features) // 3, f"{stand_out} of {len(features)} requests: only their real cells left"
        at_sink = sum(s == doc.ids[_sink_row(doc)] for s in starts)
        assert at_sink <= 20, f"{at_sink} of 60 personas start at the sink"  # about 0.1 of 60, not all
    finally:
        lying.stop()


def test_a_delta_below_the_floors_is_refused_and_the_kept_document_stays(
        app: Any, extractor: Extractor, held_out: list[tuple[str, Path]], tmp_path: Path) -> None:
    """An honest document first, then the server "moves on" to a version in one-spot cells, sent
    as a delta: the phone checks the document the delta makes before keeping or using it."""
    from lite_server.search.publication import delta
    from tools.inprocess import mount

    honest = parse(app.test_client().get("/v1/public").get_json())
    spots = len(honest)
    lying = dataclasses.replace(honest, version=honest.version + "-lying",
                                columns={**honest.columns, "cell": np.arange(spots, dtype=np.uint16)},
                                settings={**honest.settings, "n_cells": spots})
    moved = {"now": False}
    hits: Counter[str] = Counter()

    def server(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        from werkzeug.wrappers import Request, Response

        request = Request(environ)
        hits[request.path] += 1
        if moved["now"] and request.path == "/v1/info":
            info = app.test_client().get("/v1/info").get_json()
            info.update(index_version=lying.version, public={"index_version": lying.version, "digest": lying.digest})
            return Response(json.dumps(info), mimetype="application/json")(environ, start_response)
        if moved["now"] and request.path == "/v1/public":
            assert request.args.get("since") == honest.digest  # the phone asks for a delta ...
            hits["delta"] += 1
            return Response(json.dumps(delta(honest, lying)), mimetype="application/json")(environ, start_response)
        return app(environ, start_response)

    class Wsgi:
        def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            return server(environ, start_response)

        def test_client(self) -> Any:
            from werkzeug.test import Client as TestClient

            return TestClient(self)

    with Client(ClientConfig(seed=0, dummies=0, state_dir=str(tmp_path)), extractor) as client:
        url = mount(client.session, Wsgi())
        client.config = dataclasses.replace(client.config, server=url)
        feature = extractor.extract(held_out[0][1])
        client.recognize_feature(feature)
        assert hits["/v1/candidates"] == 1
        moved["now"] = True
        client.clear_cache()  # forget the kept /v1/info: the next call sees the new version
        client._project = None
        with pytest.raises(PrivacyFloorError) as caught:
            client.recognize_feature(feature)
        assert hits["delta"] == 1  # ... and gets one
        assert caught.value.floor == "min_cell_spots"
        assert hits["/v1/candidates"] == 1  # nothing more was sent
        assert client.public_store.load().version == honest.version  # the refused document was not kept


def test_a_kept_document_is_checked_again_against_raised_floors(
        app: Any, extractor: Extractor, held_out: list[tuple[str, Path]], tmp_path: Path) -> None:
    """The session index is 2 cells of 12 spots: kept by a phone with the default floors, then refused
    by the same phone once its owner asks for 13 spots a cell, with no request but the document's."""
    from tools.inprocess import mount

    feature = extractor.extract(held_out[0][1])

    def phone(**floors_: Any) -> tuple[Client, list[str]]:
        client = Client(ClientConfig(seed=0, dummies=0, state_dir=str(tmp_path), **floors_), extractor)
        client.config = dataclasses.replace(client.config, server=mount(client.session, app))
        sent: list[str] = []
        client.session.hooks["response"].append(lambda r, *a, **k: sent.append(r.request.path_url))
        return client, sent

    client, sent = phone()
    with client:
        client.recognize_feature(feature)
    assert sent[-1] == "/v1/candidates" and client.public_store.load() is not None
    client, sent = phone(min_cell_spots=13)
    with client, pytest.raises(PrivacyFloorError, match="min_cell_spots 12 is below this phone's floor 13"):
        client.recognize_feature(feature)
    assert "/v1/candidates" not in sent and client.last_public[0] != "full"  # refused as kept, not downloaded
