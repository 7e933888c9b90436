"""The server's public parameters as the phone downloads, checks and keeps them.

One document per index version (``GET /v1/public``) holds everything the
phone needs before it asks anything, and nothing about any user:

- the codec basis (the space candidates are compared in: the gallery's PCA or its
  learned whitening, ``codec.kind``; checked finite and of full rank) and, beside a
  learned whitening, the coverage basis (``codec.coverage_dim`` orthonormal directions
  the open set measures how much of a photo lies in; checked orthonormal),
- per spot, keyed by its id: coordinates, public cell, popularity (gallery
  photo count), a few prototypes (int8 codes in codec space with float16
  scales, heaviest first) and, when the catalogue is small enough, the looks
  a candidates answer carries for it (the dummies' anchors; otherwise the
  dummies use the prototypes),
- the cell count and the photo-to-spot spread dummies are calibrated to.

Every array is exact (little-endian, its own dtype, see
:func:`edge_client.protocol.wire.encode_array`), so the phone can apply a *delta*
(``?since=DIGEST``: removed ids, upserted spot rows, changed globals) to the
document it keeps and check the result against the server's ``digest``, a
sha256 of the canonical form of the whole document. Rows are sorted by spot
id, so that form does not depend on how the document was assembled.
Cells, Mix and the dummy catalogue all read this one parsed object.

The document's identity is its content: the digest covers every global and
row but not the server's ``index_version`` label, and the phone names the
document it holds by the digest it computed itself (``?since=``, its kept
copy, its comparisons), never by a string the server chose, so a version
label cannot serve as a cookie. Whether every phone sees the same document
is checked against a shared copy of the digest (``edge_client.client``,
``consistency`` in :class:`~edge_client.config.ClientConfig`).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import zlib
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import BadResponseError
from ..state import write_private
from . import wire

log = logging.getLogger(__name__)
FORMAT = 1
#: Per-spot columns with one value per spot, and their accepted dtypes.
COLUMNS: dict[str, tuple[str, ...]] = {
    "lat": ("float32",), "lon": ("float32",), "cell": ("uint8", "uint16", "uint32"),
    "photos": ("uint8", "uint16", "uint32"), "n_prototypes": ("uint8",), "n_looks": ("uint8",),
}
#: Blocks of int8 rows (codes + float16 scales), concatenated in spot order, with their count column.
BLOCKS = {"prototypes": "n_prototypes", "looks": "n_looks"}
GLOBALS = ("n_cells", "spread", "codec")  # small JSON fields, compared and sent whole
#: Codec bases a document may hold (``codec.kind``): both are a [dim, D] matrix the phone projects with.
CODEC_KINDS = ("pca", "learned-whitening")
#: How far from the identity the Gram matrix of a coverage basis' float16 rows may be (float16's
#: rounding of 1280 terms stays two orders of magnitude below).
COVERAGE_TOLERANCE = 0.01
#: The smallest ratio of the basis' least to greatest singular value the phone accepts. A gallery's
#: learned whitening is far above it (its within-spot covariance is shrunk toward the identity).
MIN_BASIS_CONDITION = 1e-4
#: Where a relay (or mirror) serves its shared copy of the public document's digest (``enfpire-relay``).
SHARED_PATH = "/.well-known/enfpire-public"


class PublicError(BadResponseError):
    """A public document or delta that cannot be used (malformed, wrong base, digest mismatch)."""


@dataclass(frozen=True)
class Rows:
    """int8 codes [R, D] with float16 scales [R]: ``row ~ codes * scale``."""

    codes: np.ndarray
    scales: np.ndarray

    def decode(self) -> np.ndarray:
        return self.codes.astype(np.float32) * self.scales.astype(np.float32)[:, None]

    def take(self, counts: np.ndarray, spots: np.ndarray) -> "Rows":
        """The rows of ``spots`` (in that order), each spot owning ``counts[s]`` consecutive rows."""
        rows = segment_rows(counts, spots)
        return Rows(self.codes[rows], self.scales[rows])


def segment_rows(counts: np.ndarray, spots: np.ndarray) -> np.ndarray:
    """Row numbers of the segments ``spots`` of a concatenation with segment lengths ``counts``."""
    counts = np.asarray(counts, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])[:-1][spots]
    lengths = counts[spots]
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + offsets


@dataclass(frozen=True)
class PublicParams:
    """One index version's public document, parsed (see the module docstring)."""

    version: str
    ids: np.ndarray                   # str [n], sorted
    columns: dict[str, np.ndarray]    # COLUMNS, each [n]
    blocks: dict[str, Rows]           # BLOCKS
    basis: np.ndarray | None          # float16 [D, dim], None without a codec
    settings: dict[str, Any] = field(default_factory=dict)  # GLOBALS
    coverage: np.ndarray | None = None  # float16 [codec.coverage_dim, D]; None: the basis' row space

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_cells(self) -> int:
        return int(self.settings["n_cells"])

    @property
    def spread(self) -> dict[str, float]:
        return {str(k): float(v) for k, v in dict(self.settings.get("spread") or {}).items()}

    @property
    def coverage_space(self) -> np.ndarray | None:
        """The rows a photo's coverage is measured in: the coverage basis when the document
        sends one, else the codec basis (None without a codec)."""
        return self.coverage if self.coverage is not None else self.basis

    @property
    def popularity(self) -> np.ndarray:
        """Each spot's share of the gallery's photos (a tiny floor: every spot can be drawn)."""
        counts = self.columns["photos"].astype(np.float64) + 1e-12
        return counts / counts.sum()

    def spot_of(self, block: str) -> np.ndarray:
        """The spot row owning each row of ``block``."""
        counts = self.columns[BLOCKS[block]].astype(np.int64)
        return np.repeat(np.arange(len(self.ids)), counts)

    def anchors(self) -> tuple[Rows, np.ndarray]:
        """The dummies' looks per spot: the published looks, or the prototypes when there are none."""
        block = "looks" if int(self.columns["n_looks"].sum()) else "prototypes"
        return self.blocks[block], self.columns[BLOCKS[block]].astype(np.int64)

    @cached_property
    def digest(self) -> str:
        """sha256 of the canonical form: globals as sorted JSON, then every array's dtype, shape and bytes.

        Content only: the server's ``version`` label is not part of it (two phones holding the same
        content hold the same digest, whatever label each was given)."""
        h = hashlib.sha256(json.dumps({"format": FORMAT, **self.settings},
                                      sort_keys=True, separators=(",", ":")).encode())
        h.update(json.dumps(self.ids.tolist(), separators=(",", ":")).encode())
        arrays = [self.columns[c] for c in COLUMNS] + [a for b in BLOCKS for a in (self.blocks[b].codes,
                                                                                   self.blocks[b].scales)]
        for array in arrays + [a for a in (self.basis, self.coverage) if a is not None]:
            h.update(f"{array.dtype.str}{array.shape}".encode())
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()

    def spots_payload(self, rows: np.ndarray | None = None) -> dict[str, Any]:
        """The per-spot part (all spots, or ``rows``) as it travels."""
        rows = np.arange(len(self.ids)) if rows is None else np.asarray(rows, np.int64)
        out: dict[str, Any] = {"ids": self.ids[rows].tolist()}
        out.update({c: wire.encode_array(self.columns[c][rows]) for c in COLUMNS})
        for name, count in BLOCKS.items():
            part = self.blocks[name].take(self.columns[count], rows)
            out[name] = wire.encode_codes(part.codes, part.scales)
        return out

    def to_payload(self) -> dict[str, Any]:
        """The full document as ``GET /v1/public`` sends it (and the phone stores it)."""
        return {"format": FORMAT, "kind": "full", "index_version": self.version, "digest": self.digest,
                "globals": self._globals_payload(GLOBALS), "spots": self.spots_payload()}

    def _globals_payload(self, names: tuple[str, ...]) -> dict[str, Any]:
        out = {k: self.settings[k] for k in names if k in self.settings}
        if "codec" in names and self.basis is not None:
            out["basis"] = wire.encode_array(self.basis)
        if "codec" in names and self.coverage is not None:
            out["coverage_basis"] = wire.encode_array(self.coverage)
        return out


