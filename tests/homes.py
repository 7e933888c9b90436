"""A private home for test runs: clients keep their answer cache, device secret and key pins
under ``~/.enfpire``, and a test must never read or leave the user's. Shared by the main suite's
conftest and the device run's."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest


def use_private_home(prefix: str) -> None:
    """Point ``HOME`` at a new temporary folder for the whole run (session fixtures, child processes)."""
    os.environ["HOME"] = tempfile.mkdtemp(prefix=prefix)


@pytest.fixture(autouse=True)
def private_home(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each test its own home: no answer cache or device secret carries over from another test."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    return home
