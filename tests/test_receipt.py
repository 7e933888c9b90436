"""The privacy receipt on every answer and the privacy floor (issue 27, items 4 and 5).

Real model, real photos, the real server code: in-process where requests are counted, on loopback
for the command line and the Android entry points.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from edge_client.cli import build_parser, overrides
from edge_client.cli import main as client_main
from edge_client.client import Client
from edge_client.config import ClientConfig, load_config
from edge_client.errors import ConfigError
from edge_client.privacy import posterior, receipt, transforms
from edge_client.privacy.receipt import ReceiptModel
from edge_client.privacy.transforms import make_transform
from edge_client.vision.extractor import Extractor
from lite_server.api.app import create_app
from lite_server.config import ServerConfig
from tests.conftest import make_subset
from tools.inprocess import mount
from tools.live import LiveServer

URL = "http://enfpire.invalid"


def _brute_completions(message: tuple[int, ...], decoys: dict[tuple[int, ...], float], d: int) -> np.ndarray:
    """The decoy term by enumerating every sequence of d groups (the attacker's former computation)."""
    local = {cell: 1 << i for i, cell in enumerate(message)}
    out = np.zeros(1 << len(message))
    inside = [(sum(local[c] for c in g), q) for g, q in decoys.items() if all(c in local for c in g)]
    for picks in itertools.product(inside, repeat=d):
        union = 0
        for mask, _ in picks:
            union |= mask
        p = float(np.prod([q for _, q in picks]))
        for real in range(1 << len(message)):
            if union | real == (1 << len(message)) - 1:
                out[real] += p
    return out


@pytest.mark.parametrize("d", [0, 1, 2, 3])
def test_the_decoy_term_is_the_enumeration_it_replaced(d: int) -> None:
    rng = np.random.default_rng(d)
    message = (1, 4, 5, 9, 12)
    groups = {tuple(sorted(rng.choice([1, 4, 5, 9, 12, 20], size=rng.integers(1, 4), replace=False).tolist())):
              float(q) for q in rng.dirichlet(np.ones(12))}
    assert np.allclose(posterior.decoy_completions(message, groups, d), _brute_completions(message, groups, d),
                       atol=1e-12)
    mixed = posterior.decoy_completions(message, groups, {d: 0.25, d + 1: 0.75})
    expected = 0.25 * _brute_completions(message, groups, d) + 0.75 * _brute_completions(message, groups, d + 1)
    assert np.allclose(mixed, expected, atol=1e-12)


@pytest.fixture(scope="module")
def fine_app(index_dir: Path):  # type: ignore[no-untyped-def]
    """The test index in cells of 3 spots (8 cells), so a message leaves some spots out."""
    return create_app(ServerConfig(index=str(index_dir), cell_min_spots=3))


def _phone(app, extractor: Extractor, state: Path, **settings) -> Client:  # type: ignore[no-untyped-def]
    client = Client(ClientConfig(server=URL, state_dir=str(state), min_cell_spots=3, dummies=0, seed=3, **settings),
                    extractor, make_transform("cells"))
    mount(client.session, app, URL)
    return client


def test_a_real_query_carries_a_sane_receipt_and_the_same_message_the_same_one(
        fine_app, extractor: Extractor, held_out, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spot, photo = held_out[2]
    feature = extractor.extract(photo)
    with _phone(fine_app, extractor, tmp_path / "a") as phone:
        body, result = phone.ask(feature)
        n_spots = len(phone.public())
        receipt = result.privacy
        assert body is not None and receipt is not None and receipt["request_sent"]
        assert receipt["cells_sent"] == len(body["cells"])
        assert 1.0 <= receipt["plausible_spots"] <= n_spots
        assert 1.0 / n_spots <= receipt["server_top1_probability"] <= 1.0
        assert result.spot_id is None or 0.0 <= receipt["answer_probability"] <= receipt["server_top1_probability"]
        # Fewer spots are plausible than the named cells hold: the posterior is not just "the cells".
        members = int(np.isin(phone.transform.spot_cell_, body["cells"]).sum())
        assert receipt["plausible_spots"] <= members
        # Asked again, the answer comes from the phone's cache: nothing was sent, and the receipt says so.
        again_body, again = phone.ask(feature)
        assert again_body is None and again.privacy is not None and again.privacy["request_sent"] is False
    # Another phone (a new model of the same public document) computes the same receipt for that message.
    with _phone(fine_app, extractor, tmp_path / "b") as other:
        other.check_model()
        fresh = ReceiptModel(other.transform, other.public().popularity)
        rows = np.flatnonzero(other.public().ids == result.spot_id)
        assert fresh.receipt(tuple(body["cells"]), int(rows[0]) if len(rows) else None) == receipt


def test_vector_transforms_have_no_receipt(fine_app, extractor: Extractor, held_out,
                                           tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = Client(ClientConfig(server=URL, state_dir=str(tmp_path), min_cell_spots=3, dummies=0, seed=3),
                    extractor, make_transform("noise"))
    mount(client.session, fine_app, URL)
    with client:
        result = client.recognize(held_out[0][1])
    assert result.candidates and result.privacy is None and result.to_dict()["privacy"] is None


def test_a_catalogue_too_large_to_simulate_has_no_receipt_and_refuses_a_floor(
        fine_app, extractor: Extractor, held_out, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Past MAX_PROTOTYPES (a national catalogue) the phone answers without a receipt, and a phone
    whose owner asked for a privacy floor it cannot check refuses with a typed error, sending nothing."""
    monkeypatch.setattr(receipt, "MAX_PROTOTYPES", 10)  # the test index publishes 3 a spot, 24 spots
    with _phone(fine_app, extractor, tmp_path / "a") as phone:
        result = phone.recognize(held_out[0][1])
    assert result.candidates and result.spot_id is not None and result.privacy is None
    with _phone(fine_app, extractor, tmp_path / "b", privacy_floor=5) as phone:
        sent: list[str] = []
        phone.session.hooks["response"].append(lambda r, *a, **k: sent.append(r.request.path_url))
        with pytest.raises(ConfigError, match="privacy_floor 5 needs the privacy receipt"):
            phone.recognize(held_out[0][1])
    assert "/v1/candidates" not in sent


def test_choosing_cells_in_chunks_names_what_one_vector_at_a_time_does(
        fine_app, extractor: Extractor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    with _phone(fine_app, extractor, tmp_path / "a") as phone:
        phone.check_model()
        cells = phone.transform
    rng = np.random.default_rng(0)
    vectors = np.stack([cells.decoy(rng) for _ in range(50)])
    monkeypatch.setattr(transforms, "CHOOSE_CELLS", 7 * len(cells.by_cell_))  # chunks of 7 rows
    assert cells.choose_many(vectors) == [cells.choose(v) for v in vectors]


def test_the_floor_adds_groups_until_it_is_met_and_every_request_keeps_one_size(
        fine_app, extractor: Extractor, held_out, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    features = [extractor.extract(photo) for _, photo in held_out[:8]]
    with _phone(fine_app, extractor, tmp_path / "off", cache=False) as plain:
        plain.check_model()
        off = [plain.ask(f) for f in features]
    with _phone(fine_app, extractor, tmp_path / "on", cache=False, privacy_floor=12) as floored:
        floored.check_model()
        on = [floored.ask(f) for f in features]
        repeat = floored.body(features[0])
    sizes = {len(json.dumps(body, separators=(",", ":"))) for body, _ in on}
    assert len(sizes) == 1 and sizes == {floored.transform.max_body_size()}  # the size says nothing
    assert floored.transform.max_body_size() >= plain.transform.max_body_size()
    for (body_off, result_off), (body_on, result_on) in zip(off, on):
        receipt = result_on.privacy
        assert receipt["privacy_floor"] == 12 and receipt["decoy_groups"] >= 2
        assert receipt["floor_reached"] == (receipt["plausible_spots"] >= 12)
        assert receipt["floor_reached"] or receipt["decoy_groups"] == 2 + floored.config.privacy_floor_groups
        assert set(body_off["cells"]) <= set(body_on["cells"])  # the floor only adds groups to the same draw
        if result_off.privacy["plausible_spots"] >= 12:
            assert body_on["cells"] == body_off["cells"] and receipt["decoy_groups"] == 2
    assert any(r.privacy["decoy_groups"] > 2 for _, r in on)  # the floor did add groups somewhere
    assert repeat["cells"] == on[0][0]["cells"]  # the same real cells still make the same message


def test_privacy_floor_is_layered_like_every_setting(tmp_path: Path) -> None:
    file = tmp_path / "client.json"
    file.write_text(json.dumps({"privacy_floor": 10}))
    assert load_config(ClientConfig, file, env={}).privacy_floor == 10
    assert load_config(ClientConfig, file, env={"ENFPIRE_PRIVACY_FLOOR": "20"}).privacy_floor == 20
    args = build_parser().parse_args(["recognize", "x.jpg", "--privacy-floor", "30"])
    layered = load_config(ClientConfig, file, env={"ENFPIRE_PRIVACY_FLOOR": "20"}, **overrides(args))
    assert layered.privacy_floor == 30
    assert load_config(ClientConfig, env={}).privacy_floor == 0  # off unless asked for
    with pytest.raises(ConfigError):
        ClientConfig(privacy_floor=-1)


@pytest.fixture(scope="module")
def wide_server(extractor: Extractor, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A server of 40 real spots (3 photos each, cells of 10) on loopback: room for 30 plausible spots."""
    from lite_server.index.store import build_index

    data = make_subset(tmp_path_factory.mktemp("wide"), spots=40, per_spot=3, skip_first=1)
    index = tmp_path_factory.mktemp("wide-index")
    build_index(data / "images", index, extractor, data / "landmarks.csv")
    server = LiveServer(index)
    yield server
    server.stop()


def test_the_command_line_prints_the_receipt_and_meets_a_floor_of_30(
        wide_server, held_out, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    photo = str(held_out[0][1])
    common = ["recognize", photo, "--server", wide_server.url, "--no-dummies", "--no-cache", "--seed", "1"]
    assert client_main([*common, "--json", "--privacy-floor", "30"]) == 0
    receipt = json.loads(capsys.readouterr().out)["privacy"]
    assert receipt["plausible_spots"] >= 30 and receipt["floor_reached"] is True
    assert 0.0 < receipt["server_top1_probability"] < 1.0
    assert client_main(common) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("privacy: ") and "spots" in lines[1]


def test_android_answers_carry_the_receipt(live_server, held_out) -> None:  # type: ignore[no-untyped-def]
    from edge_client import android

    jpeg = held_out[1][1].read_bytes()
    settings = json.dumps({"dummies": 0, "seed": 2, "privacy_floor": 5})
    try:
        first, second = (json.loads(android.recognize_jpeg(jpeg, live_server.url, settings)) for _ in range(2))
        assert first["ok"] and first["privacy"]["request_sent"] and first["privacy"]["plausible_spots"] >= 1
        assert first["privacy"]["privacy_floor"] == 5
        assert second["ok"] and second["privacy"]["request_sent"] is False  # from the cache: nothing sent
    finally:
        android.close_all()


# --- the evaluation: calibration, and the attacker facing a floor ----------------------------------------------


@pytest.fixture(scope="module")
def fine_env(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """24 real spots (6 photos each) in cells of 3, the phones' own floor lowered to match."""
    from tools.evaluate import cli as ev

    data = make_subset(tmp_path_factory.mktemp("receipt-data"), per_spot=6)
    return ev.prepare(data, cache=tmp_path_factory.mktemp("receipt-cache"), config=ServerConfig(cell_min_spots=3),
                      client_settings={"min_cell_spots": 3}, min_photos=3)


def test_the_evaluation_checks_the_receipts_against_the_strongest_attacker(fine_env) -> None:  # type: ignore[no-untyped-def]
    from tools.evaluate import cli as ev
    from tools.evaluate import receipts

    run = ev.run_setting(fine_env, "cells", None, None, calibrate=True)
    cal = run["receipt_calibration"]
    assert cal["queries"] == len(fine_env.queries) == sum(d["queries"] for d in cal["deciles"])
    for decile in cal["deciles"]:
        assert decile["bin"][0] <= decile["stated"] <= decile["bin"][1] and 0.0 <= decile["observed"] <= 1.0
    gaps = sum(d["queries"] * abs(d["stated"] - d["observed"]) for d in cal["deciles"]) / cal["queries"]
    assert cal["mean_gap"] == pytest.approx(gaps)
    assert cal["mean_gap_ci95"][0] <= cal["mean_gap_ci95"][1]
    assert cal["attacker_top1"] == pytest.approx(run["server_top1_aware"])  # the strongest attacker's hits
    within = run["receipt_plausible_spots"]["truth_within_plausible"]
    assert 0.0 <= within["observed"] <= 1.0 and 0.0 < within["promised"] <= 1.0
    assert run["receipt_timing"]["receipts"] == len(fine_env.queries) and run["receipt_timing"]["first_ms"] > 0
    lines = receipts.report(run)
    assert any(line.startswith("- receipt calibration: mean gap <= 0.05: m") for line in lines)


def test_the_calibration_tells_a_calibrated_statement_from_an_overconfident_one() -> None:
    from tools.evaluate import receipts

    rng = np.random.default_rng(0)
    stated = rng.uniform(0, 1, 4000)
    spots = rng.integers(0, 200, 4000)
    honest = receipts.calibration(stated, rng.random(4000) < stated, spots)
    boastful = receipts.calibration(stated, rng.random(4000) < stated / 2, spots)
    assert honest["mean_gap"] < receipts.TARGET < boastful["mean_gap"]


def test_against_a_floor_the_bayes_attacker_sums_over_the_groups_it_saw_the_phone_send(fine_env) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from tools.evaluate import cli as ev

    floored = dataclasses.replace(fine_env, client_settings={**fine_env.client_settings, "privacy_floor": 10})
    run = ev.run_setting(floored, "cells", None, None, calibrate=True)
    assumed = {int(d): p for d, p in run["decoy_groups_assumed"].items()}
    assert sum(assumed.values()) == pytest.approx(1.0) and min(assumed) >= 2 and max(assumed) <= 8
    plausible = run["receipt_plausible_spots"]
    assert plausible["privacy_floor"] == 10 and 0.0 <= plausible["floor_reached"] <= 1.0
    assert plausible["mean_decoy_groups"] >= 2
