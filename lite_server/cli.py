"""``enfpire-server``: build and inspect indexes, serve them."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from edge_client.config import ClientConfig
from edge_client.errors import EnfPireError
from edge_client.extractor import Extractor

from .config import ServerConfig, load_config
from .index import Index, build_index


def _progress_bar(done: int, total: int) -> None:
    if done == total or done % 25 == 0:
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _build(args: argparse.Namespace) -> int:
    model = Path(args.model) if args.model else ClientConfig().model_path()
    extractor = Extractor(model, num_threads=args.threads or 0)
    index = build_index(Path(args.photos), Path(args.out), extractor,
                        Path(args.spots) if args.spots else None,
                        progress=_progress_bar if sys.stderr.isatty() else None)
    print(json.dumps(index.manifest, indent=2))
    return 0


def _info(args: argparse.Namespace) -> int:
    print(json.dumps(Index.load(args.index).manifest, indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from waitress import serve

    from .app import create_app

    config = load_config(ServerConfig, args.config, **_overrides(args))
    app = create_app(config)
    print(f"serving {config.index} on http://{config.host}:{config.port} ({config.threads} threads)", flush=True)
    serve(app, host=config.host, port=config.port, threads=config.threads, ident="enfpire",
          connection_limit=max(100, config.max_pending), clear_untrusted_proxy_headers=True)
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("index", "host", "port", "threads", "backend")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enfpire-server", description="EnfPire lookup server")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    index = sub.add_parser("index", help="build or inspect a spot index").add_subparsers(dest="action", required=True)
    p = index.add_parser("build", help="extract a folder of spot folders into an index")
    p.add_argument("--photos", required=True, help="one sub-folder per spot (folder name = spot id)")
    p.add_argument("--spots", help="CSV: first column the spot id; name, lat, lon and info columns")
    p.add_argument("--out", required=True, help="index directory (a new version is added)")
    p.add_argument("--model", help="extractor .tflite (default: the prepared model)")
    p.add_argument("--threads", type=int, help="interpreter threads")
    p.set_defaults(func=_build)
    p = index.add_parser("info", help="print an index's manifest")
    p.add_argument("index")
    p.set_defaults(func=_info)
    p = sub.add_parser("serve", help="serve an index with waitress")
    p.add_argument("--index")
    p.add_argument("--config", help="JSON config file")
    p.add_argument("--host"); p.add_argument("--port", type=int); p.add_argument("--threads", type=int)
    p.add_argument("--backend", help="sklearn | numpy | faiss | faiss-ivf")
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
