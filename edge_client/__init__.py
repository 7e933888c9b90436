"""EnfPire's device side: extract a photo's feature, hide it, ask, pick locally.

Runs on a Raspberry Pi or inside an Android app (Chaquopy): numpy, Pillow,
requests and a TFLite interpreter only, never Flask or scikit-learn.
"""
from __future__ import annotations

from .config import ClientConfig, load_config
from .errors import (
    BadResponseError,
    ChecksumError,
    ConfigError,
    EnfPireError,
    FeatureError,
    IncompatibleServerError,
    InterpreterNotFoundError,
    ModelError,
    ModelNotFoundError,
    PhotoError,
    ServerError,
    ServerUnreachableError,
)
from .vision.extractor import Extractor

__version__ = "0.1.0"

__all__ = [
    "BadResponseError", "ChecksumError", "ClientConfig", "ConfigError", "EnfPireError", "Extractor", "FeatureError",
    "IncompatibleServerError", "InterpreterNotFoundError", "ModelError", "ModelNotFoundError",
    "PhotoError", "ServerError", "ServerUnreachableError", "load_config",
]
