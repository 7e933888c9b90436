"""Registered extractors: a model's NAME stands for one file, its sha256 and its input.

``manifest.json`` in the model folder (the checkout's ``models/``, or
``~/.enfpire/models`` on a phone) lists them under ``"extractors"``. The
phone's ``--model NAME`` and the server's ``index build --model NAME`` both
resolve the name here and check the file's sha256, so the two sides agree on
the model before a single query; the server still refuses a phone whose
``model_sha256`` differs from its index's.

An entry's ``input`` says how pixels become the float model's input,
``(pixel - mean) / std`` per channel; a model nobody registered keeps
MobileNet's 128/128.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

from ..errors import ChecksumError, ConfigError, ModelNotFoundError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
#: A scalar for all three channels, or one value per RGB channel.
Norm = Union[float, Sequence[float]]
DEFAULT_MEAN: Norm = 128.0
DEFAULT_STD: Norm = 128.0


@dataclass(frozen=True)
class Registered:
    """One registered extractor, as the manifest describes it."""

    name: str
    path: Path
    sha256: str
    mean: Norm = DEFAULT_MEAN
    std: Norm = DEFAULT_STD


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(model_dir: Path) -> dict[str, Any]:
    """The folder's manifest, or an empty one when it has none."""
    path = model_dir / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def entries(model_dir: Path) -> dict[str, Registered]:
    """Every extractor registered in ``model_dir``, by name."""
    return {name: _registered(name, entry, model_dir)
            for name, entry in read_manifest(model_dir).get("extractors", {}).items()}


def _registered(name: str, entry: dict[str, Any], model_dir: Path) -> Registered:
    norm = entry.get("input", {})
    return Registered(name, model_dir / entry["file"], entry["sha256"],
                      norm.get("mean", DEFAULT_MEAN), norm.get("std", DEFAULT_STD))


def is_name(model: str) -> bool:
    """A bare word (no folder, no ``.tflite``) is a registered name, anything else a path."""
    return bool(model) and "/" not in model and "\\" not in model and not model.endswith(".tflite")


def resolve(name: str, model_dir: Path) -> Path:
    """The file registered as ``name``; its sha256 must be the registered one."""
    known = entries(model_dir)
    if name not in known:
        raise ModelNotFoundError(f"no model named {name!r} in {model_dir / MANIFEST} "
                                 f"(registered: {', '.join(sorted(known)) or 'none'})")
    entry = known[name]
    if not entry.path.is_file():
        raise ModelNotFoundError(f"model {name!r}: {entry.path} does not exist (run 'python -m tools.model prepare "
                                 f"--extractor {name}' or register it again)")
    actual = file_sha256(entry.path)
    if actual != entry.sha256:
        raise ChecksumError(f"model {name!r}: {entry.path} has sha256 {actual}, registered {entry.sha256}")
    return entry.path


def normalisation(model_path: Path, sha256: str) -> tuple[Norm, Norm]:
    """(mean, std) registered for the file with ``sha256`` beside ``model_path``, else MobileNet's."""
    for entry in entries(model_path.parent).values():
        if entry.sha256 == sha256:
            return entry.mean, entry.std
    return DEFAULT_MEAN, DEFAULT_STD
