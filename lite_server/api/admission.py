"""Admission control: a bounded queue in front of the lookup, so a saturated
server answers 503 with ``Retry-After`` instead of queueing without end.

Waitress hands every request to a worker thread and queues the rest in an
unbounded internal list, where the application cannot see them. So the
server runs more waitress threads than lookups (``threads + max_pending +
HEADROOM``, see ``lite_server.cli``) and bounds the work here: ``threads``
lookups at once, at most ``max_pending`` requests waiting for one (each for at
most ``queue_timeout`` seconds), and every request beyond that refused at
once. Refusals take microseconds, so the spare threads drain waitress's own
queue as fast as requests arrive.
"""
from __future__ import annotations

import threading

from flask import Flask, g, request

from ..errors import ApiError

#: Waitress threads beyond the lookups and the queue: they answer refusals and cheap routes.
HEADROOM = 4
#: Endpoints that do real work and need a lookup slot; health, info and the spec never wait.
GATED = frozenset({"api.candidates"})


class Admission:
    """``workers`` slots and a waiting room of ``max_pending`` seats."""

    def __init__(self, workers: int, max_pending: int, queue_timeout: float, retry_after: int):
        self.workers, self.max_pending = max(1, workers), max(0, max_pending)
        self.queue_timeout, self.retry_after = queue_timeout, retry_after
        self._slots = threading.BoundedSemaphore(self.workers)
        self._lock = threading.Lock()
        self.waiting = 0

    def enter(self) -> None:
        """Take a slot, waiting in the bounded queue; :class:`ApiError` 503 when there is no room."""
        if self._slots.acquire(blocking=False):
            return
        with self._lock:
            if self.waiting >= self.max_pending:
                raise self._busy()
            self.waiting += 1
        try:
            admitted = self._slots.acquire(timeout=self.queue_timeout)
        finally:
            with self._lock:
                self.waiting -= 1
        if not admitted:
            raise self._busy()

    def leave(self) -> None:
        self._slots.release()

    def _busy(self) -> ApiError:
        return ApiError(503, "busy", "the server is saturated; retry later", retry_after=self.retry_after)


def install_admission(app: Flask, admission: Admission) -> None:
    """Gate :data:`GATED` endpoints of ``app`` through ``admission``."""
    app.extensions["enfpire.admission"] = admission

    @app.before_request
    def _admit() -> None:
        if request.endpoint in GATED:
            admission.enter()
            g.enfpire_slot = True

    @app.teardown_request
    def _release(exc: BaseException | None) -> None:
        if g.pop("enfpire_slot", False):
            admission.leave()
