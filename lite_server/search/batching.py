"""Concurrent lookups answered together: one matrix product for many requests.

A request thread that finds no batch running becomes the *leader*: it takes
every query waiting (up to ``max_batch``), runs one backend search for all of
them, hands each its rows, and repeats until its own query is answered; then it
passes the lead to the oldest waiting request and returns. No extra thread, no
timer: a lone request goes straight through, and under load the scan of the
gallery (the expensive part) is shared by every query that arrived while the
previous scan ran.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .backends import Backend


class _Ticket:
    """One caller's queries, and where its answer (or the lead) is handed over."""

    def __init__(self, method: str, queries: np.ndarray, n: int):
        self.method, self.queries, self.n = method, queries, n
        self.turn = threading.Event()
        self.result: tuple[np.ndarray, np.ndarray] | None = None
        self.error: BaseException | None = None

    @property
    def answered(self) -> bool:
        return self.result is not None or self.error is not None

    def answer(self) -> tuple[np.ndarray, np.ndarray]:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class BatchingBackend:
    """A :class:`~lite_server.search.backends.Backend` whose concurrent searches share one batched search.

    Results are those of the wrapped backend: a batch asks for the largest
    ``n`` of its members and each gets its best-first prefix.
    """

    def __init__(self, backend: Backend, max_batch: int = 32):
        self.backend, self.max_batch = backend, max(1, max_batch)
        self._lock = threading.Lock()
        self._waiting: list[_Ticket] = []
        self._leading = False

    def add(self, vectors: np.ndarray) -> "BatchingBackend":
        self.backend.add(vectors)
        return self

    def save(self, path: Path) -> None:
        self.backend.save(path)

    @property
    def size(self) -> int:
        return self.backend.size

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self._call("search", queries, n)

    def search_groups(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The wrapped backend's ``search_groups`` (when it has one), batched the same way."""
        return self._call("search_groups", queries, k)

    def _call(self, method: str, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        ticket = _Ticket(method, np.atleast_2d(np.asarray(queries, np.float32)), n)
        with self._lock:
            self._waiting.append(ticket)
            lead = not self._leading
            self._leading = True
        if not lead:
            ticket.turn.wait()  # answered, or made the leader
        if not ticket.answered:
            self._lead(ticket)
        return ticket.answer()

    def _lead(self, mine: _Ticket) -> None:
        while not mine.answered:
            with self._lock:  # the oldest request's kind of search, and all others of that kind
                kind = self._waiting[0].method
                batch = [t for t in self._waiting if t.method == kind][:self.max_batch]
                self._waiting = [t for t in self._waiting if t not in batch]
            self._run(batch)
        with self._lock:
            if self._waiting:
                self._waiting[0].turn.set()  # the oldest waiting request leads next
            else:
                self._leading = False

    def _run(self, batch: list[_Ticket]) -> None:
        try:
            n = max(t.n for t in batch)
            search = getattr(self.backend, batch[0].method)
            scores, rows = search(np.concatenate([t.queries for t in batch]), n)
        except BaseException as exc:  # noqa: BLE001 - every caller of the batch gets the error
            for ticket in batch:
                ticket.error = exc
        else:
            start = 0
            for ticket in batch:
                end = start + len(ticket.queries)
                ticket.result = scores[start:end, :ticket.n], rows[start:end, :ticket.n]
                start = end
        for ticket in batch:
            ticket.turn.set()