def parse(payload: Any) -> PublicParams:
    """A full document (``kind: full``), checked field by field; :class:`PublicError` otherwise."""
    try:
        if payload.get("format") != FORMAT or payload.get("kind") != "full":
            raise PublicError("not a full public document of format 1")
        settings, basis, cover = _globals(payload["globals"], {}, None, None)
        ids, columns, blocks = _spots(payload["spots"])
        doc = canonical(PublicParams(str(payload["index_version"]), ids, columns, blocks, basis, settings, cover))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PublicError(f"malformed public document: {exc}") from None
    return _checked(doc, payload)


def apply_delta(base: PublicParams, payload: Any) -> PublicParams:
    """``base`` with a delta (``kind: delta``) applied and its digest checked; :class:`PublicError` otherwise."""
    try:
        if payload.get("format") != FORMAT or payload.get("kind") != "delta":
            raise PublicError("not a public delta of format 1")
        if str(payload["base_digest"]) != base.digest:  # the digest the phone computed, not a label
            raise PublicError(f"the delta is from {str(payload['base_digest'])[:12]}..., "
                              f"the phone holds {base.digest[:12]}...")
        settings, basis, cover = _globals(payload["globals"], base.settings, base.basis, base.coverage)
        ids, columns, blocks = _spots(payload["spots"])
        removed = np.array([str(i) for i in payload["removed"]] + ids.tolist(), dtype=str)
        keep = np.flatnonzero(~np.isin(base.ids, removed))
        merged = PublicParams(
            str(payload["index_version"]), np.concatenate([base.ids[keep], ids]),
            {c: np.concatenate([base.columns[c][keep], columns[c]]) for c in COLUMNS},
            {b: _concat(base.blocks[b].take(base.columns[n], keep), blocks[b]) for b, n in BLOCKS.items()},
            basis, settings, cover)
        doc = canonical(merged)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PublicError(f"malformed public delta: {exc}") from None
    return _checked(doc, payload)


