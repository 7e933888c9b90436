"""Dummy requests: what personas photograph, and the bursts they join.

:class:`SyntheticPhotos` makes a feature that looks like a new photo of a
spot from the catalogue only: a random mixture of the spot's published
features (real photos cluster around several views, not one point), pulled
away from the spot's centre by a residual so that its similarity to the
centre follows the published leave-one-out spread. It is never a copy of a
gallery feature: at least :attr:`SyntheticPhotos.min_residual` of residual
is always added. The scheduler then sends it through the very transform
object real queries use.

:class:`PersonaGenerator` is the default: personas (see
:mod:`edge_client.dummies.personas`) photograph where they are when the user takes a
photo, and the whole burst leaves at once, the real request at a uniformly
random rank among its dummies (the user never waits for cover).
:class:`NaiveGenerator` is the published-and-broken baseline kept for the
evaluation: random spots at random times.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..vision.extractor import l2_normalize, random_mixture
from .catalogue import Catalogue
from .personas import Movement, Persona
from .plans import Dummy, Plan

if TYPE_CHECKING:
    from ..client import Client

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticPhotos:
    """Plausible photo features of catalogue spots (see the module docstring)."""

    catalogue: Catalogue
    alpha: float = 0.5          # Dirichlet concentration: < 1 keeps mixtures near a few views, as photos are
    min_residual: float = 0.2   # at least this much residual (relative to the unit mixture)

    def feature(self, row: int, rng: np.random.Generator) -> np.ndarray:
        cat = self.catalogue
        if cat.codec_features is not None and cat.lift is not None and "codec_cos_median" in cat.spread:
            return self._codec_feature(row, rng)
        anchors = cat.features[row]
        centre = l2_normalize(anchors.mean(axis=0))
        mix = random_mixture(anchors, self.alpha, rng)
        target = self._target(cat.spread.get("cos_median", 0.8), cat.spread.get("log_tan_sigma", 0.25), rng)
        # Residual orthogonal to the mixture and the centre: cos(x, centre) = cos(mix, centre) / sqrt(1 + s^2).
        scale = np.sqrt(max((float(mix @ centre) / target) ** 2 - 1.0, self.min_residual ** 2))
        return l2_normalize(mix + scale * self._residual(mix, centre, rng))

    def _codec_feature(self, row: int, rng: np.random.Generator) -> np.ndarray:
        """The photo drawn where the transform sees it, in a learned whitening's space (whose
        spread the server publishes): there a spot's photos vary about equally in every direction,
        so the residual is isotropic. Drawn in feature space as above, a dummy sat closer to its
        spot's centre in this space than real photos do (median cosine 0.936 against 0.868 on
        wa-landmarks), and the sharper space let a detector see it. Lifted back to a feature
        whose projection is exactly the drawn row."""
        cat = self.catalogue
        anchors = cat.codec_features[row]  # type: ignore[index]
        centre = l2_normalize(anchors.mean(axis=0))
        mix = l2_normalize(random_mixture(anchors, self.alpha, rng))
        target = self._target(cat.spread["codec_cos_median"], cat.spread.get("codec_log_tan_sigma", 0.25), rng)
        scale = np.sqrt(max((float(mix @ centre) / target) ** 2 - 1.0, self.min_residual ** 2))
        coded = mix + scale * _orthogonal_unit(rng.standard_normal(mix.shape), mix, centre)
        return l2_normalize((coded @ cat.lift).astype(np.float32))

    @staticmethod
    def _target(cos_median: float, log_tan_sigma: float, rng: np.random.Generator) -> float:
        """A photo's cosine with its spot's centre, drawn as the published spread says."""
        cos_median = float(np.clip(cos_median, 0.05, 0.999))
        tangent = np.sqrt(1 - cos_median ** 2) / cos_median * np.exp(log_tan_sigma * rng.standard_normal())
        return float(1.0 / np.sqrt(1.0 + tangent ** 2))

    @staticmethod
    def _residual(mix: np.ndarray, centre: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A unit direction on the channels the mixture uses (features are non-negative
        activations: real photo-to-photo changes live there), orthogonal to mix and centre."""
        w = (rng.standard_normal(mix.shape) * np.sqrt(np.clip(mix, 0, None))).astype(np.float64)
        return _orthogonal_unit(w, mix, centre).astype(np.float32)


def _orthogonal_unit(w: np.ndarray, mix: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``w`` made orthogonal to ``mix`` and to ``centre``'s part off it, at unit length: a residual
    that moves a photo away from its spot without turning it toward or from the mixture."""
    w = np.asarray(w, np.float64)
    for v in (mix, centre - (centre @ mix) * mix):
        norm = float(np.linalg.norm(v))
        if norm > 1e-9:
            v = v / norm
            w = w - (w @ v) * v
    return w / max(float(np.linalg.norm(w)), 1e-12)


class PersonaGenerator:
    """Dummies from personas walking the catalogue; the burst leaves at once, the real
    request at a uniformly random rank in it."""

    def __init__(self, catalogue: Catalogue, personas: int = 2, movement: Movement | None = None,
                 seed: int | None = None, photos: SyntheticPhotos | None = None):
        self.catalogue = catalogue
        self.movement = movement or Movement()
        self.photos = photos or SyntheticPhotos(catalogue)
        self.rng = np.random.default_rng(seed)
        self.n_personas = personas
        self.personas: list[Persona] = []

    @classmethod
    def from_client(cls, client: "Client") -> "PersonaGenerator":
        """Fetch the catalogue once and take the hours and budget from the client's config."""
        config = client.config
        movement = Movement(day_start=config.dummy_day_start, day_end=config.dummy_day_end)
        seed = None if config.seed is None else config.seed + 1
        return cls(client.catalogue(), max(1, config.dummies), movement, seed)

    def plan(self, now: float, n: int, window: float) -> Plan:
        while len(self.personas) < max(n, self.n_personas):
            self.personas.append(Persona(self.catalogue, self.movement, self.rng, now))
        # Every persona is asked, so each keeps a continuous track like the user's; only a
        # budget cap below the persona count leaves some out (at random).
        chosen = sorted(self.rng.choice(len(self.personas), size=n, replace=False)) if n < len(self.personas) \
            else range(len(self.personas))
        dummies = []
        for i in self.rng.permutation(list(chosen)):
            row = self.personas[i].where(now)
            dummies.append(Dummy(int(i), self.catalogue.ids[row], self.photos.feature(row, self.rng), 0.0))
        # No delay for anyone: a real request that left at once while some dummies waited would be
        # told apart as the first of its burst; all at once, only the rank could tell, and it is uniform.
        return Plan(0.0, dummies, real_rank=int(self.rng.integers(len(dummies) + 1)))


class NaiveGenerator:
    """Baseline: dummies at uniformly random spots and random times in the next ``spread_s``."""

    def __init__(self, catalogue: Catalogue, seed: int | None = None, spread_s: float = 3600.0,
                 photos: SyntheticPhotos | None = None):
        self.catalogue = catalogue
        self.photos = photos or SyntheticPhotos(catalogue)
        self.rng = np.random.default_rng(seed)
        self.spread_s = spread_s

    def plan(self, now: float, n: int, window: float) -> Plan:
        rows = self.rng.integers(len(self.catalogue), size=n)
        return Plan(0.0, [Dummy(-1, self.catalogue.ids[r], self.photos.feature(int(r), self.rng),
                                float(self.rng.uniform(0.0, self.spread_s))) for r in rows])

