"""Dummy requests: the catalogue, personas, synthetic photos, the scheduler and the evaluation.

Real model, real photos, the real server code (in-process through the WSGI
adapter, or waitress for the CLI); the scheduler runs on a manual clock.
"""
from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_client.client import Client
from edge_client.config import ClientConfig
from edge_client.dummies.catalogue import Catalogue, haversine_km
from edge_client.dummies.generator import NaiveGenerator, PersonaGenerator, SyntheticPhotos
from edge_client.dummies.personas import Movement, Persona
from edge_client.dummies.plans import Dummy, Plan
from edge_client.dummies.scheduler import DummyScheduler, ManualClock, Sent
from edge_client.errors import ConfigError, ServerUnreachableError
from edge_client.protocol import wire
from edge_client.vision.extractor import Extractor
from lite_server.index.store import Index
from tests.conftest import make_subset
from tools import dataset as ds
from tools.inprocess import mount
from tools.live import LiveServer, free_port

DAY0 = 1_717_200_000.0 + 9 * 3600  # 09:00 UTC


def _client(app: Any, extractor: Extractor, **settings: Any) -> Client:
    """A phone on the in-process server; no answer cache (tests/test_cache.py covers it), so every
    photo asked here leaves as a request, repeated ones too."""
    settings.setdefault("cache", False)
    client = Client(ClientConfig(seed=3, **settings), extractor)
    client.config = ClientConfig(server=mount(client.session, app), seed=3, **settings)
    return client


@pytest.fixture(scope="module")
def real_features(extractor: Extractor, held_out: list[tuple[str, Path]]) -> list[tuple[str, np.ndarray]]:
    return [(spot, extractor.extract(photo)) for spot, photo in held_out[:6]]


@pytest.fixture()
def catalogue(app: Any, extractor: Extractor) -> Catalogue:
    with _client(app, extractor) as client:
        return client.catalogue()


def test_catalogue_is_the_public_documents_spots_with_their_looks(catalogue: Catalogue, index_dir: Path) -> None:
    index = Index.load(index_dir)
    assert catalogue.ids == sorted(s.id for s in index.spots if s.lat is not None)
    assert abs(catalogue.popularity.sum() - 1) < 1e-9 and 0.3 < catalogue.spread["cos_median"] < 0.99
    assert all(f.shape[1] == index.dim and np.allclose(np.linalg.norm(f, axis=1), 1, atol=1e-5)
               for f in catalogue.features)


