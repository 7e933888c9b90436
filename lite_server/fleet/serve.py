"""Replicated serving on Ray Serve: ``enfpire-server serve --ray [ADDRESS] --replicas N``.

Each replica runs the same Flask app as ``serve`` (``app.create_app``: every
route, admission control, the OHTTP gateway), put under Ray Serve's ASGI
ingress by ``a2wsgi`` (the WSGI-to-ASGI bridge FastAPI and Ray Serve's users
rely on), with a thread pool as large as waitress's would be. Ray's HTTP proxy
(one per node, ``host:port``) spreads requests over the replicas.

Index updates. Every replica watches its index directory's ``current`` link
(a ``readlink`` twice a second) and, when it moves, switches with
``updates.reload_service``: the new lookup is built first and swapped in one
reference, so no request fails. Whatever publishes a version reaches every
replica: ``index add|remove`` (locally or with ``--ray``), the admin API, an
object-store sync that repoints ``current`` on a node.

Readiness. Replicas report what they serve to a small named actor (the
*board*) with each poll; ``/readyz`` on any replica answers for the fleet: 200
only when every wanted replica serves an index, with the versions served;
503 while one is starting or lost. The admin API (in the driver, on its own
loopback listener as for waitress) returns from an update only once every
replica serves the new version.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Response, jsonify, request

from edge_client.errors import EnfPireError

from ..api.admission import HEADROOM
from ..api.app import EXTENSION, Service, create_app
from ..api.updates import reload_service
from ..config import ServerConfig
from ..errors import error_response
from ..index.store import Index, resolve_version
from .cluster import cluster_cpus, connect, import_ray

log = logging.getLogger(__name__)

APP = "enfpire"
NAMESPACE = "enfpire"
BOARD = "enfpire-board"
#: Seconds between a replica's looks at ``current`` (and its reports to the board).
POLL = 0.5
#: A replica silent for this long is gone (stopped, crashed, its node lost).
STALE = 10.0
#: Seconds the driver waits for the replicas to start or to switch versions.
SWITCH_TIMEOUT = 300.0


class FleetError(EnfPireError):
    """The replicas did not all come up, or did not all switch to a version, in time."""


class IndexBoard:
    """A named actor: what each live replica serves (version, counts), as last reported."""

    def __init__(self) -> None:
        self.replicas: dict[str, tuple[float, dict[str, Any]]] = {}

    def report(self, replica: str, state: dict[str, Any]) -> None:
        self.replicas[replica] = (time.monotonic(), state)

    def fleet(self) -> dict[str, dict[str, Any]]:
        """Live replicas and their state; the silent are forgotten."""
        now = time.monotonic()
        self.replicas = {r: (t, s) for r, (t, s) in self.replicas.items() if now - t < STALE}
        return {r: s for r, (_, s) in self.replicas.items()}


def _board() -> Any:
    return import_ray().get_actor(BOARD, namespace=NAMESPACE)


def fleet_readiness(fleet: dict[str, dict[str, Any]], wanted: int) -> tuple[bool, dict[str, Any]]:
    """Whether ``wanted`` replicas serve an index, and the summary ``/readyz`` shows."""
    serving = [s for s in fleet.values() if s.get("index_version")]
    versions = sorted({s["index_version"] for s in serving})
    return len(serving) >= wanted, {"replicas": {"wanted": wanted, "ready": len(serving)}, "index_versions": versions}


class Replica:
    """One Ray Serve replica: the Flask app, its index watcher and its reports to the board."""

    def __init__(self, config: ServerConfig, wanted: int):
        from ray import serve

        self.flask = create_app(config)
        self.service: Service = self.flask.extensions[EXTENSION]
        self.wanted = wanted
        self.name = serve.get_replica_context().replica_id.unique_id
        self.board = _board()
        self.flask.before_request(self._fleet_readyz)
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name="index-watch", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="board-report", daemon=True).start()

    def __serve_build_asgi_app__(self) -> Any:
        """The ASGI app Ray Serve's ingress calls: the Flask app through a2wsgi."""
        from a2wsgi import WSGIMiddleware

        config = self.service.config
        return WSGIMiddleware(self.flask, workers=config.threads + config.max_pending + HEADROOM)

    def __del__(self) -> None:
        self._stop.set()

    def _heartbeat(self) -> None:
        """Tell the board what this replica serves, every round (also while a reload runs)."""
        while not self._stop.wait(POLL):
            self.board.report.remote(self.name, self._state())

    def _watch(self) -> None:
        """Follow ``current``: switch when it moves."""
        index_dir = Path(self.service.config.index)
        while not self._stop.wait(POLL):
            try:
                serving = self.service.lookup
                if serving is None or resolve_version(index_dir) != serving.index.path:
                    switched, version = reload_service(self.service)
                    log.warning("replica %s: %s index version %s", self.name,
                                "switched to" if switched else "serving", version)
            except EnfPireError as exc:  # a bad version: keep serving the old one
                log.error("replica %s: reload failed, still serving the old version: %s", self.name, exc)

    def _state(self) -> dict[str, Any]:
        lookup = self.service.lookup
        if lookup is None:
            return {}
        return {"index_version": lookup.index.version, "n_spots": len(lookup.index.spots),
                "n_photos": int(len(lookup.index.photo_spot))}

    def _fleet_readyz(self) -> Response | None:
        """``/readyz`` for the whole deployment (other routes pass through)."""
        if request.endpoint != "api.readyz":
            return None
        import ray

        try:
            fleet = ray.get(self.board.fleet.remote(), timeout=5)
        except (ray.exceptions.RayError, TimeoutError):
            return error_response(503, "not_ready", "the replicas' board does not answer", retry_after=1)
        ready, summary = fleet_readiness(fleet, self.wanted)
        mine = self._state()
        if not ready or not mine:
            return error_response(503, "not_ready", f"{summary['replicas']['ready']} of {self.wanted} replicas "
                                  "serve an index", retry_after=1)
        return jsonify({"status": "ready", **mine, **summary})


