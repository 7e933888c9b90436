"""What quantization cost: a quantized extractor against its float model on a dataset.

Two measures in one report. Per photo, the cosine between the two models'
L2-normalised features (min and median over every photo of the dataset): how
far the integer model drifts from the float one. And the recognition top-1 of
each on the dataset's query/gallery split, computed exactly as the privacy
evaluation's non-private baseline (``tools.testbed.baseline``): what a user
loses. Features are cached per model sha256, like every evaluation's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_client.extractor import Extractor
from tools import dataset as ds
from tools import testbed


def model_top1(extractor: Extractor, dataset: Path, cache: Path = ds.CACHE) -> tuple[float, testbed.Env]:
    """Recognition top-1 of ``extractor`` on ``dataset`` (and the evaluation it ran in)."""
    env = testbed.prepare(dataset, cache=cache, extractor=extractor)
    return testbed.baseline(env), env


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
        top1, env = model_top1(extractor, dataset, cache)
        features[role] = env.features
        report[role] = {"model": str(extractor.model_path), "sha256": extractor.sha256,
                        "input": np.dtype(extractor._input["dtype"]).name, "top1": top1}
        report["queries"] = int(len(env.queries))
    cos = cosines(features["float"], features["quantized"])
    report["cosine"] = {"photos": int(cos.size), "min": float(cos.min()), "median": float(np.median(cos)),
                        "mean": float(cos.mean())}
    report["top1_drop_points"] = 100.0 * (report["float"]["top1"] - report["quantized"]["top1"])
    return report


def summary(report: dict[str, Any]) -> str:
    """A few lines a person reads."""
    f, q, c = report["float"], report["quantized"], report["cosine"]
    return (f"top-1 on {report['queries']} queries: float {f['top1']:.3f}, quantized {q['top1']:.3f} "
            f"({report['top1_drop_points']:+.1f} points lost)\n"
            f"feature cosine over {c['photos']} photos: min {c['min']:.4f}, median {c['median']:.4f}")
