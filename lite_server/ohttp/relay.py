"""``enfpire-relay --gateway URL``: an Oblivious HTTP relay for development and tests.

It knows the phone's address but sees only sealed bytes; the gateway sees the
content but only the relay's address. So it forwards ``message/ohttp-req``
POSTs to its one gateway with nothing of the client's: no client header
crosses (only Content-Type and Content-Length are sent, none is added, no
X-Forwarded-For), and it logs counts, never addresses or bodies. Bodies are
bounded, the gateway has timeouts; errors are JSON 4xx, or 502 when the
gateway fails.

It also serves *shared copies* of what every phone must see the same of: the
gateway's key configuration (``GET /.well-known/ohttp-gateway``) and the
digest of its public document (``GET /.well-known/enfpire-public``). Each is
fetched from the gateway once for all clients and refreshed on the relay's own
timer (``--refresh`` seconds), never on a client's behalf once a copy exists, so the gateway cannot tell the fetches of
one phone from another's nor give each phone its own key or document. The identity-signed key
document (``GET /.well-known/enfpire-keys``) is forwarded as it is: the phone checks its
signature, and the key it names against the shared copy. Phones
compare them with what reached them sealed from the gateway (the consistency
check, ``docs/ohttp.md``). In production use a standard OHTTP relay service
run by another party instead (see docs/ohttp.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
import threading
import time
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
PUBLIC_PATH = "/.well-known/enfpire-public"  # the public document's digest (edge_client.protocol.public.SHARED_PATH)
MAX_ANSWER = 32 << 20
MAX_SHARED = 1 << 20  # bytes of a key configuration or public digest the relay copies
DIGEST = re.compile(r"^[0-9a-f]{64}$")
StartResponse = Callable[[str, list[tuple[str, str]]], Any]
Reply = tuple[int, str, bytes, list[tuple[str, str]]]  # status, content type, body, extra headers


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
    refresh: float = 30.0           # seconds between fetches of the shared copies (key configuration, digest)


class SharedError(Exception):
    """The gateway's answer could not be copied (unreachable, an error, not the expected content)."""


class Shared:
    """One resource of the gateway's that every client gets the same copy of.

    ``fetch`` is called by the relay's timer; a client's request only ever triggers it when
    there is no copy yet (the relay's first moments, or after the gateway failed for longer
    than ``max_age``), and then at most once a second, whoever asks. A copy older than
    ``max_age`` (the gateway has failed since) is not served.
    """

    def __init__(self, name: str, content_type: str, fetch: Callable[[], bytes], max_age: float):
        self.name, self.content_type, self.fetch, self.max_age = name, content_type, fetch, max_age
        self._copy: tuple[bytes, float] | None = None  # (body, time.monotonic() when fetched)
        self._fetching = threading.Lock()
        self._last_try = float("-inf")

    def refresh(self, if_missing: bool = False) -> bool:
        """Fetch a new copy from the gateway; False (the old copy kept) when that fails.

        ``if_missing``: only when there is no usable copy and the last try is a second old
        (a client's request: many at once cause one fetch)."""
        with self._fetching:
            if if_missing and (self._usable() or time.monotonic() - self._last_try < 1.0):
                return self._usable()
            self._last_try = time.monotonic()
            try:
                body = self.fetch()
            except SharedError as exc:
                log.warning("relay: cannot refresh the shared %s: %s", self.name, exc)
                return False
            if self._copy is None or self._copy[0] != body:
                log.info("relay: the gateway's %s is now %s", self.name, hashlib.sha256(body).hexdigest()[:16])
            self._copy = (body, time.monotonic())
        return True

    def _usable(self) -> bool:
        copy = self._copy
        return copy is not None and time.monotonic() - copy[1] <= self.max_age

    def get(self) -> tuple[bytes, float] | None:
        """(body, age in seconds) of the copy every client gets, or None when there is none."""
        if not self._usable() and not self.refresh(if_missing=True):
            return None
        copy = self._copy
        return (copy[0], time.monotonic() - copy[1]) if copy is not None else None


