"""A run's report: the machine it ran on, each target's verdict, the markdown table and the scaling plot."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from tools.bench.plan import TARGETS
from tools.bench.timing import label, save_plot


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def verdicts(result: dict[str, Any]) -> dict[str, Any]:
    """Each issue target: its measured value, the limit, whether it is met (None: not measured)."""
    out = {}
    for key, target in TARGETS.items():
        limit, sense = target if isinstance(target, tuple) else (target, "max")
        value = result.get(key)
        met = None if value is None else bool(value >= limit if sense == "min" else value <= limit)
        out[key] = {"value": value, "limit": limit, "sense": sense, "met": met}
    return out


def table(result: dict[str, Any]) -> str:
    """The markdown table of targets for docs/benchmarks.md."""
    lines = ["| figure | measured | target | met |", "| --- | --- | --- | --- |"]
    for key, verdict in result["targets"].items():
        met = {True: "yes", False: "**no**", None: "not measured"}[verdict["met"]]
        sign = ">=" if verdict.get("sense") == "min" else "<="
        lines.append(f"| `{key}` | {verdict['value']} | {sign} {verdict['limit']} | {met} |")
    sections = result.get("section_seconds") or result.get("catalogue_seconds") or {}
    if sections:
        lines += ["", "Seconds by section: " + ", ".join(f"{name} {s}" for name, s in sections.items()) + "."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Lookup time and memory against gallery size, log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["plan"]["sizes"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, name in (("lookup_ms", "default (uint8 scan + exact re-score)"), ("faiss_flat_ms", "FAISS IndexFlatIP"),
                      ("sklearn_ms", "scikit-learn brute (old default)"),
                      ("http_p50_ms", "HTTP /v1/candidates, vector k=40"),
                      ("http_p50_ms_cells", "HTTP /v1/candidates, cells (default)")):
        points = [(n, result[f"{key}_{label(n)}"]) for n in sizes if f"{key}_{label(n)}" in result]
        if points:
            left.plot(*zip(*points), marker="o", label=name)
    left.set(xscale="log", yscale="log", xlabel="gallery size (features)", ylabel="ms per single query",
             title="Lookup time")
    points = [(n, result[f"rss_mb_{label(n)}"]) for n in sizes if f"rss_mb_{label(n)}" in result]
    if points:
        right.plot(*zip(*points), marker="o", label="server RSS (measured)")
    right.plot(sizes, [n * 1280 * 4 / 2**20 for n in sizes], "--", label="float32 matrix (FAISS flat)")
    right.plot(sizes, [n * 1280 / 2**20 for n in sizes], ":", label="uint8 codes")
    right.axhline(1500, color="red", linewidth=0.8, label="1.5 GB target")
    right.set(xscale="log", yscale="log", xlabel="gallery size (features)", ylabel="MB", title="Memory")
    save_plot(fig, (left, right), path)
