"""Synthetic country-scale catalogues for benchmarks and tests: many distinct spots
whose photo features look like real ones.

The model is fitted on real photo features (wa-landmarks by default) in
square-root space, where the non-negative, sparse MobileNet features are
closer to Gaussian:

- a new spot's mean = the centre of the real spot means + ``sqrt(1 - t^2)`` of a
  random real spot's deviation (its *parent*) + ``t`` of a Gaussian draw
  (low-rank principal directions of the real spot means + an isotropic rest),
  so new spots are spread, and clustered, as real spots are;
- a new photo = its spot mean + ``own`` of a residual of one photo of the
  spot's *donor*, another random real spot (real photos vary in a spot-specific
  way: all of a new spot's photos vary like one real spot's) + ``other`` of a
  residual of a random real photo (so no two photos repeat), clipped at 0,
  squared back and L2-normalised. The donor is drawn apart from the parent:
  siblings of one parent sharing its residuals would be far more confusable
  than real spots, and 1-NN accuracy would fall steeply with the spot count.

``check`` measures what the issue asks to stay close to the real data: photo
1-NN spot accuracy and the spread of cosines between spot means. Photo counts
are log-normal (matched to the real counts' spread), coordinates cluster around
Zipf-sized cities inside a bounding box.
"""
from __future__ import annotations

import argparse
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.config import ClientConfig
from edge_client.vision.extractor import Extractor, l2_normalize
from lite_server.index.store import Index, Spot, base_manifest, publish
from lite_server.index.structure import Structure
from tools import dataset as ds

log = logging.getLogger(__name__)

#: Spots generated per step: bounds the float32 temporaries (~100 MB a chunk at 10 photos a spot).
CHUNK_SPOTS = 2048
THREADS = 2
#: (south, west, north, east) of the default country: the contiguous United States.
DEFAULT_BOX = (24.5, -124.8, 49.4, -66.9)


@dataclass(frozen=True)
class FeatureModel:
    """What ``generate`` samples from, fitted on real features (``fit``)."""

    center: np.ndarray          # float32 [dim]: mean of the real spot means (sqrt space)
    spot_means: np.ndarray      # float32 [spots, dim]: real spot means (sqrt space), the parents
    basis: np.ndarray           # float32 [rank, dim]: principal directions times their std
    rest_std: float             # std of each coordinate outside the principal directions
    residuals: np.ndarray       # float32 [photos, dim]: real photo minus its spot mean (sqrt space), by spot
    starts: np.ndarray          # int64 [spots]: first row in ``residuals`` of each real spot
    counts: np.ndarray          # int64 [spots]: real photos of each real spot
    log_count_std: float        # spread of log(photos per spot)

    @property
    def mean_photos(self) -> float:
        return float(self.counts.mean())


@dataclass(frozen=True)
class SyntheticCatalogue:
    """A generated catalogue: gallery photos to index, and held-out queries to measure accuracy on."""

    spots: list[Spot]
    photo_spot: np.ndarray      # int32 [n_photos]: row in ``spots`` of each gallery photo
    features: np.ndarray        # float16 [n_photos, dim], L2-normalised, non-negative
    query_spot: np.ndarray      # int32 [n_queries]: row in ``spots`` of each query
    queries: np.ndarray         # float16 [n_queries, dim]: never in ``features``
    popularity: np.ndarray      # float64 [n_spots]: share of users asking about each spot (sums to 1)


@dataclass(frozen=True)
class Tuning:
    """The generator's knobs, tuned with ``check`` on wa-landmarks (see README)."""

    novelty: float = 0.5        # t: share of a new spot's deviation that is not its parent's
    own: float = 1.3            # weight of the donor spot's photo residual
    other: float = 0.7          # weight of the random real photo's residual
    rank: int = 64              # principal directions of the spot means kept


def real_features(root: Path = ds.DEFAULT_DATASET, extractor: Extractor | None = None,
                  cache: Path = ds.CACHE) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised float32 features, int spot row of each) of a real dataset's decodable photos,
    extracted once and cached like every evaluation's."""
    data = ds.load_dataset(root)
    matrix = ds.features(data, extractor or Extractor(ClientConfig().model_path()), cache)
    keep = np.linalg.norm(matrix, axis=1) > 0  # undecodable photos have zero rows
    _, photo_spot = np.unique(data.labels[keep], return_inverse=True)
    return l2_normalize(matrix[keep]), photo_spot.astype(np.int64)


