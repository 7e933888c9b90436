"""The privacy receipt: what one cells message tells a transform-aware server, computed on the phone.

The phone has no gallery photos, but it has the public structure the server
published (each spot's prototypes and cell, the popularity) and the rule its
transform names cells by. So it makes *fictitious photos* of a spot exactly
as it makes decoys (random Dirichlet mixtures of the spot's prototypes,
:meth:`Cells.decoy` for a given spot), counts which groups of cells they name
(L(s, R)), and takes the decoy groups' distribution as
sum_s decoy_draw(s) * L(s, g): a decoy *is* a fictitious photo of a spot drawn
by the (capped) popularity. With the published popularity as the prior, the
posterior over spots given the exact message sent is
:func:`edge_client.privacy.posterior.message_likelihood` times the prior,
the same computation the evaluation's Bayes attacker runs on its gallery.

Cheap and deterministic: a spot is simulated only when a message could have
come from it (its cell, or a cell one of its prototypes names first, is in
the message), once per public
document, from a generator seeded by the spot alone; the same message gives
the same receipt. Nothing here is ever sent.

"Plausible spots" is the posterior's perplexity, exp(entropy): the server is
as uncertain as if it had to guess uniformly among that many spots.
"""
from __future__ import annotations

import copy
import logging
import math
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ..vision.extractor import l2_normalize
from . import posterior

log = logging.getLogger(__name__)

#: Fictitious photos per spot: on the gallery-only tuning splits (tools.evaluate --tune) the
#: calibration's mean gap was 0.049 on wa-landmarks and 0.014 on ie-tower with 400 photos, 0.049 and
#: 0.011 with 200 (smoothing 0.05), within the noise of a few popular spots; 400 halves the simulation's
#: own noise at ~0.2 s for the first receipt of a public document. Dirichlet 0.5 or 1.0 instead of the
#: decoys' 0.3, and tempering the likelihood (power 0.7-2.0), did no better on both (measured while
#: every spot whose prototypes named a sent cell at all was simulated; docs/privacy.md).
PHOTOS = 400
SEED = 27
#: A spot that could have sent the message but whose fictitious photos never named a group gets
#: this share of one photo for it: the receipt does not rule out what its draws merely missed. On the
#: tuning splits 0.2 beat 0.05 on both datasets (mean gap 0.047 / 0.007 against 0.049 / 0.014, the
#: truth among the ceil(plausible) likeliest spots 0.799 / 0.865 against 0.774 / 0.837); 0.5-2.0
#: widened the posterior further but missed wa-landmarks' calibration (0.053-0.055).
SMOOTHING = 0.2


