"""What a dummy generator hands the scheduler: one burst per real request.

Kept apart from both sides so that :mod:`edge_client.dummies.generator` (which makes
plans) and :mod:`edge_client.dummies.scheduler` (which sends them) import this module
and never each other: the scheduler is given its generator, or a factory for
it, by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Union

import numpy as np


@dataclass(frozen=True)
class Dummy:
    """One planned dummy: who sends it (a persona), which spot it pretends, its feature."""

    persona: int
    spot_id: str
    feature: np.ndarray
    delay: float


@dataclass(frozen=True)
class Plan:
    """A burst: when the real request leaves, the dummies around it, and the real one's
    rank among the requests due at the same moment (they leave in the plan's order:
    ``dummies[:real_rank]``, the real one, then the rest)."""

    real_delay: float
    dummies: list[Dummy] = field(default_factory=list)
    real_rank: int = 0


class Generator(Protocol):
    """What the scheduler needs from a dummy generator."""

    def plan(self, now: float, n: int, window: float) -> Plan:
        """The burst for a real request made at ``now``, with at most ``n`` dummies."""
        ...


#: A generator, or a callable that makes one on first use (e.g. fetching the catalogue lazily).
GeneratorSource = Union[Generator, Callable[[], Generator]]
