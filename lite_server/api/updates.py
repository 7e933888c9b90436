"""Changing the spots of an index without stopping anything.

``add_spots`` and ``remove_spots`` read the current version, write a complete
new one beside it and repoint ``current`` atomically (``index.publish``), all
under the index's writer lock so two updates never lose each other's work.
``reload_service`` makes a running server switch to whatever ``current`` is:
it builds the new lookup first and swaps one reference, so requests in flight
finish on the version they started with and none fails.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from edge_client.errors import EnfPireError
from edge_client.vision.extractor import Extractor

from ..index.store import ExtractFn, Index, Spot, extract_photos, index_lock, publish, read_spots_csv, scan_photos
from ..index.structure import StructureParams

if TYPE_CHECKING:
    from .app import Service

log = logging.getLogger(__name__)
_reload_lock = threading.Lock()


class UpdateError(EnfPireError):
    """An update that cannot be applied (unknown spots, no photos, another model)."""


def photo_rows(index: Index) -> list[tuple[str, str]]:
    """(spot id, photo path) of every feature row of ``index``, in row order."""
    db = sqlite3.connect(f"file:{index.path / 'spots.sqlite'}?mode=ro", uri=True)
    try:
        return [(spot_id, path) for spot_id, path in db.execute(
            "SELECT spots.id, photos.path FROM photos JOIN spots ON spots.row = photos.spot_row "
            "ORDER BY photos.row")]
    finally:
        db.close()


def _carried_manifest(index: Index, n_spots: int, n_photos: int, skipped: int) -> dict[str, object]:
    keep = ("format", "model_file", "model_sha256", "dim")
    return {**{k: index.manifest[k] for k in keep}, "n_spots": n_spots, "n_photos": n_photos,
            "skipped": skipped, "parent": index.version}


def add_spots(index_dir: Path, photos_dir: Path, extractor: Extractor, spots_csv: Path | None = None,
              progress: Callable[[int, int], None] | None = None, params: StructureParams | None = None,
              extract: ExtractFn | None = None) -> Index:
    """Add the photos of ``photos_dir`` (one sub-folder per spot) to the index: new spots are
    appended, photos of a known spot join it, photos already indexed are skipped. ``extract``
    runs the extraction (default: in this process; see ``index.ExtractFn``)."""
    with index_lock(index_dir):
        base = Index.load(index_dir)
        if extractor.sha256 != base.model_sha256:
            raise UpdateError(f"the index was built with model {base.model_sha256[:12]}..., "
                              f"not {extractor.sha256[:12]}...: features would not compare")
        rows = photo_rows(base)
        known = set(rows)
        fresh = [(s, p) for s, p in scan_photos(photos_dir) if (s, str(p.relative_to(photos_dir))) not in known]
        if not fresh:
            raise UpdateError(f"{photos_dir} holds no photos that are not indexed already")
        added_rows, added, skipped = (extract or extract_photos)(fresh, photos_dir, extractor, progress)
        if not added_rows:
            raise UpdateError(f"none of the {len(fresh)} new photo(s) could be decoded")
        spots = _merged_spots(base.spots, (s for s, _ in added_rows), read_spots_csv(spots_csv) if spots_csv else {})
        features = np.concatenate([np.asarray(base.features), added])
        rows += added_rows
        return publish(index_dir, _carried_manifest(base, len(spots), len(rows), skipped), spots, rows, features,
                       params, update=True)


def _merged_spots(existing: list[Spot], new_ids: Iterable[str], catalogue: dict[str, Spot]) -> list[Spot]:
    """Known spots in their order (metadata refreshed from ``catalogue``), then new ones, sorted."""
    known = {spot.id for spot in existing}
    merged = [catalogue.get(spot.id, spot) for spot in existing]
    return merged + [catalogue.get(s) or Spot(s, s) for s in sorted(set(new_ids) - known)]


def remove_spots(index_dir: Path, spot_ids: Iterable[str], params: StructureParams | None = None) -> Index:
    """Drop spots and all their photos; unknown ids or removing every spot is an :class:`UpdateError`."""
    doomed = set(spot_ids)
    with index_lock(index_dir):
        base = Index.load(index_dir)
        unknown = doomed - {spot.id for spot in base.spots}
        if unknown:
            raise UpdateError(f"no such spot(s): {', '.join(sorted(unknown)[:10])}")
        spots = [spot for spot in base.spots if spot.id not in doomed]
        if not spots:
            raise UpdateError("removing every spot would leave an empty index")
        rows = photo_rows(base)
        keep = np.array([spot_id not in doomed for spot_id, _ in rows], dtype=bool)
        rows = [row for row, kept in zip(rows, keep) if kept]
        features = np.asarray(base.features)[keep]
        manifest = _carried_manifest(base, len(spots), len(rows), 0)
        return publish(index_dir, manifest, spots, rows, features, params, update=True)


def reload_service(service: "Service") -> tuple[bool, str]:
    """Point ``service`` at its index directory's ``current`` version if that changed.

    Returns (switched, serving version). Serialised, so a signal and an admin
    call arriving together load once.
    """
    with _reload_lock:
        index = Index.load(service.config.index)
        serving = service.lookup
        if serving is not None and serving.index.path == index.path:
            return False, index.version
        service.load(index)
        return True, index.version
