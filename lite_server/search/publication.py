"""The public document of an index version (``GET /v1/public``), its deltas and its size.

What goes in, and why, is described in :mod:`edge_client.protocol.public`; this module
assembles it from a :class:`Lookup`, keeps one per version beside the index
(``public.json.gz`` in the version folder, so a delta can be answered from
any version still on disk, see ``index.KEEP_VERSIONS``) and computes the
delta between two versions, keyed by spot id. Phones name the document they
hold by its digest (``?since=DIGEST``), which :class:`Publisher` matches
against the kept versions' digests.

How much per-spot content is published is sized to the catalogue by
``ServerConfig.public_budget`` (bytes of int8 rows): a catalogue whose
prototypes and candidate looks fit publishes them all (the real datasets
do), a larger one drops the separate looks (dummies then use the
prototypes), and a larger one still publishes fewer prototypes per spot, the
heaviest first, never fewer than one.
"""
from __future__ import annotations

import gzip
import json
import logging
import re
import threading
import weakref
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import sparse

from edge_client.protocol import wire
from edge_client.protocol.public import (
    BLOCKS,
    COLUMNS,
    FORMAT,
    GLOBALS,
    PublicError,
    PublicParams,
    Rows,
    canonical,
    parse,
)
from edge_client.state import write_private
from edge_client.vision.extractor import l2_normalize

from ..index.whitening import KIND as WHITENING
from .lookup import Lookup

log = logging.getLogger(__name__)
FILE = "public.json.gz"
SPREAD_SPOTS = 2000  # the dummies' photo spread is measured on at most this many spots
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
DIGEST = re.compile(r"^[0-9a-f]{64}$")  # how a phone names the document it holds (``?since=``)
_cache: "weakref.WeakKeyDictionary[Lookup, PublicParams]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def document(lookup: Lookup) -> PublicParams:
    """The public document of ``lookup``'s index, built once per loaded index and saved beside it."""
    with _lock:
        doc = _cache.get(lookup)
    if doc is None:
        doc = build(lookup)
        save(lookup.index.path, doc)
        with _lock:
            _cache[lookup] = doc
    return doc


def build(lookup: Lookup, budget: int | None = None) -> PublicParams:
    """Assemble the document from the lookup's public structure (see the module docstring);
    ``budget`` overrides the configured ``public_budget``."""
    index, config = lookup.index, lookup.config
    budget = config.public_budget if budget is None else budget
    n = len(index.spots)
    protos, owner = _prototypes(lookup)
    looks = [int(lookup._encoded[s]["shape"][0]) for s in range(n)]  # rows, without decoding them
    with_looks, keep = budget_rule(n, len(protos), sum(looks), protos.shape[1], budget)
    if not with_looks:  # the heaviest few prototypes of every spot (the derivation orders them so)
        starts = np.searchsorted(owner, np.arange(n))
        chosen = np.arange(len(owner)) - starts[owner] < keep
        protos, owner = protos[chosen], owner[chosen]
        looks = [0] * n
        log.info("public document: %d spots, %d prototype(s) a spot at most, no separate looks", n, keep)
    columns = {
        "lat": np.array([np.nan if s.lat is None else s.lat for s in index.spots], np.float32),
        "lon": np.array([np.nan if s.lon is None else s.lon for s in index.spots], np.float32),
        "cell": _unsigned(lookup.spot_cell), "photos": _unsigned(np.bincount(index.photo_spot, minlength=n)),
        "n_prototypes": np.bincount(owner, minlength=n).astype(np.uint8), "n_looks": np.array(looks, np.uint8),
    }
    look_rows = [lookup.published_looks(s) for s in range(n)] if with_looks else []
    blocks = {"prototypes": Rows(*wire.quantize(protos)),
              "looks": Rows(*wire.quantize(np.concatenate(look_rows) if look_rows else np.zeros((0, protos.shape[1]))))}
    codec = {"kind": lookup.codec.kind, "dim": lookup.codec.dim} if lookup.codec else {"kind": "none"}
    cover = lookup.coverage_basis.astype(np.float16) if lookup.codec and lookup.coverage_basis is not None else None
    if cover is not None:
        codec["coverage_dim"] = int(cover.shape[0])
    settings = {"n_cells": lookup.n_cells, "spread": spread(lookup), "codec": codec}
    basis = lookup.codec.basis_.astype(np.float16) if lookup.codec else None
    ids = np.array([s.id for s in index.spots], dtype=str)
    return canonical(PublicParams(index.version, ids, columns, blocks, basis, settings, cover))


