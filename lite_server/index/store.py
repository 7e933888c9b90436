"""The on-disk spot index: spot metadata and photo rows in SQLite, features in
a compact float16 array, a manifest, all inside one immutable version folder.

Layout of an index directory::

    INDEX_DIR/current -> versions/<version>     (symlink, swapped atomically)
    INDEX_DIR/versions/<version>/manifest.json
                                 spots.sqlite
                                 features.npy    float16 [n_photos, dim]
                                 structure.npz   the public structure (lite_server.index.structure)

A build writes a new version into a temporary folder, renames it into
``versions/`` and only then repoints ``current``; a crash at any moment leaves
``current`` on a complete version.
"""
from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from edge_client.errors import EnfPireError
from edge_client.vision.extractor import Extractor

from .structure import Structure, StructureParams, derive

log = logging.getLogger(__name__)

FORMAT = 1
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
KEEP_VERSIONS = 3

#: How a build turns (spot id, photo) pairs into rows and features: :func:`extract_photos` in this
#: process, or ``lite_server.fleet.build.RayExtraction`` on a Ray cluster. Same arguments, same result.
ExtractFn = Callable[[list[tuple[str, Path]], Path, Extractor, Optional[Callable[[int, int], None]]],
                     tuple[list[tuple[str, str]], np.ndarray, int]]


class BadIndexError(EnfPireError):
    """An index directory is missing, incomplete or of another format."""


@dataclass(frozen=True)
class Spot:
    """One landmark: what the phone shows for it."""

    id: str
    name: str
    lat: float | None = None
    lon: float | None = None
    info: dict[str, str] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "lat": self.lat, "lon": self.lon, "info": self.info}