class Relay:
    """The WSGI application: one gateway, one connection pool, the shared copies and their timer, counters."""

    def __init__(self, config: RelayConfig):
        self.config = config
        parts = urlsplit(config.gateway)
        self.keys_url = f"{parts.scheme}://{parts.netloc}{KEYS_PATH}"
        self.signed_keys_url = f"{parts.scheme}://{parts.netloc}{SIGNED_KEYS_PATH}"
        self.public_url = f"{parts.scheme}://{parts.netloc}{PUBLIC_PATH}"
        extra = {"source_address": (config.source_address, 0)} if config.source_address else {}
        self.pool = urllib3.PoolManager(num_pools=2, maxsize=config.threads, retries=False,
                                        timeout=urllib3.Timeout(connect=3.05, read=config.timeout), **extra)
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        max_age = max(10 * config.refresh, 300.0)
        self.shared = {KEYS_PATH: Shared("key configuration", KEYS_TYPE, self._fetch_keys, max_age),
                       PUBLIC_PATH: Shared("public digest", "application/json", self._fetch_public, max_age)}
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._refresh_loop, name="relay-shared-copies", daemon=True)
        self._timer.start()

    def close(self) -> None:
        """Stop the timer (the process exiting stops it too)."""
        self._stop.set()

    def _refresh_loop(self) -> None:
        """Fetch every shared copy now, then every ``refresh`` seconds: the same moments whoever is asking."""
        while True:
            for shared in self.shared.values():
                shared.refresh()
            if self._stop.wait(self.config.refresh):
                return

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        status, content_type, body, headers = self._handle(environ)
        self._count("relayed" if status < 400 else "refused" if status < 500 else "gateway_failed")
        headers = headers or [("Cache-Control", "no-store")]
        start_response(f"{status} {_REASONS.get(status, 'Error')}",
                       [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers])
        return [body]

    def _handle(self, environ: dict[str, Any]) -> Reply:
        method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
        if method == "GET" and path in self.shared:
            return self._serve_shared(self.shared[path])
        if method == "GET" and path == SIGNED_KEYS_PATH:  # forwarded: the phone checks its signature and
            return self._forward("GET", self.signed_keys_url, None, "application/json")  # the shared copy
        if method != "POST":
            return _error(405, "method_not_allowed", f"POST {REQUEST_TYPE} here (or GET {KEYS_PATH}, {SIGNED_KEYS_PATH}, {PUBLIC_PATH})")
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

    def _serve_shared(self, shared: Shared) -> Reply:
        """The copy every client gets, with its age; 502 when the gateway has given none."""
        copy = shared.get()
        if copy is None:
            return _error(502, "bad_gateway", f"no copy of the gateway's {shared.name} (the gateway failed)")
        body, age = copy
        fresh_for = max(0, int(self.config.refresh - age))
        return 200, shared.content_type, body, [("Cache-Control", f"public, max-age={fresh_for}"),
                                                ("Age", str(int(age)))]

    def _fetch_keys(self) -> bytes:
        return self._fetch(self.keys_url, KEYS_TYPE)

    def _fetch_public(self) -> bytes:
        """The digest (and version label) of the server's public document, checked and copied as a new body."""
        try:
            public = json.loads(self._fetch(self.public_url, "application/json"))
            digest, version = public["digest"], public["index_version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SharedError(f"the gateway states no public document ({type(exc).__name__})") from None
        if not isinstance(digest, str) or not DIGEST.match(digest) or not isinstance(version, str) \
                or len(version) > 200:
            raise SharedError("the gateway states a malformed public digest")
        return json.dumps({"index_version": version, "digest": digest}, separators=(",", ":")).encode()

    def _fetch(self, url: str, expect: str) -> bytes:
        status, content_type, body, _ = self._forward("GET", url, None, expect)
        if status != 200 or content_type.split(";")[0].strip() != expect or not body or len(body) > MAX_SHARED:
            raise SharedError(f"the gateway answered {status} {content_type} ({len(body)} bytes)")
        return body

    def _forward(self, method: str, url: str, body: bytes | None, expect: str) -> Reply:
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
                (answer.status == 200 and content_type.split(";")[0].strip() != expect):
            return _error(502, "bad_gateway", f"the gateway answered {answer.status} {content_type}")
        return answer.status, content_type, content, []

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1
            total = sum(self.counts.values())
        if total % self.config.log_every == 0:
            log.info("relay: %s", dict(self.counts))


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 411: "Length Required",
            413: "Payload Too Large", 415: "Unsupported Media Type", 429: "Too Many Requests", 502: "Bad Gateway"}


def _error(status: int, code: str, message: str) -> Reply:
    return status, "application/json", json.dumps({"error": {"code": code, "message": message}}).encode(), []


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
    parser.add_argument("--refresh", type=float, default=RelayConfig.refresh,
                        help="seconds between fetches of the shared key configuration and public digest")
    parser.add_argument("-v", "--verbose", action="store_true", help="log counts (never addresses or bodies)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from waitress import create_server

    if not args.refresh > 0:
        build_parser().error("--refresh must be a positive number of seconds")
    config = RelayConfig(args.gateway, args.host, args.port, args.max_body, args.timeout, args.source_address,
                         args.threads, max(1, args.log_every), args.refresh)
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