def budget_rule(n_spots: int, n_prototypes: int, n_looks: int, dim: int, budget: int) -> tuple[bool, int]:
    """(publish the separate looks?, most prototypes a spot) for ``budget`` bytes of int8 rows.

    Everything when it fits; else no looks and as many prototypes a spot as
    fit, at least one (so every spot can still be drawn and every cell scored).
    """
    row_bytes = dim + 2  # int8 codes and a float16 scale
    if (n_prototypes + n_looks) * row_bytes <= budget:
        return True, max(1, n_prototypes)
    return False, max(1, budget // max(1, n_spots * row_bytes))


def _prototypes(lookup: Lookup) -> tuple[np.ndarray, np.ndarray]:
    """Prototypes in the space they travel in (the codec's), grouped by spot, each spot's order kept."""
    order = np.argsort(lookup.prototype_spot, kind="stable")
    protos, owner = np.asarray(lookup.prototypes, np.float32)[order], np.asarray(lookup.prototype_spot)[order]
    if lookup.codec is not None and protos.shape[1] != lookup.codec.dim:
        protos = lookup.codec.project(protos)
    return l2_normalize(protos), owner


def _unsigned(values: np.ndarray) -> np.ndarray:
    """Non-negative integers in the narrowest unsigned dtype that holds them (fewer bytes to send)."""
    values = np.asarray(values, np.int64)
    top = int(values.max()) if len(values) else 0
    return values.astype(np.uint8 if top < 1 << 8 else np.uint16 if top < 1 << 16 else np.uint32)


def spread(lookup: Lookup, max_spots: int = SPREAD_SPOTS, seed: int = 0) -> dict[str, float]:
    """Leave-one-out photo-to-spot spread: ``cos_median`` of a photo with its spot's
    L2-normalised mean, and ``log_tan_sigma``, the standard deviation of the log
    tangent of that angle (how much photos differ in how typical they are), so
    dummy photos can be calibrated to it. Measured on every spot up to
    ``max_spots`` (the real datasets), on a fixed random ``max_spots`` of them beyond:
    a median needs no million photos, and a server start should not read them all.

    Beside a learned whitening, the same in its space (``codec_cos_median``,
    ``codec_log_tan_sigma``): there a spot's photos vary about equally in every direction
    (what the whitening is for), so the phone draws its dummies' photos there, where the
    transform sees them (:class:`edge_client.dummies.generator.SyntheticPhotos`)."""
    index = lookup.index
    labels = np.asarray(index.photo_spot)
    n_spots = len(index.spots)
    rows = np.arange(len(labels))
    if n_spots > max_spots:
        chosen = np.zeros(n_spots, bool)
        chosen[np.random.default_rng(seed).choice(n_spots, max_spots, replace=False)] = True
        rows = rows[chosen[labels]]
    out = _spread(lambda part: np.asarray(index.features[part], np.float64), rows, labels, n_spots)
    if lookup.codec is not None and lookup.codec.kind == WHITENING:
        codec = _spread(lambda part: lookup.codec.project(index.features[part]).astype(np.float64), rows, labels,
                        n_spots)
        out.update(codec_cos_median=codec["cos_median"], codec_log_tan_sigma=codec["log_tan_sigma"])
    return out


def _spread(vectors: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, labels: np.ndarray,
            n_spots: int) -> dict[str, Any]:
    """:func:`spread` of the photo ``rows`` as ``vectors`` gives them (a chunk of rows at a time)."""
    sums: np.ndarray | None = None
    for start in range(0, len(rows), 4096):  # bounded memory on big indexes
        part = rows[start:start + 4096]
        x = vectors(part)
        sums = np.zeros((n_spots, x.shape[1]), np.float64) if sums is None else sums
        # Summed per spot as a sparse product: np.add.at is many times slower.
        member = sparse.csr_matrix((np.ones(len(part)), (labels[part], np.arange(len(part)))), shape=(n_spots, len(part)))
        sums += member @ x
    counts = np.bincount(labels[rows], minlength=n_spots)
    cos = []
    for start in range(0, len(rows), 4096):
        part = rows[start:start + 4096]
        part = part[counts[labels[part]] > 1]
        if sums is None or not len(part):
            continue
        x = vectors(part)
        others = sums[labels[part]] - x
        cos.append((x * others).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(others, axis=1), 1e-12))
    values = np.clip(np.concatenate(cos) if cos else np.zeros(0), 1e-3, 1 - 1e-6)
    if len(values) < 2:
        return {"cos_median": 0.8, "log_tan_sigma": 0.25, "n": int(len(values))}
    log_tan = np.log(np.sqrt(1 - values ** 2) / values)
    return {"cos_median": round(float(np.median(values)), 4), "log_tan_sigma": round(float(log_tan.std()), 4),
            "n": int(len(values))}


