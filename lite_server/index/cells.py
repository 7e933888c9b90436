"""Public structure for the private transforms: spot prototypes and balanced cells.

- Prototypes: a few k-means centres of each spot's gallery features (its
  looks), used as the candidates' representative features and, published,
  to let the phone choose its cells and draw plausible decoys.
- Cells: a balanced clustering of the spots' mean features. Every cell holds
  at least ``min_spots`` spots, so a query naming a cell points at a crowd of
  look-alike spots rather than one.

Both are computed from at most ``SAMPLE_PER_SPOT`` photos of a spot (a fixed
random subset), so deriving them costs the same for a 1M-photo gallery as
for a 100k one. Both scale to national catalogues: the per-spot k-means runs
batched over every spot with the same number of photos, and the cells are
found block by block (a balanced bisection splits the spots into blocks of
at most ``BLOCK_CELLS`` cells, then capacitated k-means runs in each block),
so 100,000 spots cost about what 100,000 / 640 small clusterings cost.
"""
from __future__ import annotations

import numpy as np

from edge_client.vision.extractor import l2_normalize

from ..search.backends import release_pages

SAMPLE_PER_SPOT = 512
#: Capacitated k-means runs on at most this many cells at once; catalogues of up to
#: ``BLOCK_CELLS * min_spots`` spots (640 with the default 10) are one block.
BLOCK_CELLS = 64
#: Spots x photos x dims held at once by the batched k-means (float32 elements, ~64 MB).
BATCH_ELEMENTS = 1 << 24
#: New spots matched against every cell centre at once in an update.
NEAREST_CHUNK = 4096
#: How many nearby cells with a spot to spare a short cell looks at (the nearest by centre).
REFILL_NEIGHBOURS = 8
#: Spots a bisection fits its two poles on (see ``_bisect``).
BISECT_SAMPLE = 4096


def spot_groups(photo_spot: np.ndarray, n_spots: int) -> list[np.ndarray]:
    """Photo rows of every spot, in spot order (one argsort, no per-photo loop)."""
    order = np.argsort(photo_spot, kind="stable")
    bounds = np.searchsorted(photo_spot[order], np.arange(n_spots + 1))
    return [order[bounds[s]:bounds[s + 1]] for s in range(n_spots)]


def sample_groups(groups: list[np.ndarray], cap: int = SAMPLE_PER_SPOT, seed: int = 0) -> list[np.ndarray]:
    """Each group's rows, or a fixed random ``cap`` of them in increasing order."""
    rng = np.random.default_rng(seed)
    return [rows if len(rows) <= cap else np.sort(rng.choice(rows, cap, replace=False)) for rows in groups]


