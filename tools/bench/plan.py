"""How much a benchmark run measures (its plans) and the targets each figure is judged against."""
from __future__ import annotations

from dataclasses import dataclass

from tools.bench.catalogue import TARGETS as CATALOGUE_TARGETS

JITTER = 0.1
K_PRIVATE = 40
TARGETS = {  # key: (limit, "max" = at most / "min" = at least)
    "extract_ratio_224": 1.3, "extract_ratio_12mp": 3.0, "extract_ratio_camera_frame": 1.3,
    "lookup_ratio_vs_faiss_100k": 1.5,
    "http_p50_ms_100k": 30.0, "rss_mb_1m": 1500.0, "private_vs_plain_ratio": 1.5,
    "answer_added_latency_s": 0.5,
    "ohttp_vs_direct_ratio": 1.3,
    **CATALOGUE_TARGETS,
    "ray_build_ratio": (0.8, "min"), "ray_serve_p50_ratio": 1.5,
}
ONLY = ("answer-latency", "ohttp", "extract", "catalogue", "ray")


@dataclass(frozen=True)
class Plan:
    """How much to measure: gallery sizes, which get a server, repeats."""

    sizes: tuple[int, ...]
    served: tuple[int, ...]      # sizes measured through a real server (memory, HTTP)
    target: int                  # the size of the HTTP, throughput and private-query figures
    repeats: int
    sklearn_up_to: int           # the old default is slow: only up to this size
    photos_12mp: int             # real photos made 12 MP for the cosine figure
    load_seconds: float          # the 16-client throughput run
    clients: int = 16
    real_photos: int = 0         # 0 = every dataset photo; fewer skips extracting all 4,625 (smoke)
    spots: tuple[int, ...] = (1_000, 10_000, 100_000)  # synthetic catalogues (tools.bench.catalogue)


PLANS = {
    "full": Plan((10_000, 100_000, 1_000_000), (10_000, 100_000, 1_000_000), 100_000, 25, 100_000, 16, 10.0),
    # Under a minute: the 100k lookup in-process, the server only at 10k.
    "quick": Plan((10_000, 100_000), (10_000,), 10_000, 5, 10_000, 3, 3.0, spots=(1_000, 10_000)),
    "smoke": Plan((3_000,), (3_000,), 3_000, 3, 3_000, 1, 1.0, clients=4, real_photos=300, spots=(300,)),
}
