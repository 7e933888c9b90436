"""The benchmark tool runs end to end (its tiny --smoke plan) and reports every figure.

Speed targets are not asserted here (a busy test machine says nothing about
them): ``make bench`` measures them. This checks the tool measures what it says.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tools.bench.plan import TARGETS


def test_smoke_bench_writes_every_figure_in_plausible_ranges(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "-m", "tools.bench", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "bench.json").read_text())
    assert set(result["targets"]) == set(TARGETS)
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tiled" in result["gallery"] and result["plan"]["sizes"] == [3000]
    for key in ("extract_bare_ms", "extract_224_ms", "extract_12mp_ms", "lookup_ms_3k", "faiss_flat_ms_3k",
                "http_p50_ms_3k", "http_p50_ms_cells_3k", "http_p50_ms_faiss_ivf_3k", "private_ms", "private_noise_ms",
                "plain_ms"):
        assert 0 < result[key] < 10_000, key
    # Timing noise can put a ratio a little under 1; far under would mean the peer was mismeasured.
    assert 0.7 < result["extract_ratio_224"] < 10 and 0.7 < result["extract_ratio_12mp"] < 30
    assert 0.7 < result["extract_ratio_camera_frame"] < 10 and result["extract_frame_nv21_ms"] > 0
    assert result["extract_cosine_fast_vs_careful_min"] > 0.95
    assert result["same_rows_as_faiss_3k"] > 0.95  # the default is exact: ties aside, FAISS's rows
    # 40 candidates carry their features (in whatever wire encoding), one plain candidate far less.
    assert result["response_bytes_k40_3k"] > 40 * 256
    assert result["private_bytes_received"] > 5 * result["plain_bytes_received"]
    # The default (cells) query names at least one cell of >= 10 spots, each sent back.
    assert result["private_candidates"] >= 10 and result["response_bytes_cells_3k"] > 10 * 128
    assert 0 < result["faiss_ivf_spot_recall_3k"] <= 1.0  # approximate: a share of the exact spots
    assert result["throughput_rps_4"] > 0 and 50 < result["rss_mb_3k"] < 1000
    # Sealed through the relay: slower than direct, but not absurdly, and a few hundred bytes bigger.
    assert 0.7 < result["ohttp_vs_direct_ratio"] < 10 and result["http_p50_ms_cells_ohttp_3k"] > 0
    assert 0 < result["ohttp_bytes_sent"] - result["direct_bytes_sent"] < 400
    assert result["targets"]["rss_mb_1m"]["met"] is None  # not measured in smoke: said, not guessed
    # Where the run's time went, section by section, within the run's own total.
    sections = result["section_seconds"]
    assert set(sections) == {"extraction", "gallery_3k", "catalogue_300"} and min(sections.values()) > 0
    assert sum(sections.values()) <= result["seconds"] and "Seconds by section" in (out / "bench.md").read_text()
    # The user's wait: every path timed, the defended one through the whole burst at least as long as its answer.
    for key in ("answer_none_p50_s", "answer_defended_p50_s", "answer_cli_none_p50_s", "answer_cli_defended_p50_s",
                "answer_long_none_p50_s", "answer_long_defended_p50_s"):
        assert 0 < result[key] < 60, key
    assert result["answer_burst_p50_s"] >= result["answer_defended_p50_s"]
    assert result["targets"]["answer_added_latency_s"]["value"] == result["answer_added_latency_s"]