def fit(features: np.ndarray, photo_spot: np.ndarray, rank: int = Tuning.rank) -> FeatureModel:
    """The generator's model of real features (rows L2-normalised, non-negative)."""
    roots = np.sqrt(np.maximum(np.asarray(features, np.float32), 0))
    order = np.argsort(photo_spot, kind="stable")
    roots, spot_of = roots[order], np.asarray(photo_spot)[order]
    counts = np.bincount(spot_of).astype(np.int64)
    means = (np.add.reduceat(roots, np.r_[0, np.cumsum(counts)[:-1]], axis=0) / counts[:, None]).astype(np.float32)
    center = means.mean(axis=0)
    _, singular, directions = np.linalg.svd(means - center, full_matrices=False)
    std = singular / np.sqrt(max(len(means) - 1, 1))
    rank = min(rank, len(std))
    rest = float(np.sqrt((std[rank:] ** 2).sum() / features.shape[1]))
    return FeatureModel(center, means, (directions[:rank] * std[:rank, None]).astype(np.float32), rest,
                        roots - means[spot_of], np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64), counts,
                        float(np.log(counts).std()))


@functools.lru_cache(maxsize=2)
def default_model(root: Path = ds.DEFAULT_DATASET) -> FeatureModel:
    """The model fitted on ``root``'s real features (wa-landmarks unless told)."""
    return fit(*real_features(root))


def photo_counts(rng: np.random.Generator, n_spots: int, mean: float, log_std: float,
                 minimum: int = 1) -> np.ndarray:
    """Photos per spot: log-normal with the real counts' spread, scaled to ``mean``: a few spots
    have hundreds of photos, most a handful."""
    mu = np.log(max(mean - minimum, 0.1)) - log_std ** 2 / 2
    return minimum + np.round(np.exp(mu + log_std * rng.standard_normal(n_spots))).astype(np.int64)


