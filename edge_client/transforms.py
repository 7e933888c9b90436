"""Privacy transforms: what the phone sends instead of its feature.

A transform turns the phone's L2-normalised feature into the body of a
``/v1/candidates`` request. It may need public parameters that the server
publishes in ``/v1/info`` under ``transforms[<name>]`` (``fit`` takes them),
and it draws all its randomness from the generator it is handed, so a seed
fixes every query.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import numpy as np

from . import wire
from .errors import ConfigError
from .extractor import l2_normalize


class Transform:
    """Base class: one strength knob, a default candidate count ``k``."""

    name: ClassVar[str] = ""
    default_strength: ClassVar[float] = 0.0
    default_k: ClassVar[int] = 10

    def __init__(self, strength: float | None = None, k: int | None = None):
        self.strength = strength
        self.k = k

    @property
    def strength_(self) -> float:
        return self.default_strength if self.strength is None else float(self.strength)

    @property
    def k_(self) -> int:
        return int(self.k or self.default_k)

    def fit(self, public: Mapping[str, Any]) -> "Transform":
        """Take the server's public parameters for this transform; returns self."""
        return self

    def transform(self, feature: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        """The request body for ``feature``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strength={self.strength_}, k={self.k_})"


class Identity(Transform):
    """No privacy at all: the raw feature. The baseline every transform is judged against."""

    name = "none"
    default_k = 1

    def transform(self, feature: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        return {"vector": wire.encode(feature), "k": self.k_}


class Noise(Transform):
    """Isotropic Gaussian noise, re-normalised (the EnfPire paper's transform).

    ``strength`` is the expected norm of the noise relative to the unit
    feature: each coordinate gets N(0, strength^2 / D).
    """

    name = "noise"
    default_strength = 1.0
    default_k = 40

    def transform(self, feature: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        noise = rng.standard_normal(feature.shape[-1]).astype(np.float32)
        noisy = feature + noise * np.float32(self.strength_ / np.sqrt(feature.shape[-1]))
        return {"vector": wire.encode(l2_normalize(noisy)), "k": self.k_}


TRANSFORMS: dict[str, type[Transform]] = {t.name: t for t in (Identity, Noise)}
DEFAULT_TRANSFORM = "noise"


def make_transform(name: str = "", strength: float | None = None, k: int | None = None) -> Transform:
    """A transform by name ("" = the default), with its strength and ``k``."""
    cls = TRANSFORMS.get(name or DEFAULT_TRANSFORM)
    if cls is None:
        raise ConfigError(f"unknown transform {name!r}; choose one of {sorted(TRANSFORMS)}")
    if strength is not None and (not np.isfinite(strength) or strength < 0):
        raise ConfigError(f"strength must be a finite number >= 0, got {strength}")
    if k is not None and k < 0:
        raise ConfigError(f"k must be positive, got {k}")
    return cls(strength, k or None)
