"""Dummy personas: imaginary tourists, each walking its own plausible route.

A persona stays at a spot for a lognormal dwell (median ~20 min), then sets
off, during the day only, to a next spot drawn by a gravity model
(popularity x exp(-distance / scale)), and arrives after the time a walk
(short hops) or a transit ride (longer ones, plus an overhead) takes. It is
asked where it is only when the user takes a photo. If it is on the road at
that moment it has, as far as anyone can tell, *lingered*: the server saw
nothing since its last photo, so its departure simply moves to now. It never
teleports and never exceeds the travel speed, whatever the user does.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from .catalogue import Catalogue

DAY = 86400.0


@dataclass(frozen=True)
class Movement:
    """How personas move: speeds, dwell, gravity scale and active hours."""

    walk_kmh: float = 4.5
    walk_limit_km: float = 1.5        # longer hops take transit or a car
    transit_kmh: float = 40.0
    transit_overhead_s: float = 600.0  # waiting, parking
    dwell_median_s: float = 1200.0
    dwell_sigma: float = 0.6           # of log(dwell)
    scale_km: float = 8.0              # gravity: how far a tourist is willing to go next
    popularity_power: float = 1.0
    no_return: int = 10                # the last spots visited are not revisited
    day_start: int = 8                 # departures only between these local hours
    day_end: int = 20
    utc_offset_s: float | None = None  # local time = epoch + offset; None = this device's zone

    def travel_s(self, km: float) -> float:
        """Door to door, never faster than :attr:`max_kmh`."""
        if km <= self.walk_limit_km:
            return 3600.0 * km / self.walk_kmh
        return self.transit_overhead_s + 3600.0 * km / self.transit_kmh

    @property
    def max_kmh(self) -> float:
        return max(self.walk_kmh, self.transit_kmh)

    def dwell_s(self, rng: np.random.Generator) -> float:
        return float(self.dwell_median_s * np.exp(self.dwell_sigma * rng.standard_normal()))

    def departure_at(self, t: float) -> float:
        """``t``, or the next day's start when ``t`` falls outside the active hours."""
        offset = time.localtime(t).tm_gmtoff if self.utc_offset_s is None else self.utc_offset_s
        local = t + offset
        hour = (local % DAY) / 3600.0
        if self.day_start <= hour < self.day_end:
            return t
        days = np.floor(local / DAY) + (1 if hour >= self.day_end else 0)
        return float(days * DAY + self.day_start * 3600.0 - offset)


@dataclass(frozen=True)
class Move:
    """One hop of a persona's route (rows of the catalogue, epoch seconds)."""

    src: int
    dst: int
    depart: float
    arrive: float


class Persona:
    """One imaginary tourist. ``where(t)`` must be asked with non-decreasing ``t``."""

    def __init__(self, catalogue: Catalogue, movement: Movement, rng: np.random.Generator, now: float,
                 spot: int | None = None):
        self.catalogue, self.movement, self.rng = catalogue, movement, rng
        self.spot = int(rng.choice(len(catalogue), p=catalogue.popularity)) if spot is None else spot
        # Met mid-visit: the remaining part of a dwell.
        self.leave_at = movement.departure_at(now + rng.random() * movement.dwell_s(rng))
        self.recent: deque[int] = deque([self.spot], maxlen=max(1, movement.no_return))
        self.moves: deque[Move] = deque(maxlen=1000)
        self._next: int | None = None

    def where(self, t: float) -> int:
        """The spot this persona photographs at ``t``."""
        while t >= self.leave_at:
            if self._next is None:
                self._next = self._destination()
            arrive = self.leave_at + self.movement.travel_s(float(self.catalogue.distances_from(self.spot)[self._next]))
            if arrive > t:  # still on the road: it lingered instead, leaves after this photo,
                self.leave_at = self.movement.departure_at(t)  # and may choose another destination then
                self._next = None
                break
            self.moves.append(Move(self.spot, self._next, self.leave_at, arrive))
            self.spot, self._next = self._next, None
            self.recent.append(self.spot)
            self.leave_at = self.movement.departure_at(arrive + self.movement.dwell_s(self.rng))
        return self.spot

    def _destination(self) -> int:
        """Gravity model over spots not visited lately."""
        m = self.movement
        weights = self.catalogue.popularity ** m.popularity_power * np.exp(-self.catalogue.distances_from(self.spot) / m.scale_km)
        weights[list(self.recent)] = 0.0
        if not np.isfinite(weights).all() or weights.sum() <= 0:  # nowhere near: go by popularity
            weights = self.catalogue.popularity.copy()
            weights[list(self.recent)] = 0.0
        if weights.sum() <= 0:
            return self.spot
        return int(self.rng.choice(len(weights), p=weights / weights.sum()))