def test_synthetic_photos_are_never_gallery_features(catalogue: Catalogue, index_dir: Path) -> None:
    gallery = np.asarray(Index.load(index_dir).features, np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    photos, rng = SyntheticPhotos(catalogue), np.random.default_rng(0)
    made = np.stack([photos.feature(row, rng) for row in range(len(catalogue)) for _ in range(20)])
    assert np.allclose(np.linalg.norm(made, axis=1), 1, atol=1e-5)
    assert (made @ gallery.T).max() < 0.995  # never a copy, nor a near-copy, of a gallery photo
    own = np.array([(catalogue.features[row] @ made[i]).max() for i, row in
                    enumerate(np.repeat(np.arange(len(catalogue)), 20))])
    # ... yet each looks like its own spot: closest to it as real photos are (leave-one-out median).
    assert np.median(own) > 0.6


def test_synthetic_photos_are_as_typical_as_real_ones_where_the_transform_sees_them(
        app: Any, catalogue: Catalogue) -> None:
    """Beside a learned whitening the document publishes the photos' spread in its space, and the
    dummies' photos are drawn there: projected as the transform projects them, they sit as far from
    their spot's centre as the published leave-one-out spread says real photos do."""
    doc = app.extensions["enfpire"].lookup
    basis = doc.codec.basis_
    spread = catalogue.spread
    assert catalogue.codec_features is not None and 0.3 < spread["codec_cos_median"] < 0.99
    photos, rng = SyntheticPhotos(catalogue), np.random.default_rng(0)
    cosines = []
    for row in range(len(catalogue)):
        anchors = catalogue.codec_features[row]
        centre = anchors.mean(axis=0) / np.linalg.norm(anchors.mean(axis=0))
        for _ in range(20):
            seen = basis @ photos.feature(row, rng)
            cosines.append(float(seen @ centre) / float(np.linalg.norm(seen)))
    assert abs(np.median(cosines) - spread["codec_cos_median"]) < 0.05, (np.median(cosines), spread)


def test_persona_routes_obey_speed_and_hours(catalogue: Catalogue) -> None:
    movement = Movement(utc_offset_s=0.0, dwell_median_s=600)
    rng = np.random.default_rng(1)
    persona = Persona(catalogue, movement, rng, DAY0)
    times = DAY0 + np.cumsum(rng.exponential(1200, size=300))  # ~4 days of photos, day and night
    spots = [persona.where(float(t)) for t in times]
    moves = list(persona.moves)
    assert len(moves) > 10 and len(set(spots)) > 5
    for move in moves:
        km = float(haversine_km(catalogue.lat[move.src], catalogue.lon[move.src],
                                catalogue.lat[move.dst], catalogue.lon[move.dst]))
        assert move.arrive - move.depart >= 3600 * km / movement.max_kmh - 1e-6
        assert 8 <= (move.depart % 86400) / 3600 < 20
    for (t1, a), (t2, b) in zip(zip(times, spots), zip(times[1:], spots[1:])):
        hops = [m for m in moves if t1 <= m.depart and m.arrive <= t2]  # trips made between two photos
        if a != b:  # a change of spot only ever through trips that started after the last photo there
            assert hops and hops[0].src == a and hops[-1].dst == b
        else:
            assert not hops or hops[-1].dst == b


def test_scheduler_sends_each_real_request_among_its_dummies(
        app: Any, extractor: Extractor, catalogue: Catalogue, real_features: list[tuple[str, np.ndarray]]) -> None:
    clock, sent = ManualClock(DAY0), []
    generator = PersonaGenerator(catalogue, 2, Movement(utc_offset_s=0.0), seed=5)
    with _client(app, extractor, transform="noise", k=12) as client:
        scheduler = DummyScheduler(client, generator, dummies=2, per_hour=1000, window=6.0, clock=clock,
                                   on_sent=sent.append)
        futures = []
        for i, (_, feature) in enumerate(real_features):
            scheduler.run_until(DAY0 + 300 * i, clock.sleep)
            futures.append(scheduler.submit(feature))
        scheduler.run_until(DAY0 + 300 * len(real_features), clock.sleep)
    assert scheduler.pending() == 0
    assert scheduler.counts["real"] == len(real_features) and scheduler.counts["dummy"] == 2 * len(real_features)
    assert [s.time for s in sent] == sorted(s.time for s in sent)
    for i in range(len(real_features)):  # each burst: one real, two dummies, all at the moment it was asked
        burst = [s for s in sent if DAY0 + 300 * i <= s.time <= DAY0 + 300 * i + 6.0]
        assert sorted(s.kind for s in burst) == ["dummy", "dummy", "real"]
        assert {s.persona for s in burst if s.kind == "dummy"} == {0, 1}
        assert all(s.time == DAY0 + 300 * i for s in burst)  # the real one never waits
    results = [f.result(timeout=0) for f in futures]
    right = sum(r.spot_id == spot for r, (spot, _) in zip(results, real_features))
    assert right >= len(real_features) - 2 and all(len(r.candidates) == 12 for r in results)


def test_persona_bursts_leave_at_once_with_the_real_one_at_a_uniform_rank(catalogue: Catalogue) -> None:
    generator = PersonaGenerator(catalogue, 2, Movement(utc_offset_s=0.0), seed=6)
    plans = [generator.plan(DAY0 + 60 * i, 2, 6.0) for i in range(600)]
    assert all(p.real_delay == 0 and len(p.dummies) == 2 and all(d.delay == 0 for d in p.dummies) for p in plans)
    ranks = np.bincount([p.real_rank for p in plans], minlength=3)
    assert len(ranks) == 3 and ranks.min() > 160  # 200 each expected; a skew would mark the real one
    first = np.bincount([p.dummies[0].persona for p in plans], minlength=2)
    assert first.min() > 250  # nor does a fixed persona order link a persona's requests across bursts


def test_scheduler_sends_dummies_before_and_after_the_real_one_in_plan_order(
        app: Any, extractor: Extractor, catalogue: Catalogue, real_features: list[tuple[str, np.ndarray]]) -> None:
    clock, sent = ManualClock(DAY0), []
    generator = PersonaGenerator(catalogue, 2, Movement(utc_offset_s=0.0), seed=7)
    ranks: list[int] = []
    with _client(app, extractor) as client:
        scheduler = DummyScheduler(client, generator, dummies=2, per_hour=1000, clock=clock, on_sent=sent.append)
        planned = generator.plan  # record each burst's drawn rank, then hand the plan on unchanged

        def spy(now: float, n: int, window: float) -> Plan:
            plan = planned(now, n, window)
            ranks.append(plan.real_rank)
            return plan

        generator.plan = spy  # type: ignore[method-assign]
        for i in range(9):
            scheduler.run_until(DAY0 + 120 * i, clock.sleep)
            scheduler.submit(real_features[i % len(real_features)][1])
            assert scheduler.run_due() == 3  # the whole burst is due the moment the photo is asked
    order = [[s.kind for s in sent[3 * i:3 * i + 3]].index("real") for i in range(9)]
    assert order == ranks and len(set(order)) > 1  # dummies went before the real one, and after
    assert scheduler.counts["dummy"] == scheduler.counts["dummy_planned"] == 18


def test_dummy_answers_never_reach_the_caller(
        app: Any, extractor: Extractor, catalogue: Catalogue, real_features: list[tuple[str, np.ndarray]]) -> None:
    """Exact queries (no transform) of other spots as dummies: any leak would show a wrong spot."""
    clock = ManualClock(DAY0)
    for spot, feature in real_features[:3]:
        keep = [i for i, s in enumerate(catalogue.ids) if s != spot]
        others = Catalogue([catalogue.ids[i] for i in keep], catalogue.lat[keep], catalogue.lon[keep],
                           catalogue.popularity[keep] / catalogue.popularity[keep].sum(),
                           [catalogue.features[i] for i in keep], catalogue.spread)
        with _client(app, extractor, transform="none") as client:
            scheduler = DummyScheduler(client, NaiveGenerator(others, seed=1, spread_s=5.0), dummies=2,
                                       per_hour=100, window=6.0, clock=clock)
            future = scheduler.submit(feature)
            scheduler.run_until(clock() + 10, clock.sleep)
            assert scheduler.counts == {**scheduler.counts, "real": 1, "dummy": 2}
            assert future.result(timeout=0).spot_id == spot


def test_budget_caps_dummies_per_hour(app: Any, extractor: Extractor, catalogue: Catalogue,
                                      real_features: list[tuple[str, np.ndarray]]) -> None:
    clock, sent = ManualClock(DAY0), []
    with _client(app, extractor) as client:
        scheduler = DummyScheduler(client, PersonaGenerator(catalogue, 2, seed=2), dummies=2, per_hour=3,
                                   window=1.0, clock=clock, on_sent=sent.append)
        for i in range(4):  # four real requests in ten minutes: only three dummies allowed
            scheduler.run_until(DAY0 + 150 * i, clock.sleep)
            scheduler.submit(real_features[i][1])
        scheduler.run_until(DAY0 + 3700, clock.sleep)  # an hour later the budget is back
        scheduler.submit(real_features[4][1])
        scheduler.run_until(DAY0 + 3710, clock.sleep)
    kinds = [s.kind for s in sent]
    assert kinds.count("real") == 5 and kinds.count("dummy") == 3 + 2
    assert scheduler.counts["dummy_capped"] == 5


class _Fixed:
    """A generator that plans the same burst every time (at most ``n`` of its dummies)."""

    def __init__(self, plan: Plan):
        self.fixed = plan

    def plan(self, now: float, n: int, window: float) -> Plan:
        return Plan(self.fixed.real_delay, self.fixed.dummies[:n], self.fixed.real_rank)


def test_one_shot_answers_first_then_sends_the_rest_of_the_burst_before_returning(
        app: Any, extractor: Extractor, real_features: list[tuple[str, np.ndarray]],
        held_out: list[tuple[str, Path]]) -> None:
    spot, photo = held_out[0]
    other = real_features[3][1]  # another spot's photo as the dummy: a leak would answer its spot
    seen: list[tuple[str | None, dict[str, int]]] = []
    sent: list[Sent] = []
    with _client(app, extractor, transform="none") as client:
        late = _Fixed(Plan(0.0, [Dummy(0, "other", other, 1.0)]))  # its dummy leaves 1 s after the real one
        scheduler = DummyScheduler(client, late, dummies=1, per_hour=100, on_sent=sent.append)
        result = scheduler.recognize_once(photo, lambda r: seen.append((r.spot_id, dict(scheduler.counts))))
    assert seen[0][0] == result.spot_id == spot != real_features[3][0]
    assert seen[0][1]["real"] == 1 and seen[0][1]["dummy"] == 0  # the answer did not wait for the dummy
    assert [s.kind for s in sent] == ["real", "dummy"] and sent[1].time - sent[0].time >= 0.9
    assert scheduler.pending() == 0 and scheduler._thread is not None and not scheduler._thread.is_alive()


class _SlowDummies:
    """WSGI middleware: any candidates request but the one carrying ``real`` takes ``delay`` s."""

    def __init__(self, app: Any, real: dict[str, Any], delay: float):
        self.app, self.real, self.delay = app, real, delay

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        import io
        import time

        if environ.get("PATH_INFO") == "/v1/candidates":
            raw = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = io.BytesIO(raw)
            if json.loads(raw).get("vector") != self.real:
                time.sleep(self.delay)
        return self.app(environ, start_response)


def test_background_thread_sends_a_burst_together_so_the_real_answer_never_waits_for_a_dummy(
        extractor: Extractor, index_dir: Path, real_features: list[tuple[str, np.ndarray]]) -> None:
    from lite_server.api.app import create_app
    from lite_server.config import ServerConfig

    spot, feature = real_features[0]
    app = create_app(ServerConfig(index=str(index_dir)))
    app.wsgi_app = _SlowDummies(app.wsgi_app, wire.encode(feature), 1.5)  # type: ignore[method-assign]
    dummies = [Dummy(i, "other", real_features[1 + i][1], 0.0) for i in range(2)]
    seen: list[dict[str, int]] = []
    with _client(app, extractor, transform="none") as client:
        with DummyScheduler(client, _Fixed(Plan(0.0, dummies, real_rank=2)), dummies=2, per_hour=100) as scheduler:
            result = scheduler.recognize_feature(feature, timeout=30)  # planned last of its burst
            seen.append(dict(scheduler.counts))
    assert result.spot_id == spot
    assert seen[0]["real"] == 1 and seen[0]["dummy"] == 0  # answered while both dummies were still out
    assert scheduler.counts["dummy"] == 2 and scheduler.pending() == 0


def test_scheduler_is_given_its_generator(app: Any, extractor: Extractor) -> None:
    """The scheduler never builds a generator itself (no import of edge_client.dummies.generator): the caller injects one."""
    with _client(app, extractor) as client:
        with pytest.raises(ConfigError):
            DummyScheduler(client, dummies=2)
        assert DummyScheduler(client, dummies=0).pending() == 0  # no dummies, no generator needed
        made: list[PersonaGenerator] = []
        factory = lambda: made.append(PersonaGenerator.from_client(client)) or made[-1]  # noqa: E731
        scheduler = DummyScheduler(client, factory, dummies=2, clock=ManualClock(DAY0))
        for _ in range(2):
            scheduler.submit(np.ones(extractor.dim, np.float32) / np.sqrt(extractor.dim))
    assert len(made) == 1 and scheduler.counts["dummy_planned"] == 4  # made once, on first use


def test_scheduler_survives_server_errors_and_keeps_its_budget(
        extractor: Extractor, catalogue: Catalogue, real_features: list[tuple[str, np.ndarray]]) -> None:
    config = ClientConfig(server=f"http://127.0.0.1:{free_port()}", retries=0, connect_timeout=0.5, seed=1,
                          transform="noise")  # the fake info below publishes no cells
    clock = ManualClock(DAY0)
    with Client(config, extractor) as client:
        client._info = {"protocol": 1, "model_sha256": extractor.sha256, "dim": extractor.dim}  # as if fetched earlier
        client._fitted = True
        scheduler = DummyScheduler(client, PersonaGenerator(catalogue, 2, seed=3), dummies=2, per_hour=100,
                                   window=2.0, clock=clock)
        futures = [scheduler.submit(real_features[0][1])]
        scheduler.run_until(DAY0 + 60, clock.sleep)
        futures.append(scheduler.submit(real_features[1][1]))
        scheduler.run_until(DAY0 + 120, clock.sleep)
    assert scheduler.counts["real_failed"] == 2 and scheduler.counts["dummy_failed"] == 4
    assert scheduler.counts["dummy"] == 4  # a failure is not a refund: the same budget as success
    for future in futures:
        with pytest.raises(ServerUnreachableError):
            future.result(timeout=0)


def test_background_thread_answers_and_stops(app: Any, extractor: Extractor, catalogue: Catalogue,
                                             real_features: list[tuple[str, np.ndarray]]) -> None:
    sent: list[Sent] = []
    with _client(app, extractor) as client:
        scheduler = DummyScheduler(client, PersonaGenerator(catalogue, 2, seed=4), dummies=2, window=0.2,
                                   on_sent=sent.append)
        with scheduler:
            result = scheduler.recognize_feature(real_features[0][1], timeout=30)
            late = scheduler.submit(real_features[1][1])
        # stop() drained the second burst on schedule before returning
        assert late.result(timeout=0).candidates and result.candidates
        assert [s.kind for s in sent].count("dummy") == 4 and scheduler.pending() == 0
        with pytest.raises(RuntimeError):
            scheduler.submit(real_features[0][1])
        scheduler = DummyScheduler(client, PersonaGenerator(catalogue, 2, seed=4), dummies=2, window=3600).start()
        pending = scheduler.submit(real_features[0][1])
        scheduler.stop(drain=False, timeout=10)
        assert pending.cancelled() and scheduler.pending() == 0
        assert scheduler._thread is not None and not scheduler._thread.is_alive()


def test_cli_recognize_sends_dummies_by_default(live_server: LiveServer, held_out: list[tuple[str, Path]]) -> None:
    spot, photo = held_out[2]
    def recognize(*flags: str) -> dict[str, Any]:
        run = subprocess.run([sys.executable, "-m", "edge_client.cli", "recognize", str(photo), "--server",
                              live_server.url, "--json", "--seed", "1", *flags],
                             capture_output=True, text=True, timeout=120, env=_environ())
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)  # type: ignore[no-any-return]

    for flags, dummies in ((["--no-cache"], 2), (["--no-cache", "--no-dummies"], 0), (["--no-cache", "--dummies", "1"], 1)):
        answer = recognize(*flags)
        # The closed-set best: whether the open set keeps this photo is not what this test is about.
        assert answer["candidates"][0] == spot and answer["dummies"] == dummies
    # With the answer cache (the default) the second run of one photo sends nothing, dummies neither.
    first, second = recognize(), recognize()
    assert first["candidates"][0] == second["candidates"][0] == spot and first["spot_id"] == second["spot_id"]
    assert first["bytes_sent"] > 0 and second["bytes_sent"] == 0 and second["dummies"] == 0


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_dummy_evaluation_on_a_small_subset(tmp_path: Path) -> None:
    from tools.evaluate import history

    dataset = make_subset(tmp_path / "data", spots=24, per_spot=8)
    args = Namespace(dataset=dataset, out=tmp_path / "out", users=6, train_fraction=0.5, dummies=2, window=6.0,
                     per_hour=120, transform="", strength=None, k=None, seed=0, cache_dir=ds.CACHE,
                     min_photos=ds.MIN_PHOTOS, query_fraction=ds.QUERY_FRACTION)
    assert history.main(args, "test") == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    fields = ["dummy_ratio", "traffic_overhead", "detector_auc", "history_precision", "history_recall", "user_top1"]
    for block in (metrics, metrics["naive"]):
        assert all(0 <= block[f] <= 3 for f in fields), block
        for name in ("detector_auc", "history_precision"):  # intervals resample the target devices
            assert block[f"{name}_ci95"][0] <= block[name] <= block[f"{name}_ci95"][1], (name, block)
        assert 1.5 <= block["dummy_ratio"] <= 2.0
    assert (tmp_path / "out" / "trajectories.png").stat().st_size > 10_000
    report = (tmp_path / "out" / "report.md").read_text()
    assert "detector AUC" in report
    # The strongest spot guesser, the Bayes posteriors among the candidates, and its dummies-off reference.
    guessers = metrics["spot_guesser_top1"]
    assert {"linear", "knn", "bayes", "bayes_loo"} <= set(guessers)
    assert guessers[metrics["spot_guesser"]] == max(guessers.values())
    reference, interval = metrics["history_precision_reference"], metrics["history_precision_reference_ci95"]
    assert reference == metrics["no_dummies"]["history_precision"] and interval[0] <= reference <= interval[1]
    assert "- reference: history precision with dummies off" in report and "| none (reference) |" in report
    relative = metrics["history_precision_x_reference"]
    if reference > 0:
        assert abs(relative - metrics["history_precision"] / reference) < 1e-9
