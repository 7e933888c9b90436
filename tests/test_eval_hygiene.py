"""An evaluation writes under its --out and --cache-dir and nowhere else: not the user's home
(where a real client keeps its answer cache and public document), not the checkout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, make_subset

#: Written by the test runner itself, never by the evaluation (its child runs without bytecode), and
#: the checkout's default cache folder, which evaluations running beside the test may write to.
SKIPPED = {".pytest_cache", "__pycache__", ".cache"}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (symlinks not followed): (size, mtime)."""
    files = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED]
        for name in names:
            path = Path(folder) / name
            stat = path.lstat()
            files[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return files


def test_evaluation_writes_only_under_out_and_the_cache_dir(tmp_path: Path) -> None:
    # The smallest real run: 24 spots of wa-landmarks (8 photos each), linked photos at m = 5
    # (phones with an answer cache and a public document kept on disk), open set on the samples only.
    data = make_subset(tmp_path / "data", spots=24, per_spot=8)
    home, cache, out = tmp_path / "home", tmp_path / "cache", tmp_path / "out"
    home.mkdir()
    checkout = _snapshot(ROOT)
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")}
    env.update(HOME=str(home), PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "tools.evaluate", "privacy", "--dataset", str(data), "--out", str(out),
                          "--cache-dir", str(cache), "--links", "5", "--outside", "", "--min-photos", "4",
                          "--query-fraction", "0.25"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(home.rglob("*")) == [], "the evaluation wrote into HOME"
    after = _snapshot(ROOT)
    changed = sorted(k for k in set(checkout) | set(after) if checkout.get(k) != after.get(k))
    assert changed == [], f"the evaluation wrote into the checkout: {changed[:10]}"
    # What it did write is where it says: the phones' kept public document under the cache folder.
    assert list(cache.glob("eval-state-*/cache/*.public.json.gz")) and list(cache.glob("features/*.npy"))
    metrics = json.loads((out / "metrics.json").read_text())
    few = sum(len(list(spot.iterdir())) < 4 for spot in (data / "images").iterdir())
    assert (metrics["min_photos"], metrics["query_fraction"], metrics["spots_left_out"]) == (4, 0.25, few) and few
    default = metrics["default"]
    for figures, name in ((default, "user_top1"), (default, "server_top1_aware"), (default["linked"]["5"], "top1"),
                          (default["open_set"], "kept_correct"), (default["open_set_landmarks"], "kept_correct"),
                          (default["open_set_landmarks"], "rejected_outside"), (default["open_set_landmarks"], "auroc")):
        lo, hi = figures[f"{name}_ci95"]
        assert lo <= figures[name] <= hi, name
    # Held-out landmarks: a fifth of the indexed spots left out of a second index, their photos asked.
    landmarks = default["open_set_landmarks"]
    assert landmarks["held_out_spots"] == round(0.2 * metrics["n_spots"]) and landmarks["n_outside"] > 0
    assert landmarks["indexed_spots"] + landmarks["held_out_spots"] == metrics["n_spots"]
    assert 0 < landmarks["n_correct"] <= landmarks["n_known"] < metrics["n_queries"]
    report = (out / "report.md").read_text()
    # 3 default, the receipts' calibration, 2 open set, 2 held-out landmarks, 2 linked
    assert report.count(": met (") + report.count(": missed (") == 10 and "held-out landmarks" in report
