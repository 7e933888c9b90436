"""Simulated tourists and the traffic a server records from their phones.

The itinerary model here is deliberately *not* the personas' model
(edge_client.dummies.personas): a tourist picks a handful of popular spots around a
random starting point, visits them in nearest-neighbour order, takes a few
photos at each (real QUERY photos of that spot, never gallery photos) and
drives or walks in between at its own speeds. Each tourist's phone runs the
real client, scheduler and transform against the real server code
in-process, on a simulated clock; a WSGI middleware records what the server
sees: arrival time, body and the device (one link per phone, as an address
would give).
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from edge_client.client import Client
from edge_client.config import ClientConfig
from edge_client.dummies.catalogue import Catalogue
from edge_client.dummies.plans import Generator
from edge_client.dummies.scheduler import DummyScheduler, ManualClock, Sent
from edge_client.privacy.cache import AnswerCache
from edge_client.privacy.recognizer import Recognition
from edge_client.privacy.transforms import Transform
from tools.evaluate.testbed import Env
from tools.inprocess import mount

log = logging.getLogger(__name__)
DAY0 = 1_717_200_000.0  # 2024-06-01 00:00 UTC; simulated clocks run in UTC (utc_offset 0)


@dataclass(frozen=True)
class Shot:
    """One real photo of a tour: when, which spot (catalogue row), which query photo (dataset row)."""

    t: float
    spot: int
    row: int


@dataclass
class Request:
    """One request as recorded by the server, with the evaluation's ground truth beside it."""

    device: int
    t: float
    body: dict[str, Any]
    real: bool = False
    spot: str | None = None      # the true spot of a real request, the pretended one of a dummy
    persona: int | None = None
    bytes: int = 0


def tour(rng: np.random.Generator, catalogue: Catalogue, photos: dict[int, list[int]], day: int) -> list[Shot]:
    """One day of one tourist (see the module docstring)."""
    rows = np.array(sorted(photos))
    seed = int(rng.choice(rows, p=_norm(catalogue.popularity[rows])))
    near = rows[np.argsort(catalogue.distances_from(seed)[rows])][:20]
    stops = set(rng.choice(near, size=min(len(near), int(rng.integers(3, 9))), replace=False,
                           p=_norm(catalogue.popularity[near]) if len(near) > 1 else None).tolist()) | {seed}
    t = DAY0 + day * 86400 + 9 * 3600 + rng.uniform(0, 5400)
    shots, here, left = [], seed, stops - {seed}
    while True:
        for _ in range(1 + rng.poisson(1.2)):
            shots.append(Shot(t, here, int(rng.choice(photos[here]))))
            t += 20 + rng.exponential(120)
        t += rng.uniform(120, 1200)
        if not left:
            return shots
        nxt = min(left, key=lambda s: catalogue.distances_from(here)[s])
        km = float(catalogue.distances_from(here)[nxt])
        t += (km / 5.0 * 3600 if km < 2 else 300 + km / 50.0 * 3600) * rng.uniform(1.0, 1.3)
        if t > DAY0 + day * 86400 + 19.5 * 3600:
            return shots
        here, left = nxt, left - {nxt}


def _norm(w: np.ndarray) -> np.ndarray:
    return w / w.sum()


class Recorder:
    """WSGI middleware: keeps every candidates request the server receives, with the time
    of the simulated clock and the device currently talking (the server's link)."""

    def __init__(self, wsgi_app: Any):
        self.wsgi_app = wsgi_app
        self.clock: Callable[[], float] = lambda: 0.0
        self.device = -1
        self.requests: list[Request] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") == "/v1/candidates" and environ.get("REQUEST_METHOD") == "POST":
            raw = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = io.BytesIO(raw)
            self.requests.append(Request(self.device, self.clock(), json.loads(raw)))
        return self.wsgi_app(environ, start_response)


@dataclass
class Traffic:
    """Everything one simulated population produced."""

    requests: list[Request] = field(default_factory=list)
    results: list[tuple[int, str, Recognition | None]] = field(default_factory=list)  # device, truth, answer
    bytes_real: int = 0
    bytes_dummy: int = 0


def simulate(env: Env, recorder: Recorder, tours: list[list[Shot]], catalogue: Catalogue,
             make_generator: Callable[[int], Generator | None], transform: Transform, dummies: int,
             window: float, per_hour: int, seed: int) -> Traffic:
    """Run every tour's phone (one after another) and align the server's records with the truth."""
    traffic = Traffic()
    for device, shots in enumerate(tours):
        start = len(recorder.requests)
        clock = ManualClock(shots[0].t - 60)
        recorder.clock, recorder.device = clock, device
        sent: list[Sent] = []
        # Every default defence on: an answer cache of its own (in memory) and stable decoys.
        config = ClientConfig(seed=seed + device, state_dir=env.phone_state)  # never the user's ~/.enfpire
        client = Client(config, env.extractor, transform, AnswerCache(None))
        client.config = dataclasses.replace(config, server=mount(client.session, env.app))
        bytes_before = _bytes_counter(client)
        scheduler = DummyScheduler(client, make_generator(device), dummies=dummies, per_hour=per_hour,
                                   window=window, clock=clock, on_sent=sent.append)
        futures = []
        for shot in shots:
            scheduler.run_until(shot.t, clock.sleep)
            future = scheduler.submit(env.features[shot.row])
            futures.append((catalogue.ids[shot.spot], future, future.done()))  # done at once: from the cache
        while (due := scheduler.next_due()) is not None:
            scheduler.run_until(due, clock.sleep)
        client.close()
        mine = recorder.requests[start:]
        if len(mine) != len(sent) or any(abs(r.t - s.time) > 1e-6 for r, s in zip(mine, sent)):
            raise RuntimeError("the server's records do not line up with what the phone sent")
        for request, s, size in zip(mine, sent, bytes_before()):
            request.real, request.spot, request.persona, request.bytes = s.kind == "real", s.spot_id, s.persona, size
        truths = iter(spot for spot, _, local in futures if not local)
        for request in mine:
            if request.real:
                request.spot = next(truths)
        for spot, future, _ in futures:
            traffic.results.append((device, spot, future.result() if future.done() and not future.exception() else None))
        traffic.requests += mine
        log.info("device %d: %d real and %d dummy requests", device, sum(r.real for r in mine),
                 sum(not r.real for r in mine))
    traffic.bytes_real = sum(r.bytes for r in traffic.requests if r.real)
    traffic.bytes_dummy = sum(r.bytes for r in traffic.requests if not r.real)
    return traffic


def _bytes_counter(client: Client) -> Callable[[], list[int]]:
    """Bytes on the wire per candidates request of ``client``, in order (a response hook)."""
    from edge_client.client import _received_bytes, _sent_bytes

    sizes: list[int] = []

    def hook(response: Any, *args: Any, **kwargs: Any) -> Any:
        if response.request.path_url == "/v1/candidates":
            sizes.append(_sent_bytes(response) + _received_bytes(response))
        return response

    client.session.hooks["response"].append(hook)
    return lambda: sizes

