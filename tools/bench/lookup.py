"""The in-process lookup: the default backend against FAISS and scikit-learn, single and batched."""
from __future__ import annotations

from typing import Any

import numpy as np

from lite_server.index.store import Index
from lite_server.search.backends import FaissBackend, QuantizedBackend, SklearnBackend
from tools.bench.plan import K_PRIVATE, Plan
from tools.bench.timing import interleaved, label, median_ms


def bench_lookup(plan: Plan, index: Index, qs: np.ndarray) -> dict[str, Any]:
    """Single-query top-160 (k=40 spots) of the default against FAISS flat IP (and sklearn)."""
    n, tag = len(index.features), label(len(index.features))
    ours = QuantizedBackend().add(np.asarray(index.features))
    peers: dict[str, Any] = {"faiss_flat": FaissBackend().add(np.asarray(index.features, np.float32))}
    if n <= plan.sklearn_up_to:
        peers["sklearn"] = SklearnBackend().add(np.asarray(index.features, np.float32))
    cycle = iter(range(10**9))
    one = lambda: qs[next(cycle) % len(qs)][None]  # noqa: E731 - a fresh query each call
    fns = {"ours": lambda: ours.search(one(), 4 * K_PRIVATE)}
    fns.update({name: (lambda b=b: b.search(one(), 4 * K_PRIVATE)) for name, b in peers.items()})
    times = interleaved(fns, plan.repeats if n < 1_000_000 else max(3, plan.repeats // 5))
    same = np.mean(ours.search(qs[:8], 4 * K_PRIVATE)[1] == peers["faiss_flat"].search(qs[:8], 4 * K_PRIVATE)[1])
    out = {f"lookup_ms_{tag}": median_ms(times["ours"]), f"faiss_flat_ms_{tag}": median_ms(times["faiss_flat"]),
           f"same_rows_as_faiss_{tag}": round(float(same), 4),
           f"rescored_rows_{tag}": int(np.median([len(ours._candidates(ours.approximate(q[None])[0], 1.0, 160))
                                                 for q in qs[:8]]))}
    if "sklearn" in times:
        out[f"sklearn_ms_{tag}"] = median_ms(times["sklearn"])
    out[f"lookup_ratio_vs_faiss_{tag}"] = round(out[f"lookup_ms_{tag}"] / out[f"faiss_flat_ms_{tag}"], 3)
    return {**out, **bench_batch(ours, qs, tag, times["ours"])}


def bench_batch(ours: QuantizedBackend, qs: np.ndarray, tag: str, single: list[float]) -> dict[str, Any]:
    """16 queries in one search against 16 single searches."""
    times = interleaved({"batch": lambda: ours.search(qs[:16], 4 * K_PRIVATE)}, 3, warmup=1)
    return {f"lookup_batch16_ms_{tag}": median_ms(times["batch"]),
            f"lookup_batch16_speedup_{tag}": round(16 * float(np.median(single)) / float(np.median(times["batch"])), 2)}
