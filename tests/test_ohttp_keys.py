"""The gateway's key file: created private, rotated with a grace period, reloaded when it changes."""
from __future__ import annotations

import json
import stat
import time
from pathlib import Path

from edge_client.protocol import ohttp
from lite_server.api.openapi import spec
from lite_server.ohttp.keys import GatewayKeys, ensure, rotate


def _ids(keys: GatewayKeys) -> list[int]:
    return [c.key_id for c in ohttp.decode_key_configs(keys.body())]


def test_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "keys.json"
    keys = GatewayKeys(path, grace=60)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and _ids(keys) == [1, 2]  # current, then the next
    before = path.read_bytes()
    ensure(path)
    assert path.read_bytes() == before  # an existing file is never replaced
    config, private = keys.private_keys()[1]
    assert ohttp.public_key(private) == config.public_key


def test_rotation_keeps_the_old_key_for_the_grace_period_only(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys = GatewayKeys(path, grace=3600)
    old = keys.private_keys()[1]
    assert rotate(path, 3600) == 2
    assert _ids(keys) == [2, 3, 1] and keys.private_keys()[1] == old  # a running gateway sees it at once
    strict = GatewayKeys(path, grace=0)
    assert _ids(strict) == [2, 3] and 1 not in strict.private_keys()
    # 2 retired with no grace is dropped; 3 (announced since the first rotation) current, 4 announced
    assert rotate(path, 0) == 3 and [k["key_id"] for k in json.loads(path.read_text())["keys"]] == [2, 3, 4]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_rotation_by_age(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    ensure(path)
    data = json.loads(path.read_text())
    data["keys"][0]["activated"] = time.time() - 3 * 86400
    path.write_text(json.dumps(data))
    assert _ids(GatewayKeys(path, grace=3600, rotate_after=2 * 86400)) == [2, 3, 1]
    # a second replica sharing the file does not rotate again: the new key is young
    assert _ids(GatewayKeys(path, grace=3600, rotate_after=2 * 86400)) == [2, 3, 1]
    assert rotate(path, 3600, older_than=86400) == 2


def test_openapi_documents_the_gateway() -> None:
    paths = spec()["paths"]
    assert "application/ohttp-keys" in paths["/.well-known/ohttp-gateway"]["get"]["responses"]["200"]["content"]
    gateway = paths["/ohttp"]["post"]
    assert "message/ohttp-req" in gateway["requestBody"]["content"]
    assert {"200", "400", "413", "415"} <= set(gateway["responses"])


def _rotate_when_old(path: str, start: float) -> tuple[int, str]:
    """(current key id, its private key as this process then reads it)."""
    while time.time() < start:  # all processes reach the lock together
        time.sleep(0.001)
    current = rotate(Path(path), 3600, older_than=86400)
    return current, next(k["private_key"] for k in json.loads(Path(path).read_text())["keys"] if k["key_id"] == current)


def test_replicas_rotating_at_once_rotate_once(tmp_path: Path) -> None:
    """Replicas sharing one key file (``serve --ray``) all find the key too old at the same moment:
    the lock and the age check under it leave exactly one new key, which every replica reports."""
    from concurrent.futures import ProcessPoolExecutor

    path = tmp_path / "keys.json"
    ensure(path)
    data = json.loads(path.read_text())
    data["keys"][0]["activated"] = time.time() - 3 * 86400
    path.write_text(json.dumps(data))
    start = time.time() + 1.0
    with ProcessPoolExecutor(8) as pool:
        current = list(pool.map(_rotate_when_old, [str(path)] * 8, [start] * 8))
    # One key 2, never replaced: a replica that had served another key 2 would fail its phones.
    assert {key_id for key_id, _ in current} == {2} and len({private for _, private in current}) == 1
    assert [k["key_id"] for k in json.loads(path.read_text())["keys"]] == [1, 2, 3]  # 3: the next one, announced