def save(version_dir: Path, doc: PublicParams) -> None:
    """Keep ``doc`` in its version folder for later deltas (best effort: a read-only index just has none)."""
    try:
        write_private(Path(version_dir) / FILE, _gzip(_dumps(doc.to_payload())))
    except OSError as exc:
        log.warning("cannot keep the public document beside %s (%s): deltas from it will be full downloads",
                    version_dir, exc)


def load_version(current_dir: Path, version: str) -> PublicParams | None:
    """The kept document of ``version`` (a sibling of ``current_dir``), or None when it is gone or unusable."""
    if not _VERSION.match(version):
        return None
    path = Path(current_dir).parent / version / FILE
    try:
        return parse(json.loads(gzip.decompress(path.read_bytes())))
    except (OSError, EOFError, ValueError, PublicError) as exc:
        if path.exists():
            log.warning("the kept public document %s is unusable (%s)", path, exc)
        return None


def delta(base: PublicParams, new: PublicParams) -> dict[str, Any]:
    """What turns ``base`` into ``new``: removed ids, upserted spot rows (new or changed), changed globals."""
    common, in_base, in_new = np.intersect1d(base.ids, new.ids, assume_unique=True, return_indices=True)
    changed = np.zeros(len(common), bool)
    for c in COLUMNS:
        a, b = base.columns[c][in_base], new.columns[c][in_new]
        changed |= (a != b) & ~(_nan(a) & _nan(b))
    for block, count in BLOCKS.items():
        changed |= _rows_changed(base, new, block, count, in_base, in_new)
    fresh = np.setdiff1d(np.arange(len(new.ids)), in_new, assume_unique=True)
    upserted = np.sort(np.concatenate([fresh, in_new[changed]]))
    names = tuple(k for k in GLOBALS if base.settings.get(k) != new.settings.get(k))
    if not (_same(base.basis, new.basis) and _same(base.coverage, new.coverage)) and "codec" not in names:
        names += ("codec",)
    return {"format": FORMAT, "kind": "delta", "base_version": base.version, "base_digest": base.digest,
            "index_version": new.version, "digest": new.digest, "globals": new._globals_payload(names),
            "removed": np.setdiff1d(base.ids, new.ids, assume_unique=True).tolist(),
            "spots": new.spots_payload(upserted)}


def _nan(a: np.ndarray) -> np.ndarray:
    return np.isnan(a) if a.dtype.kind == "f" else np.zeros(a.shape, bool)


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def _rows_changed(base: PublicParams, new: PublicParams, block: str, count: str,
                  in_base: np.ndarray, in_new: np.ndarray) -> np.ndarray:
    """Per common spot: do its rows of ``block`` differ (in number, codes or scales)?"""
    nb, nn = base.columns[count][in_base].astype(np.int64), new.columns[count][in_new].astype(np.int64)
    changed = nb != nn
    same_count = np.flatnonzero(~changed)
    a = base.blocks[block].take(base.columns[count], in_base[same_count])
    b = new.blocks[block].take(new.columns[count], in_new[same_count])
    if a.codes.shape[1:] != b.codes.shape[1:]:
        return np.ones(len(in_base), bool)
    differs = (a.codes != b.codes).any(axis=1) | (a.scales.view(np.uint16) != b.scales.view(np.uint16))
    owner = np.repeat(np.arange(len(same_count)), nn[same_count])
    changed[same_count] |= np.bincount(owner, weights=differs, minlength=len(same_count)) > 0
    return changed