def coordinates(rng: np.random.Generator, n_spots: int,
                box: tuple[float, float, float, float] = DEFAULT_BOX) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lat, lon, city of each spot; -1 for countryside): 90% of spots around cities whose
    sizes follow Zipf's law (city k draws ~1/k of them), 10% anywhere in ``box``."""
    south, west, north, east = box
    n_cities = max(1, n_spots // 50)
    weights = 1.0 / np.arange(1, n_cities + 1)
    city_lat = rng.uniform(south, north, n_cities)
    city_lon = rng.uniform(west, east, n_cities)
    city = rng.choice(n_cities, n_spots, p=weights / weights.sum())
    spread = 0.03 + 0.2 * np.sqrt(weights[city])  # a big city spreads over ~20 km, a village ~3 km
    lat = city_lat[city] + spread * rng.standard_normal(n_spots)
    lon = city_lon[city] + spread * rng.standard_normal(n_spots) / np.cos(np.radians(city_lat[city]))
    rural = rng.random(n_spots) < 0.1
    lat[rural] = rng.uniform(south, north, rural.sum())
    lon[rural] = rng.uniform(west, east, rural.sum())
    city[rural] = -1
    return np.clip(lat, south, north), np.clip(lon, west, east), city


def make_spots(lat: np.ndarray, lon: np.ndarray, city: np.ndarray, counts: np.ndarray) -> list[Spot]:
    """``syn-000042`` style spots with a name, coordinates and a little info."""
    width = max(6, len(str(len(lat) - 1)))
    return [Spot(f"syn-{i:0{width}d}", f"Synthetic spot {i}" + (f" in town {c}" if c >= 0 else ""),
                 round(float(la), 5), round(float(lo), 5),
                 {"synthetic": "1", "town": str(c) if c >= 0 else "", "n_images": str(n)})
            for i, (la, lo, c, n) in enumerate(zip(lat, lon, city, counts))]


def _photos(model: FeatureModel, tuning: Tuning, rng: np.random.Generator, parents: np.ndarray,
            donors: np.ndarray, per_spot: np.ndarray) -> np.ndarray:
    """Features (float16) of ``per_spot[i]`` photos of new spots with those parents and donors."""
    t = tuning.novelty
    draw = rng.standard_normal((len(parents), len(model.basis)), dtype=np.float32) @ model.basis
    draw += model.rest_std * rng.standard_normal(draw.shape, dtype=np.float32)
    means = model.center + np.float32(np.sqrt(1 - t * t)) * (model.spot_means[parents] - model.center)
    means += np.float32(t) * draw
    owner = np.repeat(np.arange(len(parents)), per_spot)
    nth = np.arange(len(owner)) - np.repeat(np.cumsum(per_spot) - per_spot, per_spot)
    donor = donors[owner]
    # Each spot walks its donor's photos from a random start: no residual twice while there are more.
    offset = rng.integers(0, 1 << 30, len(parents))[owner]
    own = model.starts[donor] + (nth + offset) % model.counts[donor]
    other = rng.integers(0, len(model.residuals), len(owner))
    roots = means[owner]
    scaled = model.residuals[own]
    scaled *= np.float32(tuning.own)
    roots += scaled
    scaled = model.residuals[other]
    scaled *= np.float32(tuning.other)
    roots += scaled
    del scaled
    np.maximum(roots, 0, out=roots)
    roots *= roots
    roots /= np.maximum(np.sqrt(np.einsum("ij,ij->i", roots, roots)), np.float32(1e-12))[:, None]
    return roots.astype(np.float16)


def generate(n_spots: int, seed: int = 0, model: FeatureModel | None = None, mean_photos: float = 10.0,
             queries_per_spot: int = 1, box: tuple[float, float, float, float] = DEFAULT_BOX,
             tuning: Tuning = Tuning(), min_photos: int = 1) -> SyntheticCatalogue:
    """``n_spots`` new spots with ``mean_photos`` gallery photos each on average
    (at least ``min_photos``) and ``queries_per_spot`` held-out query photos each; the same ``seed``
    gives the same catalogue."""
    model = model or default_model()
    rng = np.random.default_rng(seed)
    counts = photo_counts(rng, n_spots, mean_photos, model.log_count_std, min_photos)
    lat, lon, city = coordinates(rng, n_spots, box)
    popularity = counts * rng.lognormal(0.0, 0.5, n_spots)  # much photographed, much visited: roughly
    parents = rng.integers(0, len(model.spot_means), n_spots)
    donors = rng.integers(0, len(model.spot_means), n_spots)
    features = np.empty((int(counts.sum()), model.center.shape[0]), np.float16)
    queries = np.empty((n_spots * queries_per_spot, model.center.shape[0]), np.float16)
    first = np.r_[0, np.cumsum(counts)]

    def fill(index: int) -> None:
        lo, hi = index * CHUNK_SPOTS, min((index + 1) * CHUNK_SPOTS, n_spots)
        per_spot = counts[lo:hi] + queries_per_spot
        made = _photos(model, tuning, np.random.default_rng([seed, index]), parents[lo:hi], donors[lo:hi],
                       per_spot)
        is_query = np.zeros(len(made), bool)  # each spot's first photos are its queries
        is_query[np.repeat(np.cumsum(per_spot) - per_spot, queries_per_spot)
                 + np.tile(np.arange(queries_per_spot), hi - lo)] = True
        features[first[lo]:first[hi]] = made[~is_query]
        queries[lo * queries_per_spot:hi * queries_per_spot] = made[is_query]

    # Chunks are independent (their own seeded generator, their own slices): numpy releases the
    # GIL in its large operations, so two threads use both cores and the result is the same.
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        list(pool.map(fill, range(-(-n_spots // CHUNK_SPOTS))))
    return SyntheticCatalogue(make_spots(lat, lon, city, counts), np.repeat(np.arange(n_spots), counts).astype(np.int32),
                              features, np.repeat(np.arange(n_spots), queries_per_spot).astype(np.int32), queries,
                              popularity / popularity.sum())


# ---------------------------------------------------------------- the check against real data

def nearest_other(features: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Row of each row's most cosine-similar other row (rows L2-normalised), in chunks."""
    matrix = np.asarray(features, np.float32)
    best = np.empty(len(matrix), np.int64)
    for lo in range(0, len(matrix), chunk):
        sims = matrix[lo:lo + chunk] @ matrix.T
        sims[np.arange(len(sims)), np.arange(lo, lo + len(sims))] = -np.inf
        best[lo:lo + chunk] = sims.argmax(axis=1)
    return best


def spot_means(features: np.ndarray, photo_spot: np.ndarray) -> np.ndarray:
    """Each spot's L2-normalised mean photo feature."""
    sums = np.zeros((int(photo_spot.max()) + 1, features.shape[1]), np.float64)
    np.add.at(sums, photo_spot, np.asarray(features, np.float32))
    return l2_normalize(sums)


def spread(features: np.ndarray, photo_spot: np.ndarray) -> dict[str, float]:
    """What must stay close to real data: leave-one-out photo 1-NN spot accuracy (cosine),
    and percentiles (10/50/90) of each spot's nearest-other-spot cosine and of all spot pairs."""
    photo_spot = np.asarray(photo_spot)
    accuracy = float(np.mean(photo_spot[nearest_other(features)] == photo_spot))
    means = spot_means(features, photo_spot)
    cosines = means @ means.T
    pairs = cosines[np.triu_indices(len(means), 1)]
    np.fill_diagonal(cosines, -np.inf)
    out = {"photo_1nn_accuracy": accuracy}
    for name, values in (("nearest_spot_cos", cosines.max(axis=1)), ("pair_cos", pairs)):
        for q in (10, 50, 90):
            out[f"{name}_p{q}"] = float(np.percentile(values, q))
    return {k: round(v, 4) for k, v in out.items()}


def check(features: np.ndarray | None = None, photo_spot: np.ndarray | None = None, seed: int = 0,
          tuning: Tuning = Tuning()) -> dict[str, dict[str, float]]:
    """Real vs synthetic ``spread`` for a synthetic catalogue as large as the real one (same
    spots, same mean photos per spot), and how far the new spots are from the real ones
    (``nearest_real_spot_cos``: a copy would be 1.0; the real spots' own nearest is ``nearest_spot_cos``)."""
    if features is None or photo_spot is None:
        features, photo_spot = real_features()
    model = fit(features, photo_spot, tuning.rank)
    n_spots = len(model.counts)
    synthetic = generate(n_spots, seed, model, model.mean_photos, queries_per_spot=0, tuning=tuning,
                         min_photos=int(model.counts.min()))
    real_means = spot_means(features, np.asarray(photo_spot))
    novel = (spot_means(synthetic.features, synthetic.photo_spot) @ real_means.T).max(axis=1)
    report = {"real": spread(features, photo_spot), "synthetic": spread(synthetic.features, synthetic.photo_spot)}
    report["synthetic"]["nearest_real_spot_cos_p50"] = round(float(np.median(novel)), 4)
    for side, data in (("real", (features, photo_spot)), ("synthetic", (synthetic.features, synthetic.photo_spot))):
        report[side].update(spots=n_spots, photos=len(data[0]))
    return report


def table(report: dict[str, dict[str, float]]) -> str:
    """The check as an aligned text table."""
    keys = list(dict.fromkeys([*report["real"], *report["synthetic"]]))
    lines = [f"{'':28s} {'real':>10s} {'synthetic':>10s}"]
    lines += [f"{k:28s} {report['real'].get(k, ''):>10} {report['synthetic'].get(k, ''):>10}" for k in keys]
    return "\n".join(lines)


# ---------------------------------------------------------------- publishing

def publish_catalogue(out_dir: Path, catalogue: SyntheticCatalogue, extractor: Extractor,
                      note: str = "synthetic", structure: Structure | None = None) -> Index:
    """An index version of the catalogue's gallery that the real server loads; the manifest
    carries ``extractor``'s model sha256, so phones with the real model are accepted.
    ``structure``: its public structure when the caller derived it already."""
    ids = [spot.id for spot in catalogue.spots]
    nth = np.arange(len(catalogue.photo_spot)) - np.searchsorted(catalogue.photo_spot, catalogue.photo_spot)
    rows = ((ids[s], f"{ids[s]}/{n:04d}.jpg") for s, n in zip(catalogue.photo_spot.tolist(), nth.tolist()))
    manifest = {**base_manifest(extractor, len(catalogue.spots), len(catalogue.features)), "bench": note}
    return publish(Path(out_dir), manifest, catalogue.spots, rows, catalogue.features, structure=structure)


def publish_synthetic(out_dir: Path, n_spots: int, seed: int = 0, extractor: Extractor | None = None,
                      **options: Any) -> tuple[Index, SyntheticCatalogue]:
    """Generate (``generate``'s ``options``) and publish a synthetic index under ``out_dir``."""
    extractor = extractor or Extractor(ClientConfig().model_path())
    catalogue = generate(n_spots, seed, **options)
    note = f"synthetic {n_spots} spots, seed {seed}"
    return publish_catalogue(out_dir, catalogue, extractor, note), catalogue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spots", type=int, required=True, help="number of spots to generate")
    parser.add_argument("--out", type=Path, help="index directory to publish into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--photos", type=float, default=10.0, help="mean gallery photos per spot")
    parser.add_argument("--check", action="store_true", help="compare a real-sized synthetic catalogue with the real one")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    catalogue = generate(args.spots, args.seed, mean_photos=args.photos)
    took = time.perf_counter() - started
    counts = np.bincount(catalogue.photo_spot, minlength=len(catalogue.spots))
    print(f"generated {len(catalogue.spots)} spots, {len(catalogue.features)} photos "
          f"(per spot: median {np.median(counts):.0f}, max {counts.max()}), {len(catalogue.queries)} queries "
          f"in {took:.1f} s")
    if args.out:
        index = publish_catalogue(args.out, catalogue, Extractor(ClientConfig().model_path()),
                                  f"synthetic {args.spots} spots, seed {args.seed}")
        print(f"published {index.path}")
    if args.check:
        print(table(check(seed=args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
