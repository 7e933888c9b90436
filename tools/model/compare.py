"""What quantization cost: a quantized extractor against its float model on a dataset.

Two measures in one report. Per photo, the cosine between the two models'
L2-normalised features (min and median over every photo of the dataset): how
far the integer model drifts from the float one. And the recognition top-1 of
each on the dataset's query/gallery split, scored as the privacy evaluation's
non-private baseline (``tools.evaluate.testbed.baseline``) scores it: what a user
loses. Features are cached per model sha256, like every evaluation's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_client.vision.extractor import Extractor
from tools import dataset as ds
from tools.evaluate import attackers as atk


def top1(data: ds.Dataset, features: np.ndarray) -> tuple[float, int]:
    """(recognition top-1, queries) on the dataset's query/gallery split.

    The privacy evaluation's non-private baseline (``tools.evaluate.testbed.baseline``)
    without building a whole server: each query's best cosine per spot over the
    gallery (``attackers.spot_scores``, the server's recognizer), features in
    float16 as the index stores them and the wire carries them.
    """
    gallery, queries, _ = ds.split(data)
    spots = {s: i for i, s in enumerate(sorted({data.photos[r][0] for r in gallery}))}
    photo_spot = np.array([spots[data.photos[r][0]] for r in gallery])
    truth = np.array([spots[data.photos[q][0]] for q in queries])
    stored = features.astype(np.float16).astype(np.float32)
    scores = atk.spot_scores(stored[queries], stored[gallery], photo_spot, len(spots))
    return atk.summarize(atk.rank_of_truth(scores, truth))["top1"], int(len(queries))


def model_top1(extractor: Extractor, dataset: Path, cache: Path = ds.CACHE) -> tuple[float, int, np.ndarray]:
    """(top-1, queries, every photo's feature) of ``extractor`` on ``dataset``; features cached by sha256."""
    data = ds.load_dataset(dataset)
    features = ds.features(data, extractor, cache)
    return (*top1(data, features), features)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two feature matrices; rows where either is zero (an undecodable photo) are dropped."""
    ok = (np.linalg.norm(a, axis=1) > 0) & (np.linalg.norm(b, axis=1) > 0)
    return np.sum(a[ok] * b[ok], axis=1) / (np.linalg.norm(a[ok], axis=1) * np.linalg.norm(b[ok], axis=1))


def compare(float_model: Path, quantized: Path, dataset: Path, cache: Path = ds.CACHE,
            threads: int = 0) -> dict[str, Any]:
    """The report: both models' top-1, the drop in points, the feature cosines."""
    models = {"float": Extractor(float_model, num_threads=threads), "quantized": Extractor(quantized, num_threads=threads)}
    if models["float"].dim != models["quantized"].dim:
        raise ValueError(f"the models' features differ in size: {models['float'].dim} and {models['quantized'].dim}")
    report: dict[str, Any] = {"dataset": str(dataset)}
    features = {}
    for role, extractor in models.items():
        score, report["queries"], features[role] = model_top1(extractor, dataset, cache)
        report[role] = {"model": str(extractor.model_path), "sha256": extractor.sha256,
                        "input": np.dtype(extractor._input["dtype"]).name, "top1": score}
    cos = cosines(features["float"], features["quantized"])
    report["cosine"] = {"photos": int(cos.size), "min": float(cos.min()), "median": float(np.median(cos)),
                        "mean": float(cos.mean())}
    report["top1_drop_points"] = 100.0 * (report["float"]["top1"] - report["quantized"]["top1"])
    return report


def summary(report: dict[str, Any]) -> str:
    """A few lines a person reads."""
    f, q, c = report["float"], report["quantized"], report["cosine"]
    return (f"top-1 on {report['queries']} queries: float {f['top1']:.3f}, quantized {q['top1']:.3f} "
            f"(top-1 drop: {report['top1_drop_points']:.1f} points)\n"
            f"feature cosine over {c['photos']} photos: min {c['min']:.4f}, median {c['median']:.4f}")
