"""Index builds on a Ray cluster: ``enfpire-server index build|add --ray [ADDRESS]``.

The driver lists the photos and publishes the version exactly as a local build
does (``index.build_index`` / ``updates.add_spots``); only the extraction moves
to Ray Data. Photo paths go out in batches to a pool of worker actors, each of
which builds one TFLite interpreter in its constructor and reuses it for every
batch it is given. Each row carries its position, so the driver puts the
features back in the photos' order whatever order the batches finish in, and
the result is the local build's bit for bit (the model is quantised: integer
arithmetic, the same on every worker and thread count).

Failures: a photo that cannot be decoded comes back as "not ok" and is skipped
and counted as locally. A worker that dies (killed, its node lost) is restarted
by Ray and its unfinished batch is run again (Ray Data's actor pools retry
tasks of dead actors), so it costs only that batch. A build interrupted as a
whole never reaches ``publish``, so ``current`` keeps the previous version.

Every worker reads the photos and the model at the driver's paths: on a
multi-node cluster both live on a shared volume (README, "Deployment and
scaling"), and a worker refuses a model whose sha256 differs from the driver's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edge_client.vision.extractor import Extractor

from ..index.store import collect_rows
from .cluster import cluster_cpus, import_ray

log = logging.getLogger(__name__)

#: Photos per Ray Data batch: large enough to hide the scheduling cost, small enough that a lost worker costs little.
BATCH = 32


class ExtractBatch:
    """A Ray Data worker: one interpreter, built once, for every batch this actor receives."""

    def __init__(self, model: str, sha256: str, threads: int):
        from edge_client.errors import ModelError

        self.extractor = Extractor(model, num_threads=threads)
        if self.extractor.sha256 != sha256:
            raise ModelError(f"{model} on this node is not the driver's model (sha256 {sha256[:12]}...)")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        failed: set[int] = set()
        features = np.zeros((len(paths), self.extractor.dim), np.float32)
        for row, vector in enumerate(self.extractor.extract_many(
                paths, on_error=lambda photo, exc: failed.add(paths.index(str(photo))))):
            if vector is not None:
                features[row] = vector
        ok = np.array([row not in failed for row in range(len(paths))], dtype=bool)
        return {"position": batch["position"], "feature": features, "ok": ok}


@dataclass(frozen=True)
class RayExtraction:
    """An ``index.ExtractFn`` that runs on the connected Ray cluster.

    ``workers`` actors (default: one per CPU of the cluster), each with a
    ``threads``-thread interpreter (default 1: parallelism comes from the actors).
    """

    workers: int = 0
    threads: int = 1
    batch_size: int = BATCH

    def __call__(self, photos: list[tuple[str, Path]], photos_dir: Path, extractor: Extractor,
                 progress: Callable[[int, int], None] | None = None,
                 ) -> tuple[list[tuple[str, str]], np.ndarray, int]:
        vectors = self.features(photos, extractor) if photos else iter(())
        return collect_rows(photos, photos_dir, vectors, extractor.dim, progress)

    def features(self, photos: list[tuple[str, Path]], extractor: Extractor) -> Iterator[np.ndarray | None]:
        """Each photo's float32 feature (``None``: undecodable), in the photos' order, as batches land."""
        ray = import_ray()
        blocks = -(-len(photos) // self.batch_size)
        workers = min(self.workers or cluster_cpus(), blocks)
        items = [{"position": i, "path": str(path.resolve())} for i, (_, path) in enumerate(photos)]
        extracted = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            ExtractBatch, fn_constructor_kwargs={"model": str(extractor.model_path.resolve()),
                                                 "sha256": extractor.sha256, "threads": self.threads},
            batch_size=self.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1)
        log.info("extracting %d photos on Ray: %d workers, batches of %d", len(items), workers, self.batch_size)
        landed: dict[int, np.ndarray | None] = {}
        next_position = 0
        for batch in extracted.iter_batches(batch_size=None, batch_format="numpy"):
            for position, feature, ok in zip(batch["position"], batch["feature"], batch["ok"]):
                landed[int(position)] = feature if ok else None
            log.info("%d of %d photos extracted", len(landed) + next_position, len(items))
            while next_position in landed:
                yield landed.pop(next_position)
                next_position += 1
        if next_position != len(items):
            raise RuntimeError(f"Ray returned {next_position} of {len(items)} photos")