def spot_photos(features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``features[rows]`` as float32; pages of a mapped gallery leave the resident set again."""
    photos = np.asarray(features[rows], np.float32)
    release_pages(features)
    return photos


def prototypes(vectors: np.ndarray, groups: list[np.ndarray], m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(unit centres [P, dim], owning spot [P]): up to ``m`` k-means centres of each
    spot's unit ``vectors[rows]``, the heaviest (most photos) first.

    A spot with ``m`` photos or fewer is represented by its photos. Spots with the
    same number of photos are clustered together in one batched k-means.
    """
    centres: list[np.ndarray | None] = [None] * len(groups)
    sizes = np.array([len(rows) for rows in groups])
    for n in np.unique(sizes):
        spots = np.flatnonzero(sizes == n)
        if n <= m:
            for spot in spots:
                centres[spot] = np.asarray(vectors[groups[spot]], np.float32)
            continue
        chunk = max(1, BATCH_ELEMENTS // int(n * vectors.shape[1]))
        for start in range(0, len(spots), chunk):
            part = spots[start:start + chunk]
            batch = np.stack([np.asarray(vectors[groups[s]], np.float32) for s in part])
            found = batched_kmeans(batch, m, np.random.default_rng([seed, int(n), start]))
            for spot, rows in zip(part, found):
                centres[spot] = rows
    dim = vectors.shape[1]
    stacked = [c if c is not None else np.zeros((0, dim), np.float32) for c in centres]
    owners = np.repeat(np.arange(len(groups)), [len(c) for c in stacked])
    return (np.concatenate(stacked) if stacked else np.zeros((0, dim), np.float32)), owners


def batched_kmeans(x: np.ndarray, m: int, rng: np.random.Generator, iterations: int = 10,
                   restarts: int = 3) -> np.ndarray:
    """Cosine k-means of many small sets at once: ``x`` is [sets, n, dim] of unit rows;
    returns [sets, m, dim] unit centres, each set's heaviest centre first.

    k-means++ seeding, a few Lloyd rounds and each set's best of ``restarts``
    runs: the per-set algorithm of :func:`spherical_kmeans`, vectorised over sets.
    """
    best, best_fit = x[:, :m].copy(), np.full(len(x), -np.inf)
    for _ in range(restarts):
        centres = _batched_lloyd(x, _batched_plus_plus(x, m, rng), iterations)
        fit = np.matmul(x, centres.transpose(0, 2, 1)).max(axis=2).sum(axis=1)
        better = fit > best_fit
        best[better], best_fit[better] = centres[better], fit[better]
    labels = np.matmul(x, best.transpose(0, 2, 1)).argmax(axis=2)
    weight = (labels[:, :, None] == np.arange(m)).sum(axis=1)
    order = np.argsort(-weight, axis=1, kind="stable")
    return np.take_along_axis(best, order[:, :, None], axis=1)


def _batched_plus_plus(x: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    sets, n, _ = x.shape
    every = np.arange(sets)
    chosen = [x[every, rng.integers(n, size=sets)]]
    distance = np.maximum(1.0 - np.einsum("snd,sd->sn", x, chosen[0]), 0.0)
    for j in range(1, m):
        weights = np.cumsum(distance ** 2, axis=1)
        target = rng.random(sets) * weights[:, -1]
        pick = np.minimum((weights < target[:, None]).sum(axis=1), n - 1)
        pick = np.where(weights[:, -1] > 0, pick, min(j, n - 1))  # all points on the centres
        chosen.append(x[every, pick])
        distance = np.minimum(distance, np.maximum(1.0 - np.einsum("snd,sd->sn", x, chosen[-1]), 0.0))
    return np.stack(chosen, axis=1)


def _batched_lloyd(x: np.ndarray, centres: np.ndarray, iterations: int) -> np.ndarray:
    m = centres.shape[1]
    for _ in range(iterations):
        labels = np.matmul(x, centres.transpose(0, 2, 1)).argmax(axis=2)
        members = (labels[:, :, None] == np.arange(m)).astype(x.dtype)  # [sets, n, m]
        sums = np.matmul(members.transpose(0, 2, 1), x)
        empty = members.sum(axis=1) == 0
        sums[empty] = centres[empty]  # an emptied centre stays where it was
        centres = l2_normalize(sums)
    return centres


def spherical_kmeans(vectors: np.ndarray, m: int, iterations: int = 10, restarts: int = 3,
                     seed: int = 0) -> np.ndarray:
    """``m`` unit centres of unit ``vectors`` (cosine k-means), deterministic for a seed.

    k-means++ seeding, a few Lloyd rounds and the best of ``restarts`` runs:
    plenty for the tens of photos a spot has, in microseconds where a general
    k-means library spends milliseconds per call.
    """
    rng = np.random.default_rng(seed)
    best, best_fit = vectors[:m], -np.inf
    for _ in range(restarts):
        centres = _lloyd(vectors, _plus_plus(vectors, m, rng), iterations)
        fit = float((vectors @ centres.T).max(axis=1).sum())
        if fit > best_fit:
            best, best_fit = centres, fit
    return best


def _plus_plus(vectors: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    chosen = [int(rng.integers(len(vectors)))]
    distance = np.maximum(1.0 - vectors @ vectors[chosen[0]], 0.0)
    while len(chosen) < m:
        weights = distance ** 2
        pick = int(rng.choice(len(vectors), p=weights / weights.sum())) if weights.sum() > 0 else len(chosen)
        chosen.append(pick)
        distance = np.minimum(distance, np.maximum(1.0 - vectors @ vectors[pick], 0.0))
    return vectors[chosen]


def _lloyd(vectors: np.ndarray, centres: np.ndarray, iterations: int) -> np.ndarray:
    for _ in range(iterations):
        labels = np.argmax(vectors @ centres.T, axis=1)
        members = labels == np.arange(len(centres))[:, None]  # one-hot: a product beats ufunc.at
        sums = members.astype(vectors.dtype) @ vectors
        empty = ~members.any(axis=1)
        sums[empty] = centres[empty]  # an emptied centre stays where it was
        centres = l2_normalize(sums)
    return centres


def balanced_cells(means: np.ndarray, min_spots: int, seed: int = 0, iterations: int = 20) -> np.ndarray:
    """The cell of every spot: balanced clusters of ``min_spots`` or more look-alike spots.

    ``n_cells = n_spots // min_spots``. A balanced bisection cuts the spots into
    blocks of at most :data:`BLOCK_CELLS` cells (each side gets spots in
    proportion to its cells); in each block, k-means with capacity assigns
    (spot, cell) pairs from the most similar, never over a cell's capacity,
    then moves the centres. Sizes end in {floor, ceil}(block spots / block cells).
    """
    n_cells = max(1, len(means) // max(1, min_spots))
    assign = np.zeros(len(means), np.int64)
    first = 0
    blocks = _blocks(means, np.arange(len(means)), n_cells, seed)
    # One block (up to 640 spots, the real datasets) starts from the best of 5 k-means runs; a
    # national catalogue's blocks from one each: on 10,000 synthetic spots that halved the cells'
    # time (9.8 -> 5.6 s) and left a spot's mean cosine to its cell centre at 0.9143 (0.9144).
    starts = 5 if len(blocks) == 1 else 1
    for rows, cells in blocks:
        assign[rows] = first + _capacitated_kmeans(means[rows], cells, min_spots, seed, iterations, starts)
        first += cells
    return assign


def _blocks(means: np.ndarray, rows: np.ndarray, cells: int, seed: int) -> list[tuple[np.ndarray, int]]:
    """(rows, cells) blocks of at most BLOCK_CELLS cells, look-alike spots together."""
    if cells <= BLOCK_CELLS:
        return [(rows, cells)]
    left_cells = cells // 2
    # floor: both sides keep at least min_spots spots per cell
    left, right = _bisect(means, rows, len(rows) * left_cells // cells, seed)
    return _blocks(means, left, left_cells, seed) + _blocks(means, right, cells - left_cells, seed)


def _bisect(means: np.ndarray, rows: np.ndarray, n_left: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` cut into two look-alike parts, the first of ``n_left`` rows: the spots
    ranked by how far they lean to one of two 2-means poles. The poles are fitted on at most
    :data:`BISECT_SAMPLE` of the spots (a fixed random subset): two directions need no
    100,000 spots, and fitting them on all took a fifth of that catalogue's derivation."""
    vectors = means[rows]
    fit_on = vectors if len(rows) <= BISECT_SAMPLE else \
        vectors[np.sort(np.random.default_rng(seed).choice(len(rows), BISECT_SAMPLE, replace=False))]
    poles = spherical_kmeans(fit_on, 2, seed=seed)
    order = np.argsort(-(vectors @ (poles[0] - poles[1])), kind="stable")
    return rows[order[:n_left]], rows[order[n_left:]]


def _capacitated_kmeans(means: np.ndarray, n_cells: int, min_spots: int, seed: int, iterations: int,
                        starts: int) -> np.ndarray:
    n_spots = len(means)
    centres = _kmeans_centres(means, n_cells, seed, starts)
    capacity = int(np.ceil(n_spots / n_cells))
    assign = np.zeros(n_spots, np.int64)
    for _ in range(iterations):
        similarity = means @ centres.T
        assign = _fill_small_cells(_capacitated_assign(similarity, capacity), similarity, min_spots)
        moved = cell_centres(means, assign, n_cells)
        if np.allclose(moved, centres, atol=1e-6):
            break
        centres = moved
    return assign


def _kmeans_centres(means: np.ndarray, n_cells: int, seed: int, starts: int) -> np.ndarray:
    """scikit-learn's k-means (best of ``starts`` runs) on one block's spot means: better starting cells
    than a spherical k-means here (measured on the real datasets' privacy). In float64:
    its float32 path upcasts distances chunk by chunk and took minutes on 1,000 spots."""
    from sklearn.cluster import KMeans

    if len(means) <= n_cells:
        return means
    # The same k-means in the coordinates of the means' own span (an orthonormal basis from a
    # QR): distances, and so the clustering, do not change, but a block of 640 spots has 640
    # dimensions rather than 1,280 (296 on wa-landmarks), and k-means costs half or less.
    basis, _ = np.linalg.qr(means.astype(np.float64).T)  # [dim, min(n, dim)]
    fitted = KMeans(n_cells, n_init=starts, random_state=seed).fit(means.astype(np.float64) @ basis)
    return fitted.cluster_centers_ @ basis.T


def cell_centres(means: np.ndarray, assign: np.ndarray, n_cells: int) -> np.ndarray:
    """The normalised mean of each cell's spot means (an empty cell's is zero)."""
    return l2_normalize(group_sums(np.asarray(means, np.float32), assign, n_cells))


def group_sums(rows: np.ndarray, owner: np.ndarray, n_groups: int) -> np.ndarray:
    """The sum of the ``rows`` of each group (row ``i`` belongs to ``owner[i]``; an empty group
    sums to zero), as a sparse one-hot product: np.add.at took a fifth of a national
    catalogue's derivation, and np.add.reduceat over rows is ~40x slower (65,536 x 1,280)."""
    from scipy.sparse import csr_matrix

    onehot = csr_matrix((np.ones(len(owner), rows.dtype), (owner, np.arange(len(owner)))), shape=(n_groups, len(owner)))
    return np.asarray(onehot @ rows)


def _capacitated_assign(similarity: np.ndarray, capacity: int) -> np.ndarray:
    """Each spot's cell, no cell over ``capacity``: the greedy assignment from the most
    similar pair down, found as deferred acceptance (spots propose in order of preference,
    cells keep their most similar proposers). Both preferences come from one similarity,
    so the stable assignment is unique and is the greedy one, here in vectorised rounds."""
    n_spots, n_cells = similarity.shape
    preference = np.argsort(-similarity, axis=1, kind="stable")
    tried = np.zeros(n_spots, np.int64)
    assign = np.full(n_spots, -1, np.int64)
    free = np.arange(n_spots)
    while len(free):
        assign[free] = preference[free, tried[free]]
        tried[free] += 1
        spots = np.flatnonzero(assign >= 0)
        order = np.lexsort((-similarity[spots, assign[spots]], assign[spots]))
        cell = assign[spots[order]]
        rank = np.arange(len(order)) - np.searchsorted(cell, cell, side="left")
        free = spots[order[rank >= capacity]]
        assign[free] = -1
    return assign


def _fill_small_cells(assign: np.ndarray, similarity: np.ndarray, min_spots: int) -> np.ndarray:
    """Move spots from cells above ``min_spots`` into cells below it, most similar first."""
    sizes = np.bincount(assign, minlength=similarity.shape[1])
    for cell in np.flatnonzero(sizes < min_spots):
        while sizes[cell] < min_spots:
            donors = np.flatnonzero(sizes[assign] > min_spots)
            if not len(donors):
                return assign
            spot = donors[np.argmax(similarity[donors, cell])]
            sizes[assign[spot]] -= 1
            assign[spot] = cell
            sizes[cell] += 1
    return assign


def update_cells(means: np.ndarray, kept: np.ndarray, min_spots: int, seed: int = 0) -> np.ndarray:
    """Cells after an index update, changing as few spots' cells as the rules allow.

    ``kept`` is each spot's previous cell (-1 for a new spot). New spots join
    their most similar cell; a cell left with fewer than ``min_spots`` spots
    takes spots from nearby cells that can spare one (:func:`_refill`); a cell
    of ``2 * min_spots`` or more is cut in two by a balanced bisection (the new
    half takes the next number). Every other spot keeps its cell, so a phone's
    update is small. A full rebuild (:func:`balanced_cells`) rebalances everything.
    """
    assign = kept.astype(np.int64).copy()
    n_cells = int(assign.max()) + 1 if (assign >= 0).any() else 0
    if n_cells == 0 or len(means) < 2 * min_spots:
        return balanced_cells(means, min_spots, seed)
    new = assign < 0
    centres = cell_centres(means[~new], assign[~new], n_cells)
    for start in range(0, int(new.sum()), NEAREST_CHUNK):  # [spots, cells] at once would be GBs at 100k
        rows = np.flatnonzero(new)[start:start + NEAREST_CHUNK]
        assign[rows] = np.argmax(means[rows] @ centres.T, axis=1)
    assign, n_cells = _refill(means, assign, centres, min_spots)
    return _split_large(means, assign, n_cells, min_spots, seed)


def _refill(means: np.ndarray, assign: np.ndarray, centres: np.ndarray, min_spots: int) -> tuple[np.ndarray, int]:
    """Bring every cell back to ``min_spots`` after spots left: a short cell takes the spot most
    like it from the :data:`REFILL_NEIGHBOURS` nearest cells that can spare one. When no cell
    can (a fresh build leaves every cell at its minimum), the *last* cell is dissolved, its
    spots joining their most similar cells, which gives them spares; no other cell changes
    number, so only the spots that had to move change in the phone's delta. A cell all of
    whose spots left gives its number to the last cell."""
    n_cells = len(centres)
    sizes = np.bincount(assign, minlength=n_cells)
    while n_cells > 1:
        short = np.flatnonzero(sizes[:n_cells] < min_spots)
        if not len(short):
            break
        cell = short[0]
        if sizes[cell] == 0:  # every spot of it left: the last cell takes its number
            n_cells -= 1
            assign[assign == n_cells] = cell
            centres[cell], sizes[cell] = centres[n_cells], sizes[n_cells]
            continue
        spare = np.flatnonzero(sizes[:n_cells] > min_spots)
        if not len(spare):
            n_cells -= 1
            members = np.flatnonzero(assign == n_cells)
            assign[members] = np.argmax(means[members] @ centres[:n_cells].T, axis=1)
            sizes[:n_cells] += np.bincount(assign[members], minlength=n_cells)
            continue
        near = spare[np.argsort(-(centres[spare] @ centres[cell]), kind="stable")[:REFILL_NEIGHBOURS]]
        donors = np.flatnonzero(np.isin(assign, near))
        spot = donors[np.argmax(means[donors] @ centres[cell])]
        sizes[assign[spot]] -= 1
        assign[spot], sizes[cell] = cell, sizes[cell] + 1
    return assign, n_cells


def _split_large(means: np.ndarray, assign: np.ndarray, n_cells: int, min_spots: int, seed: int) -> np.ndarray:
    work = list(range(n_cells))
    while work:
        cell = work.pop()
        members = np.flatnonzero(assign == cell)
        if len(members) >= 2 * min_spots:
            _, right = _bisect(means, members, len(members) // 2, seed)
            assign[right] = n_cells
            work += [cell, n_cells]
            n_cells += 1
    return assign
