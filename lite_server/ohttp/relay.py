"""``enfpire-relay --gateway URL``: an Oblivious HTTP relay for development and tests.

It knows the phone's address but sees only sealed bytes; the gateway sees the
content but only the relay's address. So it forwards ``message/ohttp-req``
POSTs (and ``GET /.well-known/ohttp-gateway`` and ``/.well-known/enfpire-keys``, the
same public documents for everyone) to its one gateway with nothing of the client's: no client header
crosses (only Content-Type and Content-Length are sent, none is added, no
X-Forwarded-For), and it logs counts, never addresses or bodies. Bodies are
bounded, the gateway has timeouts; errors are JSON 4xx, or 502 when the
gateway fails. In production use a standard OHTTP relay service run by
another party instead (see the README).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

import urllib3
from urllib3.util import SKIP_HEADER

log = logging.getLogger(__name__)
REQUEST_TYPE, RESPONSE_TYPE, KEYS_TYPE = "message/ohttp-req", "message/ohttp-res", "application/ohttp-keys"
KEYS_PATH = "/.well-known/ohttp-gateway"
SIGNED_KEYS_PATH = "/.well-known/enfpire-keys"  # the key configurations signed by the server's identity
MAX_ANSWER = 32 << 20
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


@dataclass(frozen=True)
class RelayConfig:
    """The relay's settings (flags only: it is a development tool, not a service to configure)."""

    gateway: str                    # the gateway's POST URL, e.g. http://127.0.0.1:8080/ohttp
    host: str = "127.0.0.1"
    port: int = 8090
    max_body: int = 1 << 20         # bytes of an encapsulated request; more gets 413
    timeout: float = 15.0           # seconds for the gateway's answer (beyond its own queue timeout)
    source_address: str = ""        # bind outgoing connections to this address ("" = the system's choice)
    threads: int = 8
    log_every: int = 100            # log the counters every this many requests


class Relay:
    """The WSGI application: one gateway, one connection pool, counters."""

    def __init__(self, config: RelayConfig):
        self.config = config
        parts = urlsplit(config.gateway)
        self.keys_url = f"{parts.scheme}://{parts.netloc}{KEYS_PATH}"
        self.signed_keys_url = f"{parts.scheme}://{parts.netloc}{SIGNED_KEYS_PATH}"
        extra = {"source_address": (config.source_address, 0)} if config.source_address else {}
        self.pool = urllib3.PoolManager(num_pools=2, maxsize=config.threads, retries=False,
                                        timeout=urllib3.Timeout(connect=3.05, read=config.timeout), **extra)
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        status, content_type, body = self._handle(environ)
        self._count("relayed" if status < 400 else "refused" if status < 500 else "gateway_failed")
        start_response(f"{status} {_REASONS.get(status, 'Error')}",
                       [("Content-Type", content_type), ("Content-Length", str(len(body))),
                        ("Cache-Control", "no-store")])
        return [body]

    def _handle(self, environ: dict[str, Any]) -> tuple[int, str, bytes]:
        method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
        if method == "GET" and path == KEYS_PATH:
            return self._forward("GET", self.keys_url, None, KEYS_TYPE)
        if method == "GET" and path == SIGNED_KEYS_PATH:
            return self._forward("GET", self.signed_keys_url, None, "application/json")
        if method != "POST":
            return _error(405, "method_not_allowed", f"POST {REQUEST_TYPE} here (or GET {KEYS_PATH})")
        if environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower() != REQUEST_TYPE:
            return _error(415, "unsupported_media_type", f"send {REQUEST_TYPE}")
        length = environ.get("CONTENT_LENGTH") or ""
        if not length.isdigit():
            return _error(411, "length_required", "send a Content-Length")
        if int(length) > self.config.max_body:
            return _error(413, "request_entity_too_large", f"at most {self.config.max_body} bytes")
        body = environ["wsgi.input"].read(int(length))
        if len(body) != int(length):
            return _error(400, "bad_request", "the body is shorter than its Content-Length")
        return self._forward("POST", self.config.gateway, body, RESPONSE_TYPE)

    def _forward(self, method: str, url: str, body: bytes | None, expect: str) -> tuple[int, str, bytes]:
        """Send with only Content-Type and Content-Length; pass 2xx/4xx back, anything else is 502."""
        headers = {"User-Agent": SKIP_HEADER, "Accept-Encoding": SKIP_HEADER}
        if body is not None:
            headers["Content-Type"] = REQUEST_TYPE
        try:
            answer = self.pool.request(method, url, body=body, headers=headers, preload_content=False,
                                       redirect=False, decode_content=False)
            try:
                content = answer.read(MAX_ANSWER + 1)
            finally:
                answer.release_conn()
        except urllib3.exceptions.HTTPError as exc:
            return _error(502, "bad_gateway", f"the gateway did not answer ({type(exc).__name__})")
        content_type = answer.headers.get("Content-Type", "")
        if len(content) > MAX_ANSWER or answer.status >= 500 or answer.status < 200 or \
                (answer.status == 200 and content_type != expect):
            return _error(502, "bad_gateway", f"the gateway answered {answer.status} {content_type}")
        return answer.status, content_type, content

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1
            total = sum(self.counts.values())
        if total % self.config.log_every == 0:
            log.info("relay: %s", dict(self.counts))


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 411: "Length Required",
            413: "Payload Too Large", 415: "Unsupported Media Type", 429: "Too Many Requests", 502: "Bad Gateway"}


def _error(status: int, code: str, message: str) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps({"error": {"code": code, "message": message}}).encode()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enfpire-relay", description="Oblivious HTTP relay (development)")
    parser.add_argument("--gateway", required=True, help="the gateway URL, e.g. http://127.0.0.1:8080/ohttp")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--max-body", type=int, default=RelayConfig.max_body)
    parser.add_argument("--timeout", type=float, default=RelayConfig.timeout)
    parser.add_argument("--source-address", default="", help="bind connections to the gateway to this address")
    parser.add_argument("--threads", type=int, default=RelayConfig.threads)
    parser.add_argument("--log-every", type=int, default=RelayConfig.log_every, help="log counts every N requests")
    parser.add_argument("-v", "--verbose", action="store_true", help="log counts (never addresses or bodies)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from waitress import create_server

    config = RelayConfig(args.gateway, args.host, args.port, args.max_body, args.timeout, args.source_address,
                         args.threads, max(1, args.log_every))
    # waitress keeps no access log; clear_untrusted_proxy_headers drops any X-Forwarded-* a client sends.
    server = create_server(Relay(config), host=config.host, port=config.port, threads=config.threads,
                           ident="enfpire-relay", clear_untrusted_proxy_headers=True)
    print(f"relaying http://{config.host}:{config.port}/ to {config.gateway}", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