def _checked(doc: PublicParams, payload: Mapping[str, Any]) -> PublicParams:
    if len(np.unique(doc.ids)) != len(doc.ids):
        raise PublicError("spot ids repeat")
    if doc.digest != payload.get("digest"):
        raise PublicError("the document's digest does not match the server's")
    return doc


def _globals(obj: Mapping[str, Any], settings: Mapping[str, Any], basis: np.ndarray | None,
             cover: np.ndarray | None) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray | None]:
    """Globals sent (all of them in a full document, the changed ones in a delta) over ``settings``,
    with the codec and coverage bases (sent whenever ``codec`` is)."""
    out = {**settings, **{k: obj[k] for k in GLOBALS if k in obj}}
    if "codec" in obj:
        basis = _basis(obj["codec"], obj.get("basis"))
        cover = _coverage_basis(obj["codec"], obj.get("coverage_basis"), basis)
    if set(out) != set(GLOBALS) or not isinstance(out["n_cells"], int) or not isinstance(out["spread"], dict):
        raise PublicError(f"the document needs globals {', '.join(GLOBALS)}")
    return out, basis, cover


def _basis(codec: Mapping[str, Any], array: Any) -> np.ndarray | None:
    """The codec basis the document declares (``codec.kind``: one of :data:`CODEC_KINDS`, or "none"),
    checked: a finite float16 ``[dim, D]`` matrix, ``dim`` as declared and at most ``D``, of full
    rank (a degenerate basis would fold distinct photos onto one vector before any comparison)."""
    kind = codec.get("kind")
    if kind == "none":
        return None
    if kind not in CODEC_KINDS:
        raise PublicError(f"unknown codec kind {kind!r}")
    basis = wire.decode_array(array, "float16")
    if basis.ndim != 2 or basis.shape[0] != codec.get("dim") or not 0 < basis.shape[0] <= basis.shape[1]:
        raise PublicError(f"the codec basis must be a [dim, D] matrix with dim {codec.get('dim')} <= D")
    if not np.isfinite(basis).all():
        raise PublicError("the codec basis must be finite")
    singular = np.linalg.svd(basis.astype(np.float64), compute_uv=False)
    if singular[-1] <= MIN_BASIS_CONDITION * singular[0]:
        raise PublicError("the codec basis is degenerate (not of full rank)")
    return basis


