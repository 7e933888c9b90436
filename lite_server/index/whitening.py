"""Learned whitening: a codec basis learnt from the gallery's own spot labels.

Radenovic et al.'s learned whitening: the gallery's unit photos are whitened by
the *within-spot* covariance (how photos of one spot differ: light, angle,
crowds), shrunk toward the identity so that directions seen in few photos are
not blown up, and rotated onto the top directions of the whitened *between-spot*
scatter (how spots differ, centred). The result is one ``[dim, D]`` matrix the phone
uses exactly as it uses the PCA basis (project, then L2-normalise), so the
codec, prototypes, looks, cells and the open-set calibration all live in it.

Learnt from the server's gallery and labels only (nothing a phone sends), and
from a sample of spots on a huge gallery, so a 100,000-spot catalogue fits in
seconds. Spots of one photo add nothing to the within-spot scatter (they have no
variation to show) but their photo still counts in the between-spot scatter.
"""
from __future__ import annotations

import logging

import numpy as np
from scipy import sparse

from .codec import PCACodec

log = logging.getLogger(__name__)

KIND = "learned-whitening"
#: Shrinkage of the within-spot covariance toward the identity scaled by its mean eigenvalue. On the
#: gallery-only tuning splits (rerank over every spot, 8 looks, the phone's soft maximum) 0.1, 0.2,
#: 0.3, 0.5 gave 0.743, 0.743, 0.762, 0.773 on wa-landmarks and 0.504, 0.502, 0.493, 0.498 on ie-tower
#: (PCA: 0.772, 0.398); end to end on wa-landmarks' tuning split 0.3 -> 0.5 took the user from 0.762 to 0.772.
SHRINK = 0.5
#: Dimensions of the (uncentred) PCA subspace the whitening is learnt in; 0 = the full feature.
#: Learnt inside the codec's own 128-d PCA subspace, a photo's coverage would keep its meaning, but
#: the rerank's ceiling fell (tuning splits, as for SHRINK: ie-tower 0.498 full, 0.463 in 256
#: dimensions, 0.413 in 128; wa-landmarks 0.773, 0.773, 0.760); the full feature it is, and the open
#: set leans on the score (see ``lite_server.index.calibration.COVERAGE_RATIOS``).
PRE_DIM = 0
#: Photos the basis is learnt from on a huge gallery (whole spots, drawn at random).
SAMPLE = 20000


def fit(features: np.ndarray, photo_spot: np.ndarray, dim: int, shrink: float = SHRINK,
        pre_dim: int = PRE_DIM, sample: int = SAMPLE, seed: int = 0, exclude: np.ndarray | None = None) -> np.ndarray:
    """The ``[dim, D]`` whitening basis (float32, float16-exact) of gallery ``features`` labelled by
    ``photo_spot``, but for the photo rows ``exclude`` (see ``structure._calibration_scores``); rows
    scaled to unit mean length, so float16 keeps them as well as a PCA basis."""
    rows = _sampled_rows(np.asarray(photo_spot, np.int64), sample, seed)
    if exclude is not None and len(exclude):
        rows = np.setdiff1d(rows, exclude)
    x = _unit(np.asarray(features[rows], np.float32))
    labels = np.unique(np.asarray(photo_spot)[rows], return_inverse=True)[1]
    pre = min(pre_dim or x.shape[1], x.shape[1])
    reduce = PCACodec(max(dim, pre)).fit(x, sample=len(x)).basis_.astype(np.float64) if pre < x.shape[1] else None
    z = x.astype(np.float64) if reduce is None else x.astype(np.float64) @ reduce.T
    whiten = _within_whitening(z, labels, shrink)
    means = _group_means(z, labels) @ whiten.T
    # The rotation is learnt on *centred* spot means, the projection stays uncentred (the phone only
    # multiplies): uncentred, the top direction was the gallery's mean, which every photo shares, so it
    # squeezed all cosines together (wa-landmarks' tuning split, rerank top-1 0.685 against 0.743).
    means -= means.mean(axis=0)
    _, vectors = np.linalg.eigh(means.T @ means)
    basis = vectors[:, ::-1][:, :dim].T @ whiten
    basis = basis if reduce is None else basis @ reduce
    basis /= np.sqrt(np.mean(np.sum(basis ** 2, axis=1)))
    return basis.astype(np.float16).astype(np.float32)


def _sampled_rows(photo_spot: np.ndarray, sample: int, seed: int) -> np.ndarray:
    """All photos, or whole spots drawn at random until ``sample`` photos (within-spot scatter needs whole spots)."""
    if len(photo_spot) <= sample:
        return np.arange(len(photo_spot))
    spots = np.unique(photo_spot)
    order = np.random.default_rng(seed).permutation(spots)
    counts = np.bincount(photo_spot)[order]
    chosen = order[: max(1, int(np.searchsorted(np.cumsum(counts), sample, side="right")))]
    return np.flatnonzero(np.isin(photo_spot, chosen))


def _within_whitening(z: np.ndarray, labels: np.ndarray, shrink: float) -> np.ndarray:
    """``C^-1/2`` of the within-spot covariance ``C`` (spots with two photos or more), shrunk toward
    ``mean eigenvalue * I``; the identity when no spot has two photos."""
    counts = np.bincount(labels)
    several = counts[labels] > 1
    if not several.any():
        log.warning("no spot has two photos: the learned whitening has no within-spot scatter to learn")
        return np.eye(z.shape[1])
    residual = (z[several] - _group_means(z, labels)[labels[several]]).astype(np.float32)
    cov = (residual.T @ residual).astype(np.float64) / len(residual)  # float32: the one big product
    cov = (1 - shrink) * cov + shrink * (np.trace(cov) / len(cov)) * np.eye(len(cov))
    values, vectors = np.linalg.eigh(cov)
    return (vectors / np.sqrt(np.maximum(values, 1e-12))).T


def _group_means(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each label's mean row (a sparse product: np.add.at is many times slower)."""
    n = int(labels.max()) + 1
    member = sparse.csr_matrix((np.ones(len(labels)), (labels, np.arange(len(labels)))), shape=(n, len(labels)))
    return np.asarray(member @ z) / np.bincount(labels, minlength=n)[:, None]


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