class ReceiptModel:
    """The receipt's model of one public document and one cells setting (a fitted :class:`Cells`)."""

    def __init__(self, transform: Any, prior: np.ndarray, photos: int = PHOTOS, seed: int = SEED,
                 smoothing: float = SMOOTHING, alpha: float | None = None):
        self.transform = copy.copy(transform)  # a later refit of the phone's transform must not change this one
        self.prior = np.asarray(prior, np.float64) / np.sum(prior)
        self.n_spots = len(self.prior)
        self.photos, self.seed, self.smoothing = photos, seed, smoothing
        # The fictitious photos' Dirichlet concentration: the decoys' own by default.
        self.alpha = transform.decoy_alpha if alpha is None else alpha
        self.sizes = range(min(transform.min_cells, transform.k_), transform.k_ + 1)
        self.groups = int(round(transform.strength_))
        owner = transform.prototype_spot_
        self.anchors = [np.flatnonzero(owner == s) for s in range(self.n_spots)]
        # The cells a photo of each spot can name *first*: its own and its prototypes' best. A group lies
        # inside a message only if its best cell does, so only spots reaching a cell of the message are
        # simulated (about the message's share of the cells, not every spot).
        self.reach = [{int(transform.spot_cell_[s])} for s in range(self.n_spots)]
        for row, group in enumerate(transform.choose_many(transform.prototypes_)):
            self.reach[int(owner[row])].add(group[0])
        self._named: dict[int, dict[tuple[int, ...], float]] = {}
        self._lock = threading.Lock()
        # The last posterior asked for: a phone with a privacy floor tests the message it sends, then
        # its receipt asks for the same one (a tuple assignment, so threads see one whole entry).
        self._last: tuple[tuple[tuple[int, ...], int | None], np.ndarray] | None = None

    def named(self, spot: int) -> dict[tuple[int, ...], float]:
        """The share of ``spot``'s fictitious photos naming each group (best cell first, then sorted)."""
        with self._lock:
            if spot not in self._named:
                self._named[spot] = self._simulate(spot)
            return self._named[spot]

    def _simulate(self, spot: int) -> dict[tuple[int, ...], float]:
        t = self.transform
        if not len(self.anchors[spot]):
            return {}
        rng = np.random.default_rng([self.seed, spot])
        mix = rng.dirichlet(np.full(len(self.anchors[spot]), self.alpha), size=self.photos)
        counts: dict[tuple[int, ...], float] = {}
        for best, *rest in t.choose_many(l2_normalize(mix @ t.prototypes_[self.anchors[spot]])):
            key = (best, *sorted(rest))
            counts[key] = counts.get(key, 0.0) + 1.0
        return {key: n / self.photos for key, n in counts.items()}

    def likelihood(self, message: tuple[int, ...], groups: int | None = None) -> np.ndarray:
        """p(message | spot) for every spot, with ``groups`` decoy groups (default the transform's)."""
        cells = set(message)
        candidates = [s for s in range(self.n_spots) if self.reach[s] & cells]
        table: dict[tuple[int, ...], np.ndarray] = {}
        for spot in candidates:
            for key, share in self.named(spot).items():
                if cells.issuperset(key):
                    table.setdefault(key, np.zeros(self.n_spots))[spot] += share
        draw = self.transform.popularity_
        decoys: dict[tuple[int, ...], float] = {}
        for key, row in table.items():
            group = tuple(sorted(key))
            decoys[group] = decoys.get(group, 0.0) + float(row @ draw)
        unseen = np.zeros(self.n_spots)
        unseen[candidates] = self.smoothing / self.photos

        def real(group: tuple[int, ...]) -> np.ndarray:
            total = unseen.copy()
            for best in group:
                row = table.get((best, *(c for c in group if c != best)))
                if row is not None:
                    total += row
            return total

        return posterior.message_likelihood(message, real, decoys, self.sizes,
                                            self.groups if groups is None else groups, self.n_spots)

    def posterior(self, message: tuple[int, ...], groups: int | None = None) -> np.ndarray:
        """p(spot | message): the likelihood times the published popularity, normalised. A message the
        model cannot explain at all falls back to the prior over the spots of its cells (not to be
        written to: the last one is kept for the next call)."""
        key = (tuple(message), groups)
        last = self._last
        if last is not None and last[0] == key:
            return last[1]
        joint = self.prior * self.likelihood(message, groups)
        if not joint.sum() > 0:
            joint = self.prior * np.isin(self.transform.spot_cell_, list(message))
        post = joint / joint.sum()
        self._last = (key, post)
        return post

    def receipt(self, message: tuple[int, ...], answer: int | None = None, groups: int | None = None) -> dict[str, Any]:
        """The receipt of ``message``: plausible spots, the server's best guess's probability, and
        the posterior of the phone's own answer (row ``answer``; None when it is no known spot)."""
        post = self.posterior(message, groups)
        plausible, top1 = posterior.summary(post)
        # Rounded down: a receipt never shows more cover than the floor's own test found.
        return {"request_sent": True, "plausible_spots": math.floor(plausible * 100) / 100, "server_top1_probability": round(top1, 4),
                "answer_probability": None if answer is None else round(float(post[answer]), 4),
                "cells_sent": len(message)}

    def plausible(self, message: tuple[int, ...], groups: int | None = None) -> float:
        """How many spots the message leaves plausible (the posterior's perplexity)."""
        return posterior.summary(self.posterior(message, groups))[0]


#: Receipt models by public document digest and setting: a phone's few clients share them.
_MODELS: OrderedDict[tuple[Any, ...], ReceiptModel] = OrderedDict()
_MODELS_LOCK = threading.Lock()
_KEPT = 4


#: The most published prototypes a phone computes receipts for. A receipt simulates each spot a
#: message could come from (a few hundred) with 400 fictitious photos scored against every prototype,
#: and the model first finds the cell every prototype names: both grow with the prototypes, the
#: second with their square. On wa-landmarks (648 prototypes) the first receipt takes ~0.2 s on this
#: machine; 10,000 prototypes (~3,300 spots) would take seconds, a national catalogue's 100,000 or
#: more minutes and tens of GB. Beyond it an answer has no receipt and a privacy floor is refused.
MAX_PROTOTYPES = 10_000


def model_for(digest: str, transform: Any, prior: np.ndarray) -> ReceiptModel | None:
    """The receipt model of public document ``digest`` for ``transform``'s setting (made once, kept);
    None for a catalogue of more than :data:`MAX_PROTOTYPES` prototypes."""
    if len(transform.prototypes_) > MAX_PROTOTYPES:
        log.info("no privacy receipts: %d published prototypes, more than the %d a phone simulates",
                 len(transform.prototypes_), MAX_PROTOTYPES)
        return None
    key = (digest, repr(transform), getattr(transform, "margin_", None), transform.max_decoy_share,
           transform.decoy_uniform, transform.max_decoy_cell_ratio)
    with _MODELS_LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key]
    model = ReceiptModel(transform, prior)
    with _MODELS_LOCK:
        _MODELS[key] = model
        while len(_MODELS) > _KEPT:
            _MODELS.popitem(last=False)
    return model


NOT_SENT: dict[str, Any] = {"request_sent": False, "plausible_spots": None, "server_top1_probability": None,
                            "answer_probability": None, "cells_sent": 0}
"""The receipt of an answer from the phone's cache: no request, so nothing for the server to learn."""
