"""One outbox for real and dummy requests, so timing never marks the real one.

Every real request opens a *burst*: the generator plans its dummies, when
each leaves and the real one's rank among the requests due at the same
moment. The persona generator's burst leaves at once, the real request at a
uniformly random rank among its dummies: the real one never waits, and
neither its time nor its place in the burst tells it apart. Requests go
through the same client call with the same retries; a dummy's answer is
dropped, never returned, cached or followed up, and its errors are only
counted.

Three ways to run it: ``start()`` a small background thread (no
multiprocessing: Chaquopy) that sends the requests due together each on its
own thread, in plan order, so the real answer never waits for a dummy's
round trip; :meth:`DummyScheduler.recognize_once` for a process that answers
once and exits (the CLI: the answer is handed over the moment it arrives,
the rest of the burst still leaves before the exit); or by hand with an
injected clock (:class:`ManualClock`) and :meth:`DummyScheduler.run_until`,
one request after another: deterministic, for tests and the evaluation.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..client import Client
from ..errors import ConfigError
from ..privacy.recognizer import Recognition
from ..vision.photo import Photo
from .plans import Dummy, Generator, GeneratorSource, Plan

log = logging.getLogger(__name__)
HOUR = 3600.0


@dataclass(frozen=True)
class Sent:
    """What left the device (for the app's counters and the evaluation's ground truth)."""

    kind: str                # "real" | "dummy"
    time: float              # clock time it was sent
    spot_id: str | None      # a dummy's pretended spot; None for a real request
    persona: int | None
    ok: bool                 # False when it failed after the client's retries


@dataclass(order=True)
class _Job:
    due: float
    seq: int
    kind: str = field(compare=False)
    feature: np.ndarray = field(compare=False, repr=False)
    future: "Future[Recognition] | None" = field(compare=False, default=None)
    dummy: Dummy | None = field(compare=False, default=None)


class ManualClock:
    """A clock that only moves when told: ``sleep`` advances it instantly."""

    def __init__(self, start: float = 0.0):
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


class DummyScheduler:
    """Sends real requests among dummies; at most ``dummies`` per real one and
    ``per_hour`` dummies in any hour. ``clock`` is epoch seconds (the
    generator's personas keep hours of the day)."""

    def __init__(self, client: Client, generator: GeneratorSource | None = None, *,
                 dummies: int | None = None, per_hour: int | None = None, window: float | None = None,
                 clock: Callable[[], float] = time.time, on_sent: Callable[[Sent], None] | None = None):
        config = client.config
        self.client = client
        self.dummies = config.dummies if dummies is None else dummies
        self.per_hour = config.dummies_per_hour if per_hour is None else per_hour
        self.window = config.dummy_window if window is None else window
        self.clock = clock
        self.on_sent = on_sent
        if generator is None and self.dummies > 0:
            raise ConfigError("dummies need a generator, e.g. dummies.PersonaGenerator.from_client")
        self._generator = generator
        self._queue: list[_Job] = []
        self._seq = itertools.count()
        self._recent: deque[float] = deque()       # due times of dummies planned in the last hour
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain = True
        self._gen_lock = threading.Lock()          # one catalogue fetch, whichever thread needs it first
        self._count_lock = threading.Lock()
        self.counts = {"real": 0, "dummy": 0, "dummy_failed": 0, "real_failed": 0, "dummy_capped": 0,
                       "dummy_planned": 0, "answered_locally": 0}

    # -- the caller's side -------------------------------------------------------------
    def submit(self, feature: np.ndarray) -> "Future[Recognition]":
        """Queue a real request for ``feature``; its Recognition arrives in the Future.

        A photo the client's answer cache can answer sends nothing at all, dummies neither:
        the Future is already done."""
        future: Future[Recognition] = Future()
        local = self.client.answer_locally(feature)
        if local is not None:
            self._count("answered_locally")
            future.set_result(local)
            return future
        now = self.clock()
        plan = self._plan(now)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the scheduler is stopped")
            rank = min(max(0, plan.real_rank), len(plan.dummies))
            for dummy in plan.dummies[:rank]:
                self._push_dummy(now, dummy)
            self._push(now + plan.real_delay, "real", feature, future)
            for dummy in plan.dummies[rank:]:
                self._push_dummy(now, dummy)
            self._cond.notify()
        return future

    def _push_dummy(self, now: float, dummy: Dummy) -> None:
        self._push(now + dummy.delay, "dummy", dummy.feature, None, dummy)
        self._recent.append(now + dummy.delay)
        self._count("dummy_planned")

    def recognize_feature(self, feature: np.ndarray, timeout: float | None = None) -> Recognition:
        """Blocking: the real answer for ``feature`` (starts the thread if needed)."""
        self.start()
        return self.submit(feature).result(timeout)

    def recognize(self, photo: Photo, timeout: float | None = None) -> Recognition:
        """Blocking: extract ``photo`` on this thread, then wait for its real answer. The
        background thread fetches the catalogue meanwhile, so the burst is ready at once."""
        self.start()
        self.client.check_model()
        return self.recognize_feature(self.client._extractor().extract(photo), timeout)

    def recognize_once(self, photo: Photo, on_answer: Callable[[Recognition], None],
                       timeout: float | None = None) -> Recognition:
        """One-shot (the CLI): hand the real answer to ``on_answer`` as soon as it arrives,
        then send the rest of the burst and stop. A process that exits mid-burst would
        show the server which request came last, so this returns only once all left."""
        try:
            result = self.recognize(photo, timeout)
            on_answer(result)
        finally:
            self.stop(drain=True)
        return result

    def _plan(self, now: float) -> Plan:
        allowed = self._allowance(now)
        if allowed < self.dummies:
            self._count("dummy_capped", self.dummies - allowed)
        if allowed <= 0:
            return Plan(0.0, [])
        try:
            return self._resolve_generator().plan(now, allowed, self.window)
        except Exception as exc:  # noqa: BLE001 - no cover is better than no answer
            log.warning("no dummies for this request: %s", exc)
            return Plan(0.0, [])

    def _allowance(self, now: float) -> int:
        with self._cond:
            while self._recent and self._recent[0] <= now - HOUR:
                self._recent.popleft()
            return max(0, min(self.dummies, self.per_hour - len(self._recent)))

    def _resolve_generator(self) -> Generator:
        with self._gen_lock:
            if not hasattr(self._generator, "plan"):
                self._generator = self._generator()  # type: ignore[operator]  # a factory
            return self._generator  # type: ignore[return-value]

    def _count(self, key: str, n: int = 1) -> None:
        with self._count_lock:
            self.counts[key] += n

    def _push(self, due: float, kind: str, feature: np.ndarray, future: "Future[Recognition] | None",
              dummy: Dummy | None = None) -> None:
        heapq.heappush(self._queue, _Job(due, next(self._seq), kind, feature, future, dummy))

    # -- sending -----------------------------------------------------------------------
    def next_due(self) -> float | None:
        with self._cond:
            return self._queue[0].due if self._queue else None

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def run_due(self) -> int:
        """Send every request due by now, one after another in due order; returns how many."""
        sent = 0
        while True:
            with self._cond:
                if not self._queue or self._queue[0].due > self.clock():
                    return sent
                job = heapq.heappop(self._queue)
            self._send(job)
            sent += 1

    def _take_due(self) -> list[_Job]:
        with self._cond:
            jobs = []
            while self._queue and self._queue[0].due <= self.clock():
                jobs.append(heapq.heappop(self._queue))
            return jobs

    def _send_together(self, jobs: list[_Job]) -> None:
        """Threaded mode: the requests due now leave together, each on its own thread, started
        in plan order; the real answer is delivered when it arrives, not after the dummies."""
        if len(jobs) == 1:
            self._send(jobs[0])
            return
        threads = [threading.Thread(target=self._send, args=(job,), name="enfpire-send", daemon=True)
                   for job in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def run_until(self, t: float, sleep: Callable[[float], None]) -> int:
        """Deterministic mode: sleep to each due time up to ``t`` and send; ends with the clock at ``t``."""
        sent = 0
        while (due := self.next_due()) is not None and due <= t:
            sleep(due - self.clock())
            sent += self.run_due()
        sleep(t - self.clock())
        return sent

    def _send(self, job: _Job) -> None:
        sent_at = self.clock()
        try:
            if job.kind == "real":
                _, result = self.client.ask_server(job.feature)  # submit() already looked in the cache
            else:
                self.client.check_model()
                self.client.query(self.client.body(job.feature))  # stable decoys like a real request
            ok = True
        except Exception as exc:  # noqa: BLE001 - the scheduler must outlive any failure
            ok = False
            self._count(f"{job.kind}_failed")
            log.debug("%s request failed: %s", job.kind, exc)
            if job.future is not None:
                job.future.set_exception(exc)
        else:
            if job.future is not None:
                job.future.set_result(result)
            # a dummy's candidates go out of scope here: nothing is shown, cached or fetched
        self._count(job.kind)
        if self.on_sent is not None:
            dummy = job.dummy
            self.on_sent(Sent(job.kind, sent_at, dummy.spot_id if dummy else None,
                              dummy.persona if dummy else None, ok))

    # -- the background thread ---------------------------------------------------------
    def start(self) -> "DummyScheduler":
        """Run the sender in a daemon thread (idempotent)."""
        with self._cond:
            self._stopping = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="enfpire-dummies", daemon=True)
                self._thread.start()
        return self

    def _loop(self) -> None:
        self._warm_up()
        while True:
            with self._cond:
                if self._stopping and (not self._drain or not self._queue):
                    return
                if not self._queue:
                    self._cond.wait()
                    continue
                wait = self._queue[0].due - self.clock()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
            jobs = self._take_due()
            if jobs:
                self._send_together(jobs)

    def _warm_up(self) -> None:
        """Make the generator (the catalogue fetch) before the first photo needs it."""
        if self.dummies > 0 and self._generator is not None:
            try:
                self._resolve_generator()
            except Exception as exc:  # noqa: BLE001 - retried, and reported, when a burst is planned
                log.debug("dummy generator not ready yet: %s", exc)

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the thread. ``drain``: first send what is queued, on schedule (a burst cut
        short would show the server which request came last); else cancel it."""
        with self._cond:
            self._stopping, self._drain = True, drain
            if not drain:
                for job in self._queue:
                    if job.future is not None:
                        job.future.cancel()
                self._queue.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "DummyScheduler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
