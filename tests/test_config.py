"""Layered configuration: defaults < file < ENFPIRE_* < flags."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_client.config import ClientConfig, load_config
from edge_client.errors import ConfigError


def test_layers_override_in_order(tmp_path: Path) -> None:
    path = tmp_path / "client.json"
    path.write_text(json.dumps({"k": 7, "server": "http://file:1", "read_timeout": 4}))
    env = {"ENFPIRE_SERVER": "http://env:2", "ENFPIRE_STRENGTH": "0.5", "ENFPIRE_SEED": "none"}
    config = load_config(ClientConfig, path, env=env, k=9)
    assert (config.k, config.server, config.read_timeout, config.strength) == (9, "http://env:2", 4.0, 0.5)
    assert config.seed is None and ClientConfig().k == 0


def test_bad_values_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="k"):
        load_config(ClientConfig, env={"ENFPIRE_K": "many"})
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(ClientConfig, env={}, colour="red")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json"):
        load_config(ClientConfig, broken, env={})
