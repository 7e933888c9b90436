"""The gateway's key file: created private, rotated with a grace period, reloaded when it changes."""
from __future__ import annotations

import json
import stat
import time
from pathlib import Path

from edge_client import ohttp
from lite_server.ohttp_keys import GatewayKeys, ensure, rotate
from lite_server.openapi import spec


def _ids(keys: GatewayKeys) -> list[int]:
    return [c.key_id for c in ohttp.decode_key_configs(keys.body())]


def test_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "keys.json"
    keys = GatewayKeys(path, grace=60)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and _ids(keys) == [1]
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
    assert _ids(keys) == [2, 1] and keys.private_keys()[1] == old  # a running gateway sees it at once
    strict = GatewayKeys(path, grace=0)
    assert _ids(strict) == [2] and 1 not in strict.private_keys()
    assert rotate(path, 0) == 3 and [k["key_id"] for k in json.loads(path.read_text())["keys"]] == [2, 3]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_rotation_by_age(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    ensure(path)
    data = json.loads(path.read_text())
    data["keys"][0]["created"] = time.time() - 3 * 86400
    path.write_text(json.dumps(data))
    assert _ids(GatewayKeys(path, grace=3600, rotate_after=2 * 86400)) == [2, 1]
    # a second replica sharing the file does not rotate again: the new key is young
    assert _ids(GatewayKeys(path, grace=3600, rotate_after=2 * 86400)) == [2, 1]
    assert rotate(path, 3600, older_than=86400) == 2


def test_openapi_documents_the_gateway() -> None:
    paths = spec()["paths"]
    assert "application/ohttp-keys" in paths["/.well-known/ohttp-gateway"]["get"]["responses"]["200"]["content"]
    gateway = paths["/ohttp"]["post"]
    assert "message/ohttp-req" in gateway["requestBody"]["content"]
    assert {"200", "400", "413", "415"} <= set(gateway["responses"])
