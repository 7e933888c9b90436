"""The evaluation testbed: a dataset, its query/gallery split, cached features,
the served index, and phones that talk to it through the real client code.

Shared by the privacy evaluation (``tools.evaluate.cli``), the linked-photo
evaluation (``tools.evaluate.linked``) and the dummy-request evaluation
(``tools.evaluate.history``, ``tools.evaluate.tours``).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.client import Client
from edge_client.config import ClientConfig
from edge_client.config import load_config as load_client_config
from edge_client.privacy.cache import AnswerCache
from edge_client.privacy.recognizer import VOTE_TEMPERATURE
from edge_client.privacy.transforms import Transform, make_transform
from edge_client.protocol import wire
from edge_client.vision.extractor import Extractor, l2_normalize
from lite_server.api.app import create_app
from lite_server.config import ServerConfig, load_config
from lite_server.index.store import BadIndexError, Index
from lite_server.search.lookup import Lookup
from tools import dataset as ds
from tools.evaluate import attackers as atk
from tools.inprocess import mount


@dataclass
class Env:
    """Everything one evaluation run shares: data, split, features, the served index."""

    data: ds.Dataset
    gallery: np.ndarray
    queries: np.ndarray
    left_out: int
    features: np.ndarray
    extractor: Extractor
    index: Index
    lookup: Lookup
    server_url: str | None = None
    #: ClientConfig fields every phone of the run gets (e.g. its privacy floors), over the defaults.
    client_settings: dict[str, Any] = field(default_factory=dict)
    cache_dir: Path = ds.CACHE      # features and indexes; other datasets' features too
    state_dir: Path | None = None   # the phones' answer caches and public documents (never ~/.enfpire)

    @property
    def truth(self) -> np.ndarray:
        """Each query's spot as a row of ``index.spots``."""
        rows = {s.id: i for i, s in enumerate(self.index.spots)}
        return np.array([rows[self.data.photos[q][0]] for q in self.queries])

    def client(self, transform: Transform, seed: int, cache: AnswerCache | None = None,
               stable_decoys: bool = True) -> Client:
        """A phone with ``transform`` on the evaluated server; without ``cache`` it keeps no
        answers, as every single query is another phone's."""
        config = load_client_config(ClientConfig, env={}, **{
            **self.client_settings, "server": self.server_url or ClientConfig.server, "seed": seed,
            "cache": cache is not None, "stable_decoys": stable_decoys, "state_dir": self.phone_state})
        client = Client(config, self.extractor, transform, cache)
        if not self.server_url:
            client.config = dataclasses.replace(config, server=mount(client.session, self.app))
        return client

    @property
    def phone_state(self) -> str:
        """The phones' ``state_dir``: the evaluation's own, so a real client's files on this
        machine (under the default server URL's slot of ``~/.enfpire``) are never touched."""
        return str(self.state_dir or self.cache_dir / "eval-state")

    @property
    def info(self) -> dict[str, Any]:
        """The evaluated server's ``/v1/info``, fetched once (phones that start with it need not ask)."""
        if not hasattr(self, "_info"):
            if self.server_url:
                import requests

                self._info = requests.get(self.server_url + "/v1/info", timeout=30).json()
            else:
                self._info = self.app.test_client().get("/v1/info").get_json()
        return self._info  # type: ignore[no-any-return]

    @property
    def app(self) -> Any:
        if not hasattr(self, "_app"):
            self._app = create_app(lookup=self.lookup)
        return self._app