@dataclass(frozen=True)
class _Serving:
    """What the driver's :class:`FleetService` knows of a version: the index, not a lookup."""

    index: Index


class FleetService(Service):
    """The driver's view of the replicas, for the admin API and SIGHUP.

    It loads no lookup (the replicas do): ``load`` waits until every replica
    serves the version, so an admin update answers only once it is everywhere.
    """

    def __init__(self, config: ServerConfig, wanted: int):
        self.wanted = wanted
        super().__init__(config)

    def load(self, index: Index) -> Any:
        wait_for_fleet(self.wanted, index.version)
        with self._lock:
            self.lookup = _Serving(index)  # type: ignore[assignment]  # only .index is read in the driver
        return self.lookup


def wait_for_fleet(wanted: int, version: str | None = None, timeout: float = SWITCH_TIMEOUT) -> dict[str, Any]:
    """Until ``wanted`` live replicas serve ``version`` (any version when None); the board's summary."""
    import ray

    board, deadline = _board(), time.monotonic() + timeout
    while True:
        fleet = ray.get(board.fleet.remote(), timeout=30)
        ready, summary = fleet_readiness(fleet, wanted)
        if ready and (version is None or summary["index_versions"] == [version]):
            return summary
        if time.monotonic() > deadline:
            raise FleetError(f"after {timeout:.0f} s: {summary} (wanted {wanted} replicas on {version or 'any version'})")
        time.sleep(POLL / 2)


class DropRequestId:
    """ASGI middleware for Ray Serve's HTTP proxy: answers leave without the ``X-Request-ID``
    the proxy adds to each of them. An answer carries no identifier (the hygiene rule
    waitress keeps); Ray still uses the id inside the cluster, for its own logs."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def send_without_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
            await send(message)

        await self.app(scope, receive, send_without_id)


def proxy_middlewares() -> list[Any]:
    """What ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names (see ``ray_cluster.SERVE_ENV``):
    the middleware Ray's proxy wraps around every request, outside its own request-id one."""
    from starlette.middleware import Middleware

    return [Middleware(DropRequestId)]


def deploy(config: ServerConfig, replicas: int) -> Any:
    """Start Serve's proxy on ``host:port`` and the app with ``replicas`` replicas; wait until all
    serve. Returns the board's handle: the caller keeps it, the board lives as long as it does."""
    ray = import_ray("ray.serve", "a2wsgi")
    from ray import serve

    board = ray.remote(num_cpus=0)(IndexBoard).options(name=BOARD, namespace=NAMESPACE, get_if_exists=True).remote()
    cpus = min(1.0, cluster_cpus() / replicas)
    deployment = serve.deployment(serve.ingress()(Replica), name="EnfPire", num_replicas=replicas,
                                  max_ongoing_requests=config.threads + config.max_pending + HEADROOM,
                                  ray_actor_options={"num_cpus": cpus})
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(deployment.bind(config, replicas), name=APP, route_prefix="/", blocking=False)
    wait_for_fleet(replicas)
    return board


def serve_ray(config: ServerConfig, address: str | None, replicas: int) -> None:
    """The foreground ``serve --ray`` command: deploy, the admin API, run until SIGTERM or Ctrl-C."""
    started = connect(address)
    try:
        board = deploy(config, replicas)  # noqa: F841 - held: the board lives while the command runs
        service = FleetService(config, replicas)
        if config.admin_token:
            _start_admin(service)
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=_sighup, args=(service,)).start())
        signal.signal(signal.SIGTERM, _interrupt)
        print(f"serving {config.index} on http://{config.host}:{config.port} with {replicas} Ray Serve "
              f"replica(s)", flush=True)
        while True:
            signal.pause()
    finally:
        _teardown(started)


def _interrupt(*_: Any) -> None:
    """SIGTERM ends the command as Ctrl-C does, through the teardown."""
    raise KeyboardInterrupt


def _sighup(service: FleetService) -> None:
    """The replicas follow ``current`` themselves; SIGHUP only waits for them and says so."""
    try:
        _, version = reload_service(service)
        log.warning("SIGHUP: every replica serves index version %s", version)
    except EnfPireError as exc:
        log.error("SIGHUP: %s", exc)


def _start_admin(service: FleetService) -> None:
    from waitress import create_server

    from ..api.admin import create_admin_app

    config = service.config
    admin = create_server(create_admin_app(service), host=config.admin_host, port=config.admin_port,
                          threads=2, ident="enfpire", clear_untrusted_proxy_headers=True)
    threading.Thread(target=admin.run, name="admin", daemon=True).start()
    print(f"admin API on http://{config.admin_host}:{config.admin_port}", flush=True)


def _teardown(started: bool) -> None:
    """Remove what this command deployed; a cluster it started goes entirely."""
    ray = import_ray()
    if not ray.is_initialized():
        return
    from ray import serve

    try:
        if started:
            serve.shutdown()
        else:
            serve.delete(APP)
    finally:
        if started:
            ray.shutdown()
