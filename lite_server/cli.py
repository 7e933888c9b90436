"""``enfpire-server``: build and inspect indexes, serve them."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from edge_client.config import ClientConfig
from edge_client.errors import ConfigError, EnfPireError
from edge_client.vision.extractor import Extractor

from .api.updates import add_spots, reload_service, remove_spots
from .config import ServerConfig, load_config
from .index.store import ExtractFn, Index, build_index

log = logging.getLogger(__name__)


def _progress_bar(done: int, total: int) -> None:
    if done == total or done % 25 == 0:
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _build(args: argparse.Namespace) -> int:
    with _extraction(args) as extract:
        index = build_index(Path(args.photos), Path(args.out), _extractor(args), Path(args.spots) if args.spots else None,
                            progress=_progress_bar if sys.stderr.isatty() else None, extract=extract)
    print(json.dumps(index.manifest, indent=2))
    return 0


def _add(args: argparse.Namespace) -> int:
    with _extraction(args) as extract:
        index = add_spots(Path(args.index), Path(args.photos), _extractor(args), Path(args.spots) if args.spots else None,
                          progress=_progress_bar if sys.stderr.isatty() else None, extract=extract)
    print(json.dumps(index.manifest, indent=2))
    return 0


def _extractor(args: argparse.Namespace) -> Extractor:
    """The driver's extractor: it extracts a local build; for a Ray build it names the model and its dim."""
    model = load_config(ClientConfig, model=args.model).model_path()
    return Extractor(model, num_threads=(args.threads or 0) if args.ray is None else 1)


@contextmanager
def _extraction(args: argparse.Namespace) -> Iterator[ExtractFn | None]:
    """``None`` (extract in this process), or with ``--ray`` the Ray extraction, connected to its cluster."""
    if args.ray is None:
        yield None
        return
    from .fleet.build import RayExtraction
    from .fleet.cluster import cluster

    with cluster(args.ray or None):
        yield RayExtraction(workers=args.workers or 0, threads=args.threads or 1, batch_size=args.batch_size)


def _remove(args: argparse.Namespace) -> int:
    print(json.dumps(remove_spots(Path(args.index), args.ids).manifest, indent=2))
    return 0