def prepare(dataset: Path, server_url: str | None = None, tune: bool = False, cache: Path = ds.CACHE,
            config: ServerConfig | None = None, client_settings: dict[str, Any] | None = None,
            min_photos: int = ds.MIN_PHOTOS, query_fraction: float = ds.QUERY_FRACTION) -> Env:
    """Load, split, extract (cached) and index; everything written goes under ``cache``.
    ``tune`` evaluates on the gallery alone, split again, so settings are chosen without
    ever seeing a query. ``config`` is the in-process server's (default: its defaults and
    ``ENFPIRE_*`` variables), ``client_settings`` the phones' ClientConfig fields over their defaults."""
    data = ds.load_dataset(dataset)
    gallery, queries, left_out = ds.split(data, query_fraction, min_photos)
    if tune:
        gallery, queries, _ = ds.split(data, query_fraction, min_photos=1, rows=gallery)
    # The phones' model (``model`` in their settings, else the default) makes the gallery's features too.
    extractor = Extractor(load_client_config(ClientConfig, env={}, **dict(client_settings or {})).model_path())
    features = ds.features(data, extractor, cache)
    # The gallery's rows in the key: two splits of one size never share an index.
    rows = hashlib.sha256(np.asarray(gallery, np.int64).tobytes()).hexdigest()
    key = hashlib.sha256(f"{dataset.resolve()}|{extractor.sha256}|{len(gallery)}|{rows}".encode()).hexdigest()[:16]
    index_dir = cache / f"eval-index-{key}"
    try:
        index = Index.load(index_dir)
    except BadIndexError:
        index = ds.build_from_features(data, gallery, features, extractor, index_dir)
    lookup = Lookup(index, config or load_config(ServerConfig))
    return Env(data, gallery, queries, left_out, features, extractor, index, lookup, server_url,
               dict(client_settings or {}), cache, cache / f"eval-state-{key}")


def baseline_hits(env: Env) -> np.ndarray:
    """Per query, whether the non-private server's top-1 on the raw feature is its spot."""
    bodies = [make_transform("none").transform(env.features[q], np.random.default_rng(0)) for q in env.queries]
    scores = atk.NaiveAttacker(env.lookup).scores(bodies)
    return np.asarray(atk.rank_of_truth(scores, env.truth) == 1)


def learned_hits(env: Env) -> np.ndarray | None:
    """Per query, whether the phone's own rerank over *every* spot's looks (int8 as they travel, in the
    codec space, soft maximum) ranks its spot first: the codec space's non-private ceiling, beside
    :func:`baseline_hits`' raw feature (None without a codec)."""
    scores = codec_scores(env, env.features[env.queries])
    return None if scores is None else np.asarray(atk.rank_of_truth(scores, env.truth) == 1)


def published_looks(env: Env) -> tuple[np.ndarray, np.ndarray] | None:
    """Every spot's looks as the phone decodes them (unit rows in the codec space) and each
    spot's first row (None without a codec)."""
    lookup = env.lookup
    if lookup.codec is None:
        return None
    rows = [wire.decode(lookup._encoded[s]).reshape(-1, lookup.codec.dim) for s in range(len(lookup.index.spots))]
    return l2_normalize(np.concatenate(rows).astype(np.float32)), np.cumsum([0] + [len(r) for r in rows])[:-1]


def codec_scores(env: Env, features: np.ndarray,
                 published: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray | None:
    """``[photos, spots]``: each photo's rerank score (the phone's soft maximum over a spot's looks)
    against *every* spot of ``env``'s index, in the codec space (None without a codec);
    ``published``: :func:`published_looks`, when the caller holds them already."""
    published = published or published_looks(env)
    if published is None:
        return None
    looks, starts = published
    cosines = env.lookup.codec.project(features) @ looks.T
    peaks = np.maximum.reduceat(cosines, starts, axis=1)
    spread = np.exp((cosines - np.repeat(peaks, np.diff(np.append(starts, len(looks))), axis=1)) / VOTE_TEMPERATURE)
    return peaks + VOTE_TEMPERATURE * np.log(np.add.reduceat(spread, starts, axis=1))  # recognizer.soft_max


def baseline(env: Env) -> float:
    """The non-private server: its own top-1 on the raw feature."""
    return float(np.mean(baseline_hits(env)))
