"""The public structure of one index version, derived at build time and stored in it.

Besides the features, answering and the private transforms need: the PCA
codec's basis, each spot's looks (the representative features a candidate
carries), its prototypes (what the phone chooses cells with), the balanced
cells and the open-set calibration scores. All are deterministic functions of
the gallery; looks, prototypes and calibration are worked out in the codec's
space (where the phone compares), cells on the spots' full-dimension means.
Deriving them for 100,000 spots takes minutes, so index builds and updates
store them in the version folder (``structure.npz``) and a server start only
loads them. An update derives from the previous version's structure: the
basis stays, spots with the same photos keep their looks and prototypes, and
cells change only where spots came or went (:func:`cells.update_cells`), so a
phone's update is small.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from edge_client.errors import ConfigError
from edge_client.privacy.recognizer import subspace
from edge_client.protocol import nibbles
from edge_client.vision.extractor import l2_normalize

from . import calibration, cells, whitening
from .codec import PCACodec

log = logging.getLogger(__name__)

FILE = "structure.npz"
FORMAT = 1
#: Dimensions of the PCA subspace a learned whitening publishes beside it for the photos' coverage.
#: A whitening's own row space favours directions photos of one spot share, however faint, so a
#: photo of another domain lies in it about as much as a gallery photo; the gallery's top principal
#: directions tell them apart (wa-landmarks' tuning split against ie-tower photos, AUROC of the
#: coverage alone: row space 0.70, PCA 8/32/128 dimensions 0.945/0.946/0.953; ie-tower against
#: wa-landmarks 0.54 and 0.996/0.997/0.999). 32 dimensions cost ~110 kB in the public document.
COVERAGE_DIM = 32
#: Rows projected into the codec space at once (bounded memory on a 1M-photo gallery).
CHUNK = 65536


@dataclass(frozen=True)
class StructureParams:
    """The server settings the structure depends on (a change means a new derivation)."""

    codec_dim: int = 128            # codec dimensions; 0 = no codec, full float16 features
    features_per_spot: int = 8      # looks per spot (what a candidate carries)
    prototypes_per_spot: int = 3    # public prototypes per spot (what the phone chooses cells with)
    cell_min_spots: int = 16        # every public cell holds at least this many spots
    structure_seed: int = 0         # the k-means starts (structures before it was stored used 0)
    codec_kind: str = "learned-whitening"  # the codec basis: "pca" or "learned-whitening" (see CODEC_KINDS)
    # Bits of a candidate's look codes (8 or 4, see LOOK_BITS). The looks are the same either way: the
    # calibration depends on it, since it scores looks as the phone decodes them.
    look_bits: int = 4

    @classmethod
    def from_config(cls, config: Any) -> "StructureParams":
        """The parameters of a :class:`lite_server.config.ServerConfig` (or anything with those fields)."""
        values: dict[str, Any] = {name: int(getattr(config, name)) for name in asdict(cls()) if name != "codec_kind"}
        negative = sorted(name for name, value in values.items() if value < 0)
        if negative:
            raise ConfigError(f"{', '.join(negative)} must not be negative")
        kind = str(getattr(config, "codec_kind", cls.codec_kind))
        if kind not in CODEC_KINDS:
            raise ConfigError(f"codec_kind must be one of {', '.join(CODEC_KINDS)}, got {kind!r}")
        if values["look_bits"] not in LOOK_BITS:
            raise ConfigError(f"look_bits must be one of {', '.join(map(str, LOOK_BITS))}, got {values['look_bits']}")
        if values["look_bits"] == 4 and values["codec_dim"] and not nibbles.fits(values["codec_dim"]):
            raise ConfigError(f"look_bits 4 needs a codec of a power-of-two codec_dim, got {values['codec_dim']}")
        return cls(**values, codec_kind=kind)


#: The codec bases a server can derive: the gallery's learned whitening (the default: the user answers
#: better than on the raw feature) or the uncentred PCA of its features (docs/privacy.md#the-codec-space).
CODEC_KINDS = ("pca", whitening.KIND)
#: The look codes a server can send: int8, or the wire's int4 (edge_client.protocol.nibbles).
LOOK_BITS = (8, 4)


@dataclass(frozen=True)
class Structure:
    """Everything public about one index version except the spots' own fields."""

    params: StructureParams
    spot_ids: np.ndarray        # str [n_spots], the spots it was derived for, in index order
    spot_photos: np.ndarray     # int64 [n_spots]: photos per spot (an update reuses unchanged spots)
    basis: np.ndarray | None    # float32 [codec_dim, dim], float16-exact; None without a codec
    looks: np.ndarray           # float32 [L, D]: unit vectors in the codec space, by spot
    look_spot: np.ndarray       # int64 [L]
    prototypes: np.ndarray      # float32 [P, D]
    prototype_spot: np.ndarray  # int64 [P]
    spot_cell: np.ndarray       # int64 [n_spots]
    scores: np.ndarray          # float32: leave-one-out evidence of correct answers (calibration)
    # float16 [n_spots, dim]: each spot's normalised mean photo, full dimension. Not public: an
    # update takes unchanged spots' means from here instead of reading every photo again.
    # Loaded only when asked (Structure.load(..., means=True)); None in older versions.
    means: np.ndarray | None = None
    # float32 [COVERAGE_DIM, dim], float16-exact: the subspace a photo's coverage is measured in when
    # the codec basis' own row space does not say where the gallery lies (a learned whitening); None
    # when the codec basis says it (PCA) or without a codec.
    coverage_basis: np.ndarray | None = None

    def matches(self, spot_ids: list[str], params: StructureParams) -> bool:
        """Whether this structure was derived for these spots with these parameters (and, for a
        learned whitening, has its coverage basis: one stored before it had one is derived again)."""
        wants_cover = _needs_coverage_basis(params)
        return self.params == params and list(self.spot_ids) == list(spot_ids) \
            and (self.coverage_basis is not None) == wants_cover

    def save(self, folder: Path) -> None:
        """Write ``folder/structure.npz`` (the caller makes the folder durable and atomic)."""
        arrays = {k: v for k, v in self.__dict__.items() if k != "params" and v is not None}
        header = {"format": FORMAT, "params": asdict(self.params)}
        with open(folder / FILE, "wb") as handle:
            np.savez(handle, header=np.array(json.dumps(header)), **arrays)
            handle.flush()
            os.fsync(handle.fileno())

    @classmethod
    def load(cls, folder: Path, means: bool = False) -> "Structure | None":
        """The structure stored in ``folder``, or None when there is none of this format;
        the spots' means (large: 256 MB at 100,000 spots) only with ``means``."""
        try:
            with np.load(folder / FILE, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                if header.get("format") != FORMAT:
                    return None
                arrays = {k: data[k] for k in data.files if k != "header" and (means or k != "means")}
            # Structures stored before the codec had a kind were all PCA, before looks had bits all int8.
            params = StructureParams(**{"codec_kind": "pca", "look_bits": 8, **header["params"]})
            return cls(params=params, basis=arrays.pop("basis", None), **arrays)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("ignoring the stored structure in %s: %s", folder, exc)
            return None


def derive(features: np.ndarray, photo_spot: np.ndarray, spot_ids: list[str],
           params: StructureParams = StructureParams(), previous: Structure | None = None) -> Structure:
    """The structure of a gallery; with ``previous`` (the last version's, its means loaded), an update of it."""
    n_spots = len(spot_ids)
    if previous is not None and previous.params != params:
        previous = None  # other settings: nothing carries over
    groups = cells.sample_groups(cells.spot_groups(photo_spot, n_spots))
    picks = calibration.sample(np.array([len(g) for g in groups]))
    held = np.array([groups[s][i] for s, i in picks], np.int64)  # the calibration's photos
    huge = features.shape[0] > whitening.SAMPLE  # fitted on a sample of spots: it can leave them out for free
    basis = previous.basis if previous is not None else _fit_basis(features, photo_spot, params, held if huge else None)
    cover = previous.coverage_basis if previous is not None else _fit_coverage(features, params)
    photos = np.bincount(photo_spot, minlength=n_spots).astype(np.int64)
    before = _previous_rows(spot_ids, previous)
    # Updates only add photos to spots or remove whole spots: the same count means the same photos.
    reused = np.where((before >= 0) & (previous.spot_photos[np.maximum(before, 0)] == photos), before, -1) \
        if previous is not None else before
    vectors, coverage, local, means = _project_needed(features, groups, basis, cover, reused, previous, picks)
    seed = params.structure_seed
    looks, look_spot = _per_spot(vectors, local, params.features_per_spot, reused, previous, "look", seed)
    protos, proto_spot = _per_spot(vectors, local, params.prototypes_per_spot, reused, previous, "prototype", seed)
    if previous is not None and n_spots:  # spots that gained photos keep their cell too
        kept = np.where(before >= 0, previous.spot_cell[np.maximum(before, 0)], -1)
        spot_cell = cells.update_cells(means, kept, params.cell_min_spots, seed)
    else:
        spot_cell = cells.balanced_cells(means, params.cell_min_spots, seed) if n_spots else np.zeros(0, np.int64)
    fresh_fit = previous is None and not huge and params.codec_kind == whitening.KIND and basis is not None
    scores = _calibration_scores(features, photo_spot, groups, picks, params, held, cover) if fresh_fit else \
        calibration.leave_one_out_scores(vectors, local, coverage, looks, look_spot, params.features_per_spot,
                                         codes(basis, params.look_bits), picks)
    return Structure(params, np.asarray(spot_ids, dtype=str), photos, basis, looks, look_spot,
                     protos, proto_spot, spot_cell.astype(np.int64), scores, means.astype(np.float16), cover)


def _project_needed(features: np.ndarray, groups: list[np.ndarray], basis: np.ndarray | None,
                    cover: np.ndarray | None, reused: np.ndarray, previous: Structure | None,
                    picks: np.ndarray) -> "Projected":
    """:func:`project` of every spot; for an update whose previous version stored its means,
    only of the spots it must read (new or grown spots, and the calibration's ``picks``), the
    others' means coming from there: a 1% update of 100,000 spots reads ~2% of the photos.
    Spots not read have no rows in ``groups`` of the result (nothing asks for them)."""
    if previous is None or previous.means is None or len(previous.means) != len(previous.spot_ids):
        return project(features, groups, basis, cover)
    read = np.zeros(len(groups), bool)
    read[reused < 0] = True
    read[picks[:, 0]] = True
    chosen = np.flatnonzero(read)
    part = project(features, [groups[s] for s in chosen], basis, cover)
    local = [np.zeros(0, np.int64)] * len(groups)
    for spot, rows in zip(chosen.tolist(), part.groups):
        local[spot] = rows
    means = np.empty((len(groups), part.means.shape[1]), np.float32)
    carried = reused >= 0  # float16 as stored: what every later update of them will read too
    means[carried] = previous.means[reused[carried]]
    means[~carried] = part.means[np.searchsorted(chosen, np.flatnonzero(~carried))]
    return Projected(part.vectors, part.coverage, local, means)


def _fit_basis(features: np.ndarray, photo_spot: np.ndarray, params: StructureParams,
               exclude: np.ndarray | None = None) -> np.ndarray | None:
    """The codec basis of ``params.codec_kind``, learnt from the gallery (its features and, for the
    learned whitening, its spot labels, but for the photo rows ``exclude``) and nothing else; None
    without a codec."""
    if not params.codec_dim or not len(features):
        return None
    if params.codec_kind == whitening.KIND:
        return whitening.fit(features, photo_spot, params.codec_dim, exclude=exclude)
    return PCACodec(params.codec_dim).fit(features).basis_


def _needs_coverage_basis(params: StructureParams) -> bool:
    """Whether a structure of ``params`` publishes a coverage basis (see :data:`COVERAGE_DIM`)."""
    return bool(params.codec_dim) and params.codec_kind == whitening.KIND


def _fit_coverage(features: np.ndarray, params: StructureParams) -> np.ndarray | None:
    """The gallery's top :data:`COVERAGE_DIM` uncentred principal directions when the codec basis
    needs them beside it (:func:`_needs_coverage_basis`), else None."""
    if not _needs_coverage_basis(params) or not len(features):
        return None
    return PCACodec(min(COVERAGE_DIM, features.shape[1])).fit(features).basis_


def _calibration_scores(features: np.ndarray, photo_spot: np.ndarray, groups: list[np.ndarray], picks: np.ndarray,
                        params: StructureParams, held: np.ndarray, cover: np.ndarray | None) -> np.ndarray:
    """The open-set calibration of a learned whitening, scored in whitenings fitted without the
    photos they score (``held``, the rows of ``picks``). The published one learnt those very photos'
    spread around their spot, so left out they still sat closer to it than a new photo does:
    calibrated in it, the phone kept 0.90 and 0.82 of correct answers on the tuning splits
    (wa-landmarks, ie-tower) for 0.95 asked, and 7 of 21 on a 24-spot catalogue. Cross-fitted in
    folds of at most half the gallery each (one fold but on a small gallery, whose calibration
    photos are most of it). Costs a projection and k-means of the gallery per fold, which only
    galleries small enough to be fitted whole pay (a huge one's basis is fitted on a sample that
    leaves these photos out)."""
    folds = max(1, -(-2 * len(held) // max(1, features.shape[0])))
    rows = [_fold_scores(features, photo_spot, groups, picks[f::folds], held[f::folds], params, cover)
            for f in range(folds)]
    return np.concatenate(rows) if rows else np.zeros((0, 5), np.float32)


def _fold_scores(features: np.ndarray, photo_spot: np.ndarray, groups: list[np.ndarray], picks: np.ndarray,
                 held: np.ndarray, params: StructureParams, cover: np.ndarray | None) -> np.ndarray:
    """The calibration rows of ``picks`` (photos ``held``) in a whitening, and a coverage basis,
    fitted without them (on a small gallery 32 principal directions fit its own photos closely)."""
    basis = _fit_basis(features, photo_spot, params, held)
    if cover is not None:
        cover = _fit_coverage(np.delete(np.asarray(features), held, axis=0), params)
    vectors, coverage, local, _ = project(features, groups, basis, cover)
    fresh = np.full(len(groups), -1, np.int64)
    looks, look_spot = _per_spot(vectors, local, params.features_per_spot, fresh, None, "look", params.structure_seed)
    return calibration.leave_one_out_scores(vectors, local, coverage, looks, look_spot, params.features_per_spot,
                                            codes(basis, params.look_bits), picks)


class Projected(NamedTuple):
    """A gallery's sampled photos as :func:`derive` works on them."""

    vectors: np.ndarray         # float32 [R, D]: unit photo vectors in the codec space
    coverage: np.ndarray        # float32 [R]: length of each unit photo inside the coverage subspace
    groups: list[np.ndarray]    # each spot's rows of ``vectors``
    means: np.ndarray           # float32 [n_spots, dim]: each spot's normalised mean photo, full dimension


def project(features: np.ndarray, groups: list[np.ndarray], basis: np.ndarray | None,
            cover: np.ndarray | None = None) -> Projected:
    """The photos ``groups`` name, read once in chunks: into the codec space (where the phone
    compares, so looks and prototypes are learnt there) and, for the cells, their spot means
    in the full dimension (cells group spots that look alike in every respect). Coverage is
    measured in ``cover``'s row space when given, else in the basis'."""
    rows = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    dim = basis.shape[0] if basis is not None else features.shape[1]
    span = subspace(cover if cover is not None else basis) if basis is not None else None
    vectors = np.zeros((len(rows), dim), np.float32)
    coverage = np.ones(len(rows), np.float32)
    sums = np.zeros((len(groups), features.shape[1]), np.float64)
    for start in range(0, len(rows), CHUNK):
        photos = l2_normalize(cells.spot_photos(features, rows[start:start + CHUNK]))
        spots = owner[start:start + len(photos)]  # increasing: a chunk covers a run of spots
        sums[spots[0]:spots[-1] + 1] += cells.group_sums(photos, spots - spots[0], int(spots[-1] - spots[0]) + 1)
        if basis is not None:
            coverage[start:start + len(photos)] = np.linalg.norm(photos @ span.T, axis=1)
            photos = photos @ basis.T
        vectors[start:start + len(photos)] = l2_normalize(photos)
    bounds = np.cumsum([0] + [len(g) for g in groups])
    local = [np.arange(bounds[s], bounds[s + 1]) for s in range(len(groups))]
    return Projected(vectors, coverage, local, l2_normalize(sums.astype(np.float32)))


def codes(basis: np.ndarray | None, look_bits: int = 8) -> calibration.Quantizer:
    """What a look of the codec space becomes on the wire and back: int8 codes with a codec
    (int4 with ``look_bits`` 4), float16 without (see :meth:`lite_server.search.lookup.Lookup.look_dtype`):
    the calibration scores looks as the phone decodes them."""
    from edge_client.protocol import wire

    dtype = ("int4" if look_bits == 4 else "int8") if basis is not None else "float16"

    def roundtrip(vectors: np.ndarray) -> np.ndarray:  # in chunks: wire bounds what one message holds
        parts = [wire.decode(wire.encode(vectors[i:i + CHUNK], dtype)) for i in range(0, len(vectors), CHUNK)]
        return np.concatenate(parts).reshape(vectors.shape) if parts else vectors
    return roundtrip


def _previous_rows(spot_ids: list[str], previous: Structure | None) -> np.ndarray:
    """Each spot's row in ``previous`` (-1 for a spot it did not have)."""
    if previous is None:
        return np.full(len(spot_ids), -1, np.int64)
    before = {spot: row for row, spot in enumerate(previous.spot_ids.tolist())}
    return np.array([before.get(s, -1) for s in spot_ids], np.int64)


def _per_spot(vectors: np.ndarray, local: list[np.ndarray], m: int, reused: np.ndarray,
              previous: Structure | None, kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``m`` centres per spot: carried over from ``previous`` for reused spots,
    k-means for the others; rows ordered by spot."""
    fresh = np.flatnonzero(reused < 0)
    centres, owner = cells.prototypes(vectors, [local[s] for s in fresh], m, seed)
    parts, owners = [centres], [fresh[owner]]
    if previous is not None and (reused >= 0).any():
        old_vectors = previous.looks if kind == "look" else previous.prototypes
        old_owner = previous.look_spot if kind == "look" else previous.prototype_spot
        new_row = np.full(len(previous.spot_ids), -1, np.int64)
        new_row[reused[reused >= 0]] = np.flatnonzero(reused >= 0)
        carried = new_row[old_owner] >= 0
        parts.append(old_vectors[carried])
        owners.append(new_row[old_owner[carried]])
    owner_all = np.concatenate(owners)
    order = np.argsort(owner_all, kind="stable")
    return np.concatenate(parts)[order], owner_all[order]