def _coverage_basis(codec: Mapping[str, Any], array: Any, basis: np.ndarray | None) -> np.ndarray | None:
    """The coverage basis the codec declares (``codec.coverage_dim``; None when it declares none),
    checked: a float16 ``[coverage_dim, D]`` matrix beside a ``[dim, D]`` codec basis, with
    orthonormal rows (to float16's precision), since a coverage is a length inside its row space."""
    if "coverage_dim" not in codec:
        return None
    dim = codec["coverage_dim"]
    if basis is None or not isinstance(dim, int) or isinstance(dim, bool):
        raise PublicError("a coverage basis needs a codec basis and an integer coverage_dim")
    cover = wire.decode_array(array, "float16")
    if cover.ndim != 2 or cover.shape != (dim, basis.shape[1]) or not 0 < dim <= basis.shape[1]:
        raise PublicError(f"the coverage basis must be a [{dim}, {basis.shape[1]}] matrix")
    gram = cover.astype(np.float64) @ cover.T.astype(np.float64)
    if not np.isfinite(gram).all() or np.abs(gram - np.eye(dim)).max() > COVERAGE_TOLERANCE:
        raise PublicError("the coverage basis' rows must be orthonormal")
    return cover


def _spots(obj: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Rows]]:
    ids = np.array([str(i) for i in obj["ids"]], dtype=str)
    columns = {c: wire.decode_array(obj[c], dtypes) for c, dtypes in COLUMNS.items()}
    if any(a.shape != ids.shape for a in columns.values()):
        raise PublicError("every spot column needs one value per id")
    if np.isinf(columns["lat"]).any() or np.isinf(columns["lon"]).any():
        raise PublicError("coordinates must be finite or NaN (unknown)")
    blocks = {}
    for name, count in BLOCKS.items():
        codes = wire.decode_array(obj[name], "int8")
        scales = wire.decode_array(obj[name]["scale"], "float16")
        if codes.ndim != 2 or scales.shape != codes.shape[:1] or int(columns[count].astype(np.int64).sum()) != len(codes):
            raise PublicError(f"{name}: rows do not match {count}")
        if not np.isfinite(scales).all():
            raise PublicError(f"{name}: scales must be finite")
        blocks[name] = Rows(codes, scales)
    return ids, columns, blocks


def _concat(a: Rows, b: Rows) -> Rows:
    dim = a.codes.shape[1] if len(a.codes) else b.codes.shape[1]
    return Rows(np.concatenate([a.codes.reshape(-1, dim), b.codes.reshape(-1, dim)]),
                np.concatenate([a.scales, b.scales]))


def canonical(doc: PublicParams) -> PublicParams:
    """``doc`` in the canonical row order: by spot id."""
    order = np.argsort(doc.ids, kind="stable")
    if np.array_equal(order, np.arange(len(order))):
        return doc
    return replace(doc, ids=doc.ids[order], columns={c: a[order] for c, a in doc.columns.items()},
                   blocks={b: doc.blocks[b].take(doc.columns[n], order) for b, n in BLOCKS.items()})


class PublicStore:
    """The phone's copy of one server's public document: one gzip JSON file, private, written whole.

    An unreadable or corrupt file is ignored (the next download replaces it). Beside the
    document it records whether the document passed the consistency check (its digest
    was the shared one when it arrived), so a kept copy needs no network to be used.
    """

    def __init__(self, path: Path | None):
        self.path = path

    def load(self) -> PublicParams | None:
        return self.load_checked()[0]

    def load_checked(self) -> tuple[PublicParams | None, bool]:
        """(the kept document or None, whether it passed the consistency check when it arrived)."""
        if self.path is None or not self.path.exists():
            return None, False
        try:
            payload = json.loads(gzip.decompress(self.path.read_bytes()))
            return parse(payload), payload.get("view_checked") is True
        except (OSError, EOFError, zlib.error, ValueError, AttributeError, PublicError) as exc:
            log.warning("ignoring the unreadable public document %s (%s)", self.path, exc)
            return None, False

    def save(self, doc: PublicParams, checked: bool = False) -> None:
        if self.path is not None:
            payload = {**doc.to_payload(), **({"view_checked": True} if checked else {})}
            data = json.dumps(payload, separators=(",", ":")).encode()
            write_private(self.path, gzip.compress(data, compresslevel=6, mtime=0))

    def clear(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