@dataclass(frozen=True)
class Index:
    """A loaded index version: spots, each photo's spot row, and the features."""

    path: Path
    manifest: dict[str, Any]
    spots: list[Spot]
    photo_spot: np.ndarray      # int32 [n_photos]: row in ``spots`` of each feature row
    features: np.ndarray        # float16 [n_photos, dim], L2-normalised

    @property
    def version(self) -> str:
        return str(self.manifest["index_version"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def model_sha256(self) -> str:
        return str(self.manifest["model_sha256"])

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Index":
        """Load ``path``: an index directory (its ``current`` version) or one version folder."""
        version_dir = resolve_version(Path(path))
        try:
            manifest = json.loads((version_dir / "manifest.json").read_text())
            if manifest.get("format") != FORMAT:
                raise BadIndexError(f"{version_dir}: index format {manifest.get('format')} is not {FORMAT}")
            spots, photo_spot = _read_sqlite(version_dir / "spots.sqlite")
            features = np.load(version_dir / "features.npy", mmap_mode="r")
        except (OSError, ValueError, KeyError, sqlite3.Error) as exc:
            raise BadIndexError(f"cannot load index {version_dir}: {exc}") from exc
        if features.shape != (len(photo_spot), manifest["dim"]):
            raise BadIndexError(f"{version_dir}: features {features.shape} do not match the photo rows")
        return cls(version_dir, manifest, spots, photo_spot, features)


def resolve_version(path: Path) -> Path:
    if (path / "manifest.json").is_file():
        return path
    current = path / "current"
    if current.is_dir() and (current / "manifest.json").is_file():
        return current.resolve()
    raise BadIndexError(f"{path} is not an index (no manifest.json, no current version)")


def read_spots_csv(path: Path) -> dict[str, Spot]:
    """Spots from a CSV: first column the id; name/lat/lon understood; the rest is info."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            raise BadIndexError(f"{path} has no header row")
        key = reader.fieldnames[0]
        spots = {}
        for row in reader:
            spot_id = (row.pop(key) or "").strip()
            if spot_id:
                spots[spot_id] = Spot(spot_id, (row.pop("name", "") or spot_id).strip(),
                                      _float(row.pop("lat", None)), _float(row.pop("lon", None)),
                                      {k: v for k, v in row.items() if k and v})
        return spots


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and np.isfinite(value) else None


def scan_photos(photos_dir: Path) -> list[tuple[str, Path]]:
    """(spot id, photo path) for every photo in the spot sub-folders, sorted."""
    if not photos_dir.is_dir():
        raise BadIndexError(f"{photos_dir} is not a folder of spot folders")
    return [(folder.name, photo)
            for folder in sorted(p for p in photos_dir.iterdir() if p.is_dir())
            for photo in sorted(folder.iterdir()) if photo.suffix.lower() in PHOTO_SUFFIXES]


def new_version() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def build_index(
    photos_dir: Path,
    out_dir: Path,
    extractor: Extractor,
    spots_csv: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    extract: ExtractFn | None = None,
) -> Index:
    """Extract every photo (``extract``: default in this process) and publish a new
    index version under ``out_dir``.

    Undecodable photos are skipped and counted in the manifest, never fatal.
    """
    catalogue = read_spots_csv(spots_csv) if spots_csv else {}
    rows, matrix, skipped = (extract or extract_photos)(scan_photos(photos_dir), photos_dir, extractor, progress)
    spot_ids = sorted({spot_id for spot_id, _ in rows})
    spots = [catalogue.get(s) or Spot(s, s) for s in spot_ids]
    return publish(out_dir, base_manifest(extractor, len(spots), len(rows), skipped), spots, rows, matrix)


def extract_photos(photos: list[tuple[str, Path]], photos_dir: Path, extractor: Extractor,
                   progress: Callable[[int, int], None] | None = None,
                   ) -> tuple[list[tuple[str, str]], np.ndarray, int]:
    """Features of (spot id, photo) pairs: (rows with paths relative to ``photos_dir``,
    float16 matrix, number of undecodable photos skipped)."""
    vectors = extractor.extract_many((p for _, p in photos), on_error=lambda p, e: log.info("undecodable: %s", e))
    return collect_rows(photos, photos_dir, vectors, extractor.dim, progress)


def collect_rows(photos: list[tuple[str, Path]], photos_dir: Path, vectors: Iterable[np.ndarray | None], dim: int,
                 progress: Callable[[int, int], None] | None = None,
                 ) -> tuple[list[tuple[str, str]], np.ndarray, int]:
    """The index rows of ``photos`` from their features in the same order (``None``: undecodable,
    skipped and counted): (rows, float16 matrix, skipped). Every extraction ends here."""
    skipped = 0
    rows: list[tuple[str, str]] = []
    features: list[np.ndarray] = []
    for done, ((spot_id, path), vector) in enumerate(zip(photos, vectors, strict=True), 1):
        if vector is None:
            skipped += 1
        else:
            rows.append((spot_id, str(path.relative_to(photos_dir))))
            features.append(vector)
        if progress:
            progress(done, len(photos))
    if skipped:
        log.warning("skipped %d undecodable photo(s)", skipped)
    matrix = np.stack(features).astype(np.float16) if features else np.zeros((0, dim), np.float16)
    return rows, matrix, skipped


def base_manifest(extractor: Extractor, n_spots: int, n_photos: int, skipped: int = 0) -> dict[str, Any]:
    """The manifest fields that describe what was indexed and with which model."""
    return {"format": FORMAT, "model_file": extractor.model_path.name, "model_sha256": extractor.sha256,
            "dim": extractor.dim, "n_spots": n_spots, "n_photos": n_photos, "skipped": skipped}


def publish(out_dir: Path, manifest: dict[str, Any], spots: list[Spot], rows: Iterable[tuple[str, str]],
            features: np.ndarray, params: StructureParams | None = None, update: bool = False,
            structure: Structure | None = None) -> Index:
    """Write a complete version beside the others, then repoint ``current`` atomically.

    The version carries its public ``structure``, derived here with ``params`` (the
    defaults when None) unless the caller already did; an ``update`` derives it from
    the current version's, so that what the phones hold changes only where spots did.
    """
    with index_lock(out_dir):
        return _publish(out_dir, manifest, spots, list(rows), features, params or StructureParams(), update,
                        structure)


def _publish(out_dir: Path, manifest: dict[str, Any], spots: list[Spot], rows: list[tuple[str, str]],
             features: np.ndarray, params: StructureParams, update: bool, structure: Structure | None) -> Index:
    previous = _current_structure(out_dir) if update and structure is None else None
    _clear_leftovers(out_dir)
    version = new_version()
    versions = out_dir / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    tmp = versions / f".tmp-{version}"
    tmp.mkdir()
    try:
        manifest = {**manifest, "index_version": version, "feature_dtype": "float16",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write_sqlite(tmp / "spots.sqlite", spots, rows)
        with open(tmp / "features.npy", "wb") as handle:
            np.save(handle, np.ascontiguousarray(features, dtype=np.float16))
            _fsync(handle)
        if structure is None:
            row_of = {spot.id: i for i, spot in enumerate(spots)}
            photo_spot = np.array([row_of[spot_id] for spot_id, _ in rows], np.int64)
            structure = derive(features, photo_spot, [spot.id for spot in spots], params, previous)
        structure.save(tmp)
        _write_durably(tmp / "manifest.json", json.dumps(manifest, indent=2).encode())
        os.rename(tmp, versions / version)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_current(out_dir, version)
    _prune_versions(out_dir, keep=version)
    return Index.load(out_dir)


def _current_structure(out_dir: Path) -> Structure | None:
    try:
        return Structure.load(resolve_version(out_dir), means=True)
    except BadIndexError:
        return None


def _write_sqlite(path: Path, spots: list[Spot], rows: Iterable[tuple[str, str]]) -> None:
    row_of = {spot.id: i for i, spot in enumerate(spots)}
    with sqlite3.connect(path) as db:
        db.executescript("""
            PRAGMA journal_mode = DELETE;
            CREATE TABLE spots (row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
                                lat REAL, lon REAL, info TEXT NOT NULL);
            CREATE TABLE photos (row INTEGER PRIMARY KEY, spot_row INTEGER NOT NULL REFERENCES spots(row),
                                 path TEXT NOT NULL);
            CREATE INDEX photos_by_spot ON photos (spot_row);
        """)
        db.executemany("INSERT INTO spots VALUES (?, ?, ?, ?, ?, ?)",
                       [(i, s.id, s.name, s.lat, s.lon, json.dumps(s.info, sort_keys=True))
                        for i, s in enumerate(spots)])
        db.executemany("INSERT INTO photos VALUES (?, ?, ?)",
                       ((i, row_of[spot_id], photo) for i, (spot_id, photo) in enumerate(rows)))
    db.close()
    with open(path, "rb+") as handle:
        _fsync(handle)


def _read_sqlite(path: Path) -> tuple[list[Spot], np.ndarray]:
    if not path.is_file():
        raise OSError(f"{path} is missing")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        spots = [Spot(i, n, lat, lon, json.loads(info)) for i, n, lat, lon, info in
                 db.execute("SELECT id, name, lat, lon, info FROM spots ORDER BY row")]
        photo_spot = np.fromiter((r for (r,) in db.execute("SELECT spot_row FROM photos ORDER BY row")),
                                 dtype=np.int32)
    finally:
        db.close()
    return spots, photo_spot


def _fsync(handle: Any) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        _fsync(handle)


def _point_current(out_dir: Path, version: str) -> None:
    link = out_dir / f".current-{version}"
    os.symlink(Path("versions") / version, link)
    os.replace(link, out_dir / "current")  # rename(2) over the old link: atomic
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune_versions(out_dir: Path, keep: str) -> None:
    """Keep the newest few versions (a server may still be reading the previous one).

    Newest by the manifest's write time (names made in one second sort at random).
    An old version is renamed to a dot-name before it is deleted, so a crash
    mid-delete never leaves a half version under its real name.
    """
    versions = sorted((p for p in (out_dir / "versions").iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: (p / "manifest.json").stat().st_mtime_ns if (p / "manifest.json").exists() else 0)
    for old in versions[:-KEEP_VERSIONS]:
        if old.name != keep:
            trash = old.with_name(f".trash-{old.name}")
            os.rename(old, trash)
            shutil.rmtree(trash, ignore_errors=True)


_held = threading.local()


@contextmanager
def index_lock(out_dir: Path) -> Iterator[None]:
    """Exclusive writer lock on an index directory, across processes and threads.

    ``flock`` on ``INDEX_DIR/.lock``: the kernel drops it when its holder dies,
    even by ``kill -9``, so a crash never leaves the index locked. Re-entrant
    within one thread (an update holds it around its read and its publish).
    """
    key = str(Path(out_dir).resolve())
    held: set[str] = _held.__dict__.setdefault("dirs", set())
    if key in held:
        yield
        return
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)


def _clear_leftovers(out_dir: Path) -> None:
    """Remove what an interrupted writer left: temporary versions, links and trash (lock held)."""
    versions = out_dir / "versions"
    for stale in (versions.glob(".tmp-*") if versions.is_dir() else ()):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in (versions.glob(".trash-*") if versions.is_dir() else ()):
        shutil.rmtree(stale, ignore_errors=True)
    for link in out_dir.glob(".current-*"):
        link.unlink(missing_ok=True)
