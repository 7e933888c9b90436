"""The device's answer cache: candidates it already fetched, keyed by the cells they cover.

A tourist takes several photos of one landmark. The later photos name the
same real cells as the first, so the phone answers them from the candidates
the first answer brought, with no request at all: the server gets nothing
to link. The server's ``/v1/info`` is kept too, so a cached answer needs no
request even in a fresh process.

An entry holds the cells a request named (its decoys too: their spots came
back as well), the index version, when it was fetched and the candidates as
the server sent them. Never the photo, the feature, or which cells were the
real ones. Bounded by ``max_entries`` (the oldest go first) and ``max_age``
seconds. Kept in one gzip JSON file per server, written whole, readable by
the user only; an unreadable or corrupt file is ignored and replaced.
"""
from __future__ import annotations

import functools
import gzip
import json
import logging
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable

from ..state import write_private

log = logging.getLogger(__name__)
FORMAT = 1


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``method`` holding the cache's lock."""
    @functools.wraps(method)
    def run(self: "AnswerCache", *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return run


class AnswerCache:
    """Recent candidate answers of one server; ``path=None`` keeps them in memory only."""

    def __init__(self, path: Path | None = None, max_entries: int = 32, max_age: float = 6 * 3600.0,
                 clock: Callable[[], float] = time.time):
        self.path = path
        self.max_entries = max_entries
        self.max_age = max_age
        self.clock = clock
        self._state: dict[str, Any] | None = None
        self._lock = threading.RLock()  # the app's thread and the dummy scheduler's may both use it

    @_locked
    def answer(self, cells: tuple[int, ...], index_version: str) -> list[dict[str, Any]] | None:
        """The cached candidates for a photo naming ``cells`` (best first), or None (a miss).

        A hit needs only the photo's best cell among recent answers: measured on
        both datasets' tuning splits, also answering photos whose weaker cells
        were not fetched costs no accuracy and spares most repeat requests of a
        burst. The candidates are those of every fresh entry sharing a cell with ``cells``.
        """
        entries = [e for e in self._fresh() if e["version"] == index_version and set(cells) & set(e["cells"])]
        if not cells or not any(cells[0] in e["cells"] for e in entries):
            return None
        spots = self._load()["spots"]
        ids = dict.fromkeys(i for e in entries for i in e["ids"])  # ordered, no repeats
        return [spots[i] for i in ids]

    @_locked
    def store(self, cells: Iterable[int], index_version: str, candidates: list[dict[str, Any]]) -> None:
        """Remember the answer to a request that named ``cells``."""
        state = self._load()
        ids = [str(c.get("id")) for c in candidates]
        entries = self._fresh() + [{"cells": sorted(int(c) for c in cells), "version": index_version,
                                    "time": self.clock(), "ids": ids}]
        state["entries"] = entries[max(0, len(entries) - self.max_entries):]
        state["spots"].update(zip(ids, candidates))
        kept = {i for e in state["entries"] for i in e["ids"]}
        state["spots"] = {i: c for i, c in state["spots"].items() if i in kept}
        self._save()

    @_locked
    def info(self) -> dict[str, Any] | None:
        """The server's ``/v1/info`` as last fetched, while younger than ``max_age``."""
        kept = self._load().get("info")
        if kept and self.clock() - kept["time"] < self.max_age:
            return kept["payload"]  # type: ignore[no-any-return]
        return None

    @_locked
    def store_info(self, payload: dict[str, Any]) -> None:
        """Remember ``/v1/info``; answers of another index version stop counting."""
        state = self._load()
        state["info"] = {"time": self.clock(), "payload": payload}
        version = payload.get("index_version")
        state["entries"] = [e for e in state["entries"] if e["version"] == version]
        self._save()

    @_locked
    def clear(self) -> None:
        """Forget everything, on disk too."""
        self._state = _empty()
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    @_locked
    def __len__(self) -> int:
        return len(self._fresh())

    def _fresh(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [e for e in self._load()["entries"] if 0 <= now - e["time"] < self.max_age]

    def _load(self) -> dict[str, Any]:
        if self._state is None:
            self._state = self._read()
        return self._state

    def _read(self) -> dict[str, Any]:
        if self.path is None or not self.path.exists():
            return _empty()
        try:
            state = json.loads(gzip.decompress(self.path.read_bytes()))
            _check(state)
            return state  # type: ignore[no-any-return]
        except (OSError, EOFError, zlib.error, ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring the unreadable answer cache %s (%s); starting a new one", self.path, exc)
            return _empty()

    def _save(self) -> None:
        if self.path is not None:
            data = json.dumps(self._state, separators=(",", ":")).encode()
            write_private(self.path, gzip.compress(data, compresslevel=1, mtime=0))


def _empty() -> dict[str, Any]:
    return {"format": FORMAT, "entries": [], "spots": {}, "info": None}


def _check(state: Any) -> None:
    """Raise ValueError unless ``state`` has the shape :class:`AnswerCache` writes."""
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("spots"), dict):
        raise ValueError("not an answer cache of this version")
    for entry in state["entries"]:
        if not (isinstance(entry["cells"], list) and isinstance(entry["ids"], list)
                and isinstance(entry["time"], (int, float)) and all(i in state["spots"] for i in entry["ids"])):
            raise ValueError("malformed entry")
    info = state.get("info")
    if info is not None and not (isinstance(info["payload"], dict) and isinstance(info["time"], (int, float))):
        raise ValueError("malformed info")