def _info(args: argparse.Namespace) -> int:
    print(json.dumps(Index.load(args.index).manifest, indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Lookup on ``host:port``; the admin API (only with a token) on its own loopback listener.

    Waitress gets ``threads + max_pending + HEADROOM`` threads: ``threads`` do
    lookups, ``max_pending`` wait for one, the rest answer 503s and health
    checks at once (see ``lite_server.api.admission``). SIGHUP reloads the index.
    """
    from waitress import create_server

    from .api.admin import check_token, create_admin_app
    from .api.admission import HEADROOM
    from .api.app import EXTENSION, create_app

    config = load_config(ServerConfig, args.config, **_overrides(args))
    check_token(config)
    if args.ray is not None:
        from .fleet.serve import serve_ray

        serve_ray(config, args.ray or None, args.replicas)
        return 0
    app = create_app(config)
    service = app.extensions[EXTENSION]
    threads = config.threads + config.max_pending + HEADROOM
    server = create_server(app, host=config.host, port=config.port, threads=threads, ident="enfpire",
                           connection_limit=max(100, 2 * threads), clear_untrusted_proxy_headers=True)
    if config.admin_token:
        admin = create_server(create_admin_app(service), host=config.admin_host, port=config.admin_port,
                              threads=2, ident="enfpire", clear_untrusted_proxy_headers=True)
        threading.Thread(target=admin.run, name="admin", daemon=True).start()
        print(f"admin API on http://{config.admin_host}:{config.admin_port}", flush=True)
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=_reload, args=(service,)).start())
    print(f"serving {config.index} on http://{config.host}:{config.port} ({config.threads} threads)", flush=True)
    server.run()
    return 0


def _reload(service: Any) -> None:
    """SIGHUP: switch to the index directory's current version; a bad one keeps the old serving."""
    try:
        switched, version = reload_service(service)
        log.warning("SIGHUP: %s index version %s", "switched to" if switched else "already serving", version)
    except EnfPireError as exc:
        log.error("SIGHUP: reload failed, still serving the old version: %s", exc)


def _ohttp_settings(args: argparse.Namespace) -> tuple[Path, ServerConfig]:
    """The key file an ``ohttp`` command works on, and the settings (grace) it honours."""
    from .ohttp.gateway import keys_path

    config = load_config(ServerConfig, args.config, **_overrides(args))
    path = keys_path(config)
    if path is None:
        raise ConfigError("no OHTTP key file: give --index or --keys (ohttp_keys)")
    return path, config


def _ohttp_show(args: argparse.Namespace) -> int:
    """What a phone pins: the server's identity (``server_identity``), and the key configurations
    with their sha256 (``gateway_keys``; retired by the next rotation)."""
    import hashlib

    from edge_client.protocol.ohttp import decode_key_configs

    from .ohttp.keys import GatewayKeys

    path, config = _ohttp_settings(args)
    keys = GatewayKeys(path, config.ohttp_grace)
    body = keys.body()
    print(json.dumps({"file": str(path), "server_identity": keys.identity.public_hex,
                      "key_ids": [c.key_id for c in decode_key_configs(body)],
                      "application_ohttp_keys_hex": body.hex(), "sha256": hashlib.sha256(body).hexdigest()}, indent=2))
    return 0


def _ohttp_rotate(args: argparse.Namespace) -> int:
    from .ohttp.keys import rotate

    path, config = _ohttp_settings(args)
    key_id = rotate(path, config.ohttp_grace)
    print(f"key id {key_id} is current in {path}, the next one announced; running servers pick it up on their "
          f"next request, and phones that pinned the server identity follow it")
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("index", "host", "port", "threads", "backend", "log_peers", "ohttp_keys")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _ray_build_flags(parser: argparse.ArgumentParser) -> None:
    from .fleet.build import BATCH

    parser.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                        help="extract on a Ray cluster: ADDRESS (auto, host:port, ray://...) or, without one, "
                             "a local cluster started for this build (the ray extra)")
    parser.add_argument("--workers", type=int, help="Ray worker actors (default: one per cluster CPU)")
    parser.add_argument("--batch-size", type=int, default=BATCH, help=f"photos per Ray batch (default {BATCH})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enfpire-server", description="EnfPire lookup server")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    index = sub.add_parser("index", help="build or inspect a spot index").add_subparsers(dest="action", required=True)
    p = index.add_parser("build", help="extract a folder of spot folders into an index")
    p.add_argument("--photos", required=True, help="one sub-folder per spot (folder name = spot id)")
    p.add_argument("--spots", help="CSV: first column the spot id; name, lat, lon and info columns")
    p.add_argument("--out", required=True, help="index directory (a new version is added)")
    p.add_argument("--model", help="extractor .tflite or registered model name (default: the prepared model)")
    p.add_argument("--threads", type=int, help="interpreter threads (per Ray worker with --ray)")
    _ray_build_flags(p)
    p.set_defaults(func=_build)
    p = index.add_parser("add", help="add spots or photos: a new version beside the old, swapped atomically")
    p.add_argument("index", help="index directory")
    p.add_argument("--photos", required=True, help="one sub-folder per spot; known spots gain photos")
    p.add_argument("--spots", help="CSV of spot metadata (as for build)")
    p.add_argument("--model", help="extractor .tflite (must be the index's model)")
    p.add_argument("--threads", type=int, help="interpreter threads (per Ray worker with --ray)")
    _ray_build_flags(p)
    p.set_defaults(func=_add)
    p = index.add_parser("remove", help="remove spots and their photos (new version, atomic swap)")
    p.add_argument("index", help="index directory")
    p.add_argument("ids", nargs="+", help="spot ids")
    p.set_defaults(func=_remove)
    p = index.add_parser("info", help="print an index's manifest")
    p.add_argument("index")
    p.set_defaults(func=_info)
    ohttp = sub.add_parser("ohttp", help="the Oblivious HTTP gateway's keys").add_subparsers(dest="action", required=True)
    for name, func, text in (("show", _ohttp_show, "print the server identity and key configurations (to pin)"),
                             ("rotate", _ohttp_rotate,
                              "the announced key becomes current; the old one stays valid for ohttp_grace")):
        p = ohttp.add_parser(name, help=text)
        p.add_argument("--index", help="index directory (keys beside it)")
        p.add_argument("--keys", dest="ohttp_keys", help="the key file itself")
        p.add_argument("--config", help="JSON config file")
        p.set_defaults(func=func)
    p = sub.add_parser("serve", help="serve an index with waitress, or on Ray Serve with --ray")
    p.add_argument("--index")
    p.add_argument("--config", help="JSON config file")
    p.add_argument("--host"); p.add_argument("--port", type=int); p.add_argument("--threads", type=int)
    p.add_argument("--backend", help="sklearn | numpy | faiss | faiss-ivf")
    p.add_argument("--log-peers", action="store_const", const=True,
                   help="log each request's peer address (with -v): what the server sees")
    p.add_argument("--ohttp-keys", help="OHTTP key file (default <index>/ohttp-keys.json; 'off' = no gateway)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="serve on Ray Serve: join the cluster at ADDRESS (auto, host:port, ray://...) or, without "
                        "one, start a local cluster (the ray extra); the lookup port is Ray's HTTP proxy")
    p.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas of the app (with --ray; default 2)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    p.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except EnfPireError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
