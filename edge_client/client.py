"""Talking to a lite_server: one Session, explicit timeouts, bounded retries,
typed errors, and a one-call facade.

    >>> from edge_client.client import recognize
    >>> recognize("photo.jpg", server="http://127.0.0.1:8080").name

The lookup is idempotent, so a POST is retried like a GET: on connection
errors and on 429/502/503/504, waiting for ``Retry-After`` (capped) or an
exponential backoff. Nothing identifies the device: a fixed User-Agent, no
cookies kept, the same headers on every request, and no string the server
chose is ever sent back (the public document is named by the digest the
phone computed). With ``relay`` set, every request is sealed for the server's
Oblivious HTTP gateway and sent through the relay instead
(``edge_client.protocol.oblivious``), so the server never sees the device's
address.

One view for everyone (``consistency``, on with a relay): before first use and
on every change, the key configuration and the public document are compared
with the *shared copies* at ``consistency_url`` (the relay's origin by default:
``enfpire-relay`` fetches them from the gateway once for all its clients, on
its own timer). The key the phone seals with must be in the shared key
configuration and in the one the gateway states inside the sealed channel
(``/v1/info``'s ``ohttp_keys``); the public document's digest, computed by the
phone, must be the shared one. A mismatch is a :class:`ConsistencyError` and
nothing that depends on the key or document is sent.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import replace
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import requests
from urllib3.exceptions import HTTPError as TransportError
from urllib3.exceptions import LocationValueError

from .config import ClientConfig, origin
from .errors import (
    BadResponseError,
    ConfigError,
    ConsistencyError,
    EnfPireError,
    IncompatibleServerError,
    ServerError,
    ServerUnreachableError,
)
from .privacy import floors, receipt
from .privacy.cache import AnswerCache
from .privacy.recognizer import Calibration, Projector, Recognition, coverage, projector, rerank
from .privacy.transforms import Cells, Transform, make_transform
from .protocol.oblivious import ObliviousTransport
from .protocol.public import SHARED_PATH, PublicError, PublicParams, PublicStore, apply_delta, parse
from .protocol.transport import Answer, DirectTransport, Transport
from .state import decoy_seed, device_secret
from .vision.extractor import Extractor
from .vision.photo import Photo

if TYPE_CHECKING:
    from .dummies.catalogue import Catalogue

log = logging.getLogger(__name__)
USER_AGENT = "enfpire-client"
RETRY_STATUSES = {429, 502, 503, 504}
PROTOCOL = 1
MAX_ANSWER = 32 << 20  # bytes; a full candidates answer is under 2 MB
DIGEST = re.compile(r"^[0-9a-f]{64}$")
#: What requests raises for a URL it cannot send to (ClientConfig refuses most of them earlier).
URL_ERRORS = (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL,
              requests.exceptions.URLRequired, LocationValueError)


class Client:
    """A device's connection to one server, with its extractor and transform."""

    def __init__(self, config: ClientConfig | None = None, extractor: Extractor | None = None,
                 transform: Transform | None = None, cache: AnswerCache | None = None):
        self.config = config or ClientConfig()
        self.extractor = extractor
        self.transform = transform or make_transform(self.config.transform, self.config.strength,
                                                     self.config.k or None)
        # The phone's own floors: every public document is checked against them before use, and the
        # decoys follow the server's popularity only as far as they allow (edge_client.privacy.floors).
        self.floors = floors.Floors.from_config(self.config)
        self.transform.max_decoy_share = self.floors.max_decoy_share
        self.transform.decoy_uniform = self.floors.decoy_uniform
        self.transform.max_decoy_cell_ratio = self.floors.max_decoy_cell_ratio
        if self.config.privacy_floor > 0:  # padded for the most groups the floor may add, on every request
            self.transform.extra_groups = self.config.privacy_floor_groups  # type: ignore[attr-defined]
        self._receipts: receipt.ReceiptModel | None = None  # the privacy receipt's model of the public document
        self.rng = np.random.default_rng(self.config.seed)
        self.session = requests.Session()
        self.session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))  # keep none
        self.session.headers.update({"User-Agent": USER_AGENT, "Accept": "application/json"})
        self._info: dict[str, Any] | None = None
        self._public: PublicParams | None = None  # the public document, kept on disk too
        self._public_checked = False  # ... and whether its digest was the shared one (consistency)
        self._keys_stated = -1  # the transport's key generation the gateway's sealed /v1/info was checked with
        self.public_store = PublicStore(public_path(self.config) if self.config.cache else None)
        self.last_public: tuple[str, int] = ("", 0)  # how the document last came: (full|delta|kept, bytes)
        self._project: Projector | None = None  # set with the server's public parameters
        self._compare_dim = 0
        self._calibration: Calibration | None = None  # open-set answers, set with the rest
        self._coverage: Callable[[np.ndarray], float] = lambda feature: 1.0
        self.cache = cache if cache is not None else self._default_cache()
        self._secret: bytes | None = None
        self._secret_lock = threading.Lock()
        self._transport: Transport | None = None  # made on first use: direct, or sealed through the relay
        self._transport_lock = threading.Lock()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    def _extractor(self) -> Extractor:
        if self.extractor is None:
            self.extractor = Extractor(self.config.model_path(), self.config.num_threads, self.config.max_pixels,
                                       reference_kernels=self.config.reference_kernels)
        return self.extractor

    def _default_cache(self) -> AnswerCache | None:
        if not self.config.cache:
            return None
        return AnswerCache(cache_path(self.config), self.config.cache_entries, self.config.cache_max_age)

    def info(self, refresh: bool = False) -> dict[str, Any]:
        """The server's ``/v1/info``, checked against this device's model (kept in the answer cache)."""
        if self._info is None or refresh:
            kept = None if refresh or self.cache is None else self.cache.info()
            if kept is not None and _is_info(kept):
                self._info = kept
                return kept
            info, _, _ = self._request("GET", "/v1/info")
            if not _is_info(info):
                raise BadResponseError("the server's /v1/info is not an EnfPire protocol 1 answer")
            self._check_stated_keys(info)
            if self.cache is not None:
                self.cache.store_info(info)
            self._info = info
        return self._info

    def check_model(self) -> dict[str, Any]:
        """Refuse a server that indexed photos with a different model: its candidates would be noise."""
        info = self.info()
        mine = self._extractor().sha256
        if info["model_sha256"] != mine:
            raise IncompatibleServerError(
                f"the server uses model {str(info['model_sha256'])[:12]}..., this device {mine[:12]}...: "
                "both must run the same extractor")
        if self._project is None:
            # A server that publishes no document (no "public" in its info) serves only vector queries.
            public = self.public() if info.get("public") else None
            basis = public.basis if public is not None else None
            project, dim = projector(basis)
            self.transform.fit(public if public is not None else {})
            self._calibration = Calibration.from_public(info.get("calibration"))
            self._coverage = coverage(public.coverage_space if public is not None else None)
            # Cells have a posterior the phone can compute from the public document; vectors have none.
            self._receipts = receipt.model_for(public.digest, self.transform, public.popularity) \
                if isinstance(self.transform, Cells) and public is not None else None
            if self.config.privacy_floor > 0 and isinstance(self.transform, Cells) and self._receipts is None:
                raise ConfigError(f"privacy_floor {self.config.privacy_floor:g} needs the privacy receipt, which this "
                                  f"phone computes for catalogues of at most {receipt.MAX_PROTOTYPES} prototypes "
                                  f"(this one publishes {len(self.transform.prototypes_)}): set privacy_floor 0")
            # Only a complete fit counts: a failure above is retried on the next call.
            self._project, self._compare_dim = project, dim or int(info["dim"])
        return info

    def public(self, _again: bool = True) -> PublicParams:
        """The public document the server's ``/v1/info`` names by its digest (``/v1/public``).

        The copy kept on disk is used while its digest (computed here) is the one ``/v1/info``
        names; otherwise the phone asks for the change since the document it holds, named by
        that digest (``?since=DIGEST``: never a label of the server's), and applies the delta
        (a delta that fails its checks, or any unusable answer, is replaced by the full
        document). Before a document is first used it must be the shared one
        (:meth:`_check_shared_public`): else :class:`ConsistencyError`, and it is not kept.

        Every document, kept, downloaded or made by a delta, is checked against this phone's
        privacy floors first: one below them raises :class:`~edge_client.errors.PrivacyFloorError`
        and is neither kept nor used, so nothing that depends on it is ever sent.
        """
        info = self.info()
        wanted = str((info.get("public") or {}).get("digest", ""))
        checking = bool(self.config.shared_origin())
        if self._public is not None and self._public.digest == wanted and (self._public_checked or not checking):
            return self._public
        kept, was_checked = (self._public, self._public_checked) if self._public is not None \
            else self.public_store.load_checked()
        if kept is not None and kept.digest == wanted:
            (doc, how), checked = (kept, ("kept", 0)), was_checked
        else:
            (doc, how), checked = self._download_public(kept), False
        floors.check(doc, self.floors)  # kept or new (the floors may have been raised since it was kept)
        if checking and not checked:
            try:
                self._check_shared_public(doc)
            except ConsistencyError:
                if not _again:
                    raise
                # The kept /v1/info may be older than the shared copy: ask once more with a fresh one.
                log.info("the public document is not the shared one: asking the server once more")
                self.info(refresh=True)
                return self.public(_again=False)
            checked = True
        if doc is not kept or checked != was_checked:  # a kept copy is not written again
            self.public_store.save(doc, checked)
        self._public, self._public_checked, self.last_public = doc, checked, how
        if doc.digest != wanted:  # the server moved on meanwhile: the info is stale too
            self._info, self._project = None, None
        return doc

    def _download_public(self, kept: PublicParams | None) -> tuple[PublicParams, tuple[str, int]]:
        """The document the server serves now, a delta on ``kept`` (named by its digest) or the whole,
        and how it came: (full|delta, bytes)."""
        if kept is not None:
            payload, _, received = self._request("GET", "/v1/public?since=" + kept.digest)
            try:
                doc = apply_delta(kept, payload) if payload.get("kind") == "delta" else parse(payload)
                return doc, (str(payload.get("kind")), received)
            except (PublicError, AttributeError) as exc:
                log.warning("the public delta is unusable (%s): downloading the whole document", exc)
        payload, _, received = self._request("GET", "/v1/public")
        return parse(payload), ("full", received)

    def _check_shared_public(self, doc: PublicParams) -> None:
        """``doc``'s digest (computed here) must be the shared one every phone is compared with.

        The shared copy comes from ``consistency_url`` (the relay's origin), read directly,
        never sealed: the relay answers it from its own copy, which it fetched from the
        server once for all its clients, so a server serving one phone its own document
        (its own cell numbering, say) is caught here before anything depends on it.
        """
        url = self.config.shared_origin() + SHARED_PATH
        answer = self._shared(url, "application/json")
        try:
            shared = json.loads(answer.content)
            digest, label = shared["digest"], str(shared.get("index_version", ""))
        except (ValueError, KeyError, TypeError):
            digest, label = None, ""
        if answer.status != 200 or not isinstance(digest, str) or not DIGEST.match(digest):
            raise ConsistencyError(f"{url} has no shared copy of the public digest ({answer.status}): "
                                   "set consistency_url to a place that serves one, or consistency off")
        if digest != doc.digest:
            raise ConsistencyError(
                f"the public document this phone got ({doc.digest[:12]}...) is not the one shared at {url} "
                f"({digest[:12]}..., {label!r}): refused, nothing sent that depends on it",
                _fresh_for(answer.headers.get("Cache-Control", "")))

    def _check_stated_keys(self, info: dict[str, Any]) -> None:
        """Through a relay: the key this phone sealed ``/v1/info`` with must be one the gateway states
        in it (``ohttp_keys``), the second path beside the shared copy (checked before first use)."""
        transport = self._transport
        if not isinstance(transport, ObliviousTransport) or not self.config.shared_origin():
            return
        generation, key = transport.generation, transport.key
        try:
            stated = transport.ohttp.decode_key_configs(bytes.fromhex(str(info["ohttp_keys"])))
        except (KeyError, ValueError, EnfPireError):
            raise ConsistencyError("the gateway's /v1/info states no usable key configuration (ohttp_keys): "
                                   "its key cannot be checked against the shared copy") from None
        if key not in stated:
            ids = ", ".join(str(c.key_id) for c in stated)
            raise ConsistencyError(f"the gateway states key configurations ({ids}) without the key "
                                   f"{key.key_id} the shared copy gave this phone: refused")
        self._keys_stated = generation

    def _shared(self, url: str, accept: str) -> Answer:
        """GET a shared copy directly (connection errors are :class:`ServerUnreachableError`)."""
        try:
            return self._send("GET", url, None, {"Accept": accept})
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise ServerUnreachableError(f"{url} did not answer: {type(exc).__name__}") from None

    def _rerank(self, feature: np.ndarray, candidates: list[dict[str, Any]]) -> Recognition:
        """The phone's pick among ``candidates``, open set: the same rule for fresh and cached answers.

        ``threshold`` when set, else the operating point ``keep`` on the server's calibration;
        a server that publishes none gets no threshold (every photo is answered).
        """
        return rerank(self._project(feature), candidates, self._compare_dim,  # type: ignore[misc]
                      self.config.threshold, self._calibration, self.config.keep, self._coverage(feature))

    def catalogue(self) -> "Catalogue":
        """The spot catalogue of the public document, for dummy requests."""
        from .dummies.catalogue import Catalogue

        return Catalogue.from_public(self.public(), int(self.info()["dim"]), self.floors.max_decoy_share,
                                     self.floors.max_decoy_cell_ratio)

    def query(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], int, int]:
        """POST one candidates request; (candidates, bytes sent, bytes received)."""
        answer, sent, received = self._post(body)
        return answer["candidates"], sent, received

    def _post(self, body: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
        answer, sent, received = self._request("POST", "/v1/candidates", body)
        if not isinstance(answer, dict) or not isinstance(answer.get("candidates"), list):
            raise BadResponseError("the server's candidates answer has no candidate list")
        return answer, sent, received

    def _keep(self, body: dict[str, Any], answer: dict[str, Any]) -> None:
        """Put a real cells answer in the cache (a dummy's never comes here)."""
        if self.cache is None or "cells" not in body:
            return
        version = self.info()["index_version"]
        if answer.get("index_version") == version:
            self.cache.store(body["cells"], str(version), answer["candidates"])
        else:  # the server moved to another index and its cells changed: refit before the next query
            self._info, self._project = None, None

    def body(self, feature: np.ndarray, real: tuple[int, ...] | None = None) -> dict[str, Any]:
        """The request body for ``feature`` (call :meth:`check_model` first).

        With ``stable_decoys`` a cells query draws its decoys from a generator
        keyed on its real cells, the day and the device secret: the same cells
        asked again make the same message, so a repeat tells the server nothing new.
        """
        return self.message(feature, real)[0]

    def message(self, feature: np.ndarray, real: tuple[int, ...] | None = None) -> tuple[dict[str, Any], int]:
        """:meth:`body`, and how many decoy groups it holds (the privacy floor may add some; 0 for a vector)."""
        real = self.transform.real_cells(feature) if real is None else real
        if real is None:
            return self.transform.transform(feature, self.rng), 0
        rng = self._decoy_rng(real)
        model, floor = self._receipts, self.config.privacy_floor
        asked: list[tuple[int, bool]] = []  # each test of the floor: (decoy groups, met)

        def enough(message: tuple[int, ...], groups: int) -> bool:
            asked.append((groups, model.plausible(message, groups) >= floor))  # type: ignore[union-attr]
            return asked[-1][1]

        body = self.transform.query(real, rng, enough if floor > 0 and model is not None else None)
        if not asked:
            return body, int(round(self.transform.strength_))
        groups, met = asked[-1]
        return body, groups if met else groups + 1  # not met: one more group was added, then the cap stopped it

    def ask(self, feature: np.ndarray) -> tuple[dict[str, Any] | None, Recognition]:
        """Transform, ask, rerank locally; also returns the body the server received
        (None when the answer cache held the photo's cells and nothing was sent)."""
        self.check_model()
        return self._ask(feature)

    def _ask(self, feature: np.ndarray) -> tuple[dict[str, Any] | None, Recognition]:
        real = self.transform.real_cells(feature)  # once: the cache and the request share them
        local = self._from_cache(feature, real)
        if local is not None:
            return None, local
        return self._from_server(feature, real)

    def ask_server(self, feature: np.ndarray) -> tuple[dict[str, Any], Recognition]:
        """Like :meth:`ask` without looking in the cache first (the answer still goes into it)."""
        self.check_model()
        return self._from_server(feature, self.transform.real_cells(feature))

    def _from_server(self, feature: np.ndarray, real: tuple[int, ...] | None) -> tuple[dict[str, Any], Recognition]:
        body, groups = self.message(feature, real)
        answer, sent, received = self._post(body)
        self._keep(body, answer)
        result = self._rerank(feature, answer["candidates"])
        return body, replace(result, bytes_sent=sent, bytes_received=received,
                             privacy=self._receipt(body, groups, result.spot_id))

    def _receipt(self, body: dict[str, Any], groups: int, answer: str | None) -> dict[str, Any] | None:
        """The privacy receipt of the message ``body`` (None for a vector query): computed here, never sent."""
        model, doc = self._receipts, self._public
        if model is None or doc is None or "cells" not in body:
            return None
        rows = np.flatnonzero(doc.ids == answer) if answer is not None else []
        out = model.receipt(tuple(body["cells"]), int(rows[0]) if len(rows) else None, groups)
        floor = self.config.privacy_floor
        if floor > 0:
            out.update(privacy_floor=floor, floor_reached=out["plausible_spots"] >= floor, decoy_groups=groups)
            if not out["floor_reached"]:
                log.warning("privacy floor not reached: %.1f plausible spots of the %g asked for with %d decoy groups "
                            "(privacy_floor_groups caps them)", out["plausible_spots"], floor, groups)
        return out

    def answer_locally(self, feature: np.ndarray) -> Recognition | None:
        """The answer from the cache when it holds this photo's best cell, else None (ask the server)."""
        self.check_model()
        return self._from_cache(feature, self.transform.real_cells(feature))

    def _from_cache(self, feature: np.ndarray, real: tuple[int, ...] | None) -> Recognition | None:
        if real is None or self.cache is None:
            return None
        kept = self.cache.answer(real, str(self.info()["index_version"]))
        if kept is None:
            return None
        log.debug("answered from the cache: no request")
        return replace(self._rerank(feature, kept), privacy=dict(receipt.NOT_SENT))

    def clear_cache(self) -> None:
        """Forget every kept answer and the kept ``/v1/info`` of this server."""
        if self.cache is not None:
            self.cache.clear()
        self._info = None

    def _decoy_rng(self, real: tuple[int, ...]) -> np.random.Generator:
        """The generator of a cells query's decoys: keyed on its real cells, the day and the
        device secret with ``stable_decoys``, else the phone's own."""
        if not self.config.stable_decoys:
            return self.rng
        # A seeded phone (tests, the evaluation) lives on day 0: its seed fixes every draw, so a
        # figure measured today is measured again tomorrow.
        now = 0.0 if self.config.seed is not None else None
        return np.random.default_rng(decoy_seed(self._device_secret(), real, now))

    def _device_secret(self) -> bytes:
        with self._secret_lock:  # a burst's requests are made on several threads at once
            if self._secret is None:
                if self.config.seed is not None:  # a seed fixes every draw: tests and the evaluation
                    self._secret = hashlib.sha256(f"enfpire-seed-{self.config.seed}".encode()).digest()
                else:
                    self._secret = device_secret(self.config.state_path(), self.config.secret_days)
            return self._secret

    def recognize_feature(self, feature: np.ndarray) -> Recognition:
        """Transform, ask, rerank locally."""
        return self.ask(feature)[1]

    def recognize(self, photo: Photo) -> Recognition:
        """Which spot is in ``photo``: extract, transform, ask, rerank locally.

        The model is checked against the server's once, before the (slow) extraction.
        """
        self.check_model()
        return self._ask(self._extractor().extract(photo))[1]

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[Any, int, int]:
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        for attempt in range(self.config.retries + 1):
            last = attempt == self.config.retries
            try:
                answer = self._exchange(method, path, data)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if last:
                    target = self.config.relay or self.config.server.rstrip("/") + path
                    raise ServerUnreachableError(f"{target} did not answer: {type(exc).__name__}") from None
                self._wait(attempt, None)
                continue
            if answer.status in RETRY_STATUSES and not last:
                self._wait(attempt, answer.headers.get("Retry-After"))
                continue
            return self._decode(answer, path), answer.sent, answer.received
        raise AssertionError("unreachable")  # the loop always returns or raises

    def _exchange(self, method: str, path: str, data: bytes | None) -> Answer:
        """Directly to the server, or sealed through the relay when one is configured (never a fallback)."""
        with self._transport_lock:  # the dummy scheduler sends from its own threads
            if self._transport is None:
                self._transport = (ObliviousTransport(self.config, self._send) if self.config.relay
                                   else DirectTransport(self.config.server, self._send))
        transport = self._transport
        if isinstance(transport, ObliviousTransport) and path != "/v1/info" and self.config.shared_origin() \
                and transport.generation != self._keys_stated:
            self.info(refresh=True)  # a new key: the gateway states its keys (sealed) before anything else goes
        return transport.exchange(method, path, data)

    def _send(self, method: str, url: str, data: bytes | None, headers: dict[str, str]) -> Answer:
        try:
            response = self.session.request(method, url, data=data, headers=headers, stream=True,
                                            timeout=(self.config.connect_timeout, self.config.read_timeout))
        except URL_ERRORS as exc:
            raise _url_error(self.session, url, exc) from None
        except requests.TooManyRedirects:
            raise BadResponseError(f"{url} redirects without end") from None
        content = _read_answer(response, self.config.read_timeout)
        return Answer(response.status_code, response.headers, content, response.reason or "",
                      _sent_bytes(response), _received_bytes(response, content))

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        delay = self.config.backoff * (2 ** attempt)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        time.sleep(min(delay, self.config.max_retry_after))

    @staticmethod
    def _decode(answer: Answer, path: str) -> Any:
        try:
            payload = json.loads(answer.content)
        except ValueError:
            payload = None
        if answer.status >= 400:
            error = payload.get("error", {}) if isinstance(payload, dict) else {}
            error = error if isinstance(error, dict) else {}
            retry = answer.headers.get("Retry-After")
            raise ServerError(answer.status, str(error.get("code", "http_error")),
                              str(error.get("message", answer.reason)),
                              float(retry) if retry and retry.replace(".", "", 1).isdigit() else None)
        if payload is None:
            raise BadResponseError(f"the server's answer to {path} is not JSON")
        return payload


def _fresh_for(cache_control: str) -> float | None:
    """``max-age`` of a shared copy: when it is due for a refresh (None when not said)."""
    match = re.search(r"max-age=(\d+)", cache_control)
    return float(match.group(1)) if match else None


def cache_path(config: ClientConfig) -> Path:
    """The answer cache file of ``config.server`` (one per server, under the state folder)."""
    name = hashlib.sha256(config.server.rstrip("/").encode()).hexdigest()[:16]
    return config.state_path() / "cache" / f"{name}.json.gz"


def public_path(config: ClientConfig) -> Path:
    """The kept public document of ``config.server``, beside its answer cache."""
    return cache_path(config).with_suffix("").with_suffix(".public.json.gz")


def clear_caches(config: ClientConfig, every_server: bool = False) -> int:
    """Delete the answer cache and public document of ``config.server`` (``every_server``: all of
    them); how many files went."""
    files = sorted((config.state_path() / "cache").glob("*.json.gz")) if every_server \
        else [cache_path(config), public_path(config)]
    removed = 0
    for path in files:
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def _url_error(session: requests.Session, url: str, exc: Exception) -> Exception:
    """A typed error for a URL requests refused: this device's setting (:class:`ConfigError`), or a
    redirect the server sent to somewhere that cannot be followed (:class:`BadResponseError`)."""
    if isinstance(exc, requests.exceptions.InvalidProxyURL):
        return ConfigError(f"the proxy for {url} (HTTP_PROXY, HTTPS_PROXY) is not a valid URL: {exc}")
    try:
        origin(url)
        session.get_adapter(requests.Request("GET", url).prepare().url or "")
    except (ConfigError, *URL_ERRORS):
        return ConfigError(f"cannot send a request to {url!r}: {exc}")
    return BadResponseError(f"{url} redirected to a URL that cannot be followed: {exc}")


def _is_info(info: Any) -> bool:
    return isinstance(info, dict) and info.get("protocol") == PROTOCOL and "model_sha256" in info \
        and "index_version" in info


def _read_answer(response: requests.Response, budget: float) -> bytes:
    """The whole body within ``budget`` seconds and :data:`MAX_ANSWER` bytes.

    requests' read timeout bounds each socket read, not the answer: a server
    dripping a byte at a time, or sending without end, would hold the device
    forever. ``read1`` returns after one socket read, so the deadline is
    checked as bytes arrive (urllib3 < 2 lacks it and falls back to ``read``).
    """
    deadline = time.monotonic() + budget
    read = getattr(response.raw, "read1", None) or response.raw.read
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := read(1 << 16, decode_content=True):
            size += len(chunk)
            if size > MAX_ANSWER:
                raise BadResponseError(f"the server's answer is larger than {MAX_ANSWER} bytes")
            if time.monotonic() > deadline:
                raise requests.Timeout(f"the answer took longer than {budget} s")
            chunks.append(chunk)
    except TransportError as exc:
        raise requests.ConnectionError(str(exc)) from None
    finally:
        response.close()
    return b"".join(chunks)


def _headers_size(headers: Any) -> int:
    return sum(len(k) + len(str(v)) + 4 for k, v in headers.items())


def _sent_bytes(response: requests.Response) -> int:
    request = response.request
    return len(request.body or b"") + _headers_size(request.headers) + len(request.method or "") + \
        len(request.path_url) + 12


def _received_bytes(response: requests.Response, content: bytes = b"") -> int:
    """Bytes on the wire: Content-Length is the compressed size when the answer was gzipped."""
    length = response.headers.get("Content-Length", "")
    body = int(length) if length.isdigit() else len(content)
    return body + _headers_size(response.headers) + 17


def recognize(photo: Photo, server: str | None = None, **settings: Any) -> Recognition:
    """One call: recognize ``photo`` against ``server`` with the default settings.

    ``settings`` are :class:`~edge_client.config.ClientConfig` fields.
    """
    from .config import load_config

    config = load_config(ClientConfig, server=server, **settings)
    with Client(config) as client:
        return client.recognize(photo)