def _dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)  # as the app compresses answers


def public_bytes(doc: PublicParams) -> int:
    """Bytes of the full document on the wire (compact JSON, gzipped as the server sends it)."""
    return len(_gzip(_dumps(doc.to_payload())))


def delta_bytes(base: PublicParams, new: PublicParams) -> int:
    """Bytes on the wire of the delta from ``base`` to ``new`` (gzipped as the server sends it)."""
    return len(_gzip(_dumps(delta(base, new))))


def kept_digests(current_dir: Path) -> dict[str, str]:
    """digest -> version of every document kept beside ``current_dir``'s siblings (the digest field of
    each file, not re-derived: a match is only a candidate, :func:`load_version` checks it)."""
    out: dict[str, str] = {}
    for path in sorted(Path(current_dir).parent.glob(f"*/{FILE}")):
        try:
            digest = json.loads(gzip.decompress(path.read_bytes())).get("digest")
        except (OSError, EOFError, ValueError, AttributeError) as exc:
            log.warning("the kept public document %s is unusable (%s)", path, exc)
            continue
        if isinstance(digest, str) and DIGEST.match(digest):
            out[digest] = path.parent.name
    return out


class Publisher:
    """Answers ``GET /v1/public``: the current document, or a delta from a document still kept.

    A phone names the document it holds by its digest (``?since=DIGEST``, the sha256 it
    computed itself), never by a version label of the server's: the kept versions'
    digests are read once per change of the versions on disk and the delta is made from
    the matching one; an unknown digest gets the full document. The current version's
    JSON text and the last few deltas are kept ready, gzipped too (a national catalogue's
    document is megabytes: dumped and compressed once, not per phone).
    """

    def __init__(self, keep: int = 8):
        self.keep = keep
        self._lock = threading.Lock()
        self._full: dict[str, tuple[bytes, bytes]] = {}
        self._deltas: dict[tuple[str, str], tuple[bytes, bytes]] = {}
        self._digests: tuple[tuple[Any, ...], dict[str, str]] = ((), {})

    def answer(self, lookup: Lookup, since: str | None) -> tuple[bytes, bytes]:
        """(JSON text, its gzip) for a phone holding the document of digest ``since`` (None: it holds none)."""
        doc = document(lookup)
        if since and DIGEST.match(since):
            key = (since, doc.version)
            with self._lock:
                kept = self._deltas.get(key)
            if kept is None:
                base = self._base(lookup, doc, since)
                if base is not None:
                    kept = self._remember(self._deltas, key, _dumps(delta(base, doc)))
            if kept is not None:
                return kept
        with self._lock:
            kept = self._full.get(doc.version)
        return kept or self._remember(self._full, doc.version, _dumps(doc.to_payload()))

    def _base(self, lookup: Lookup, doc: PublicParams, digest: str) -> PublicParams | None:
        """The kept document whose digest is ``digest`` (the current one included), or None."""
        if digest == doc.digest:
            return doc
        current = Path(lookup.index.path)
        try:  # the versions on disk and their files' times: re-read the digests only when these change
            stamp = tuple((p.parent.name, p.stat().st_mtime_ns) for p in sorted(current.parent.glob(f"*/{FILE}")))
        except OSError:
            stamp = ()
        with self._lock:
            seen, digests = self._digests
        if stamp != seen:
            digests = kept_digests(current)
            with self._lock:
                self._digests = (stamp, digests)
        version = digests.get(digest)
        base = load_version(current, version) if version else None
        return base if base is not None and base.digest == digest else None

    def _remember(self, store: dict[Any, tuple[bytes, bytes]], key: Any, text: bytes) -> tuple[bytes, bytes]:
        pair = (text, _gzip(text))
        with self._lock:
            store[key] = pair
            while len(store) > self.keep:
                store.pop(next(iter(store)))
        return pair
