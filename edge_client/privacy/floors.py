"""Privacy floors the phone holds itself, whatever the server publishes.

The cells transform's privacy is built from the server's public document
(``/v1/public``): its cells say how many spots hide behind a named cell, its
popularity says where decoys go. A server that lies writes that document, so
the phone checks it against floors of its own (``ClientConfig``) before it
fits, keeps or sends anything, and shapes the decoy draw so that the
published popularity can shape decoys but never steer them:

- :func:`check` refuses a document (a full one, a delta applied to the kept
  one, or the kept copy) below a floor with :class:`PrivacyFloorError`:
  ``min_cell_spots``, the fewest spots in every cell, counting only spots a
  photo can be of by the server's own account (at least one published photo
  and one prototype: a spot the document says nobody photographs is no
  cover), and ``min_cells``, the fewest cells.
- :func:`decoy_weights` turns the published popularity into the decoys'
  draw: a share ``decoy_uniform`` of it is uniform over the spots, no spot
  takes more than ``max_decoy_share`` and no cell more than
  ``max_decoy_cell_ratio`` times its share of the spots (the excess goes to
  the others in proportion). A "sink" (every spot's popularity 0 but one, or
  but the spots of one cell) gets at most its cap of the decoys, the rest
  spread over every spot.

Pure functions of the parsed document: no I/O, numpy only (the device side).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import PrivacyFloorError
from ..protocol.public import PublicParams

#: The defaults, which the honest default server passes: it builds cells of at least
#: ``cell_min_spots`` = 10 spots (``lite_server.config``); wa-landmarks' document has 21 cells
#: of 10-11 spots, ie-tower's 12 of 10-11, every spot with photos and 3 prototypes. A catalogue
#: of fewer than 20 spots is one cell, and honest: a query naming it names the whole catalogue, so
#: fewer cells never cost privacy and ``min_cells`` only asks for cells at all; a phone (or a study)
#: that wants a larger catalogue around its queries raises it.
MIN_CELL_SPOTS = 10
MIN_CELLS = 1
#: wa-landmarks' most photographed spot holds 9.7% of its gallery, ie-tower's 1.8%: an honest
#: document is not capped. The uniform share is what no document can steer (docs/privacy.md).
MAX_DECOY_SHARE = 0.10
DECOY_UNIFORM = 0.25
#: No cell takes more than 3x its share of the spots: wa-landmarks' most photographed cell holds 2.9x
#: (2.4x once mixed with the uniform share), ie-tower's 1.6x.
MAX_DECOY_CELL_RATIO = 3.0


@dataclass(frozen=True)
class Floors:
    """What a public document must give before the phone uses it, and how decoys are drawn."""

    min_cell_spots: int = MIN_CELL_SPOTS
    min_cells: int = MIN_CELLS
    max_decoy_share: float = MAX_DECOY_SHARE
    decoy_uniform: float = DECOY_UNIFORM
    max_decoy_cell_ratio: float = MAX_DECOY_CELL_RATIO

    @classmethod
    def from_config(cls, config: Any) -> "Floors":
        """The floors of a :class:`~edge_client.config.ClientConfig`."""
        return cls(int(config.min_cell_spots), int(config.min_cells), float(config.max_decoy_share),
                   float(config.decoy_uniform), float(config.max_decoy_cell_ratio))


def cover(doc: PublicParams) -> np.ndarray:
    """Per spot: can a photo be of it, by the document's own account (a photo and a prototype)?"""
    return (doc.columns["photos"].astype(np.int64) > 0) & (doc.columns["n_prototypes"].astype(np.int64) > 0)


def check(doc: PublicParams, floors: Floors) -> None:
    """Raise :class:`PrivacyFloorError` when ``doc`` is below one of ``floors``; return None otherwise.

    A document without spots has nothing to hide behind and nothing to check
    (the transforms that need spots refuse it on their own).
    """
    if not len(doc):
        return
    n_cells = doc.n_cells
    if n_cells < floors.min_cells:
        raise PrivacyFloorError("min_cells", n_cells, floors.min_cells,
                                f"the document has {n_cells} cell(s)")
    cells = doc.columns["cell"].astype(np.int64)
    # A spot in a cell beyond n_cells makes every cell up to it count (empty ones hold 0 spots).
    counts = np.bincount(cells[cover(doc)], minlength=max(n_cells, int(cells.max()) + 1))
    worst = int(np.argmin(counts))
    if counts[worst] < floors.min_cell_spots:
        raise PrivacyFloorError("min_cell_spots", int(counts[worst]), floors.min_cell_spots,
                                f"cell {worst} holds {int(counts[worst])} spot(s) with photos and prototypes")


def decoy_weights(popularity: np.ndarray, max_share: float = MAX_DECOY_SHARE, uniform: float = DECOY_UNIFORM,
                  cells: np.ndarray | None = None, max_cell_ratio: float = MAX_DECOY_CELL_RATIO) -> np.ndarray:
    """The decoys' draw over spots from the published ``popularity`` (any non-negative weights).

    ``uniform`` of the draw is spread evenly over the spots, the rest follows
    popularity. Then no spot keeps more than ``max_share`` (or the even share
    ``1 / n`` when that is larger: a cap below it cannot be met) and, given
    each spot's cell in ``cells``, no cell more than ``max_cell_ratio`` times
    its share of the spots: a server cannot steer the draw into one spot, nor
    into the spots of one cell each kept under the spot cap. What a cap takes
    goes to the spots (cells) below it in proportion to their weight. The
    result sums to 1; an honest document under both caps only gets the uniform share.
    """
    weights = np.asarray(popularity, np.float64)
    n = len(weights)
    if n == 0:
        return weights
    weights = np.where(np.isfinite(weights) & (weights > 0), weights, 0.0)
    total = weights.sum()
    shaped = weights / total if total > 0 else np.full(n, 1.0 / n)
    shaped = (1.0 - uniform) * shaped + uniform / n
    spot_cap = np.full(n, max(float(max_share), 1.0 / n))
    if cells is None:
        return _water_fill(shaped, spot_cap)
    cells = np.asarray(cells, np.int64)
    sizes = np.bincount(cells).astype(np.float64)
    cell_cap = sizes / n * max(1.0, float(max_cell_ratio))
    for _ in range(100):  # alternate the two caps until both hold (the uniform draw meets both)
        shaped = _water_fill(shaped, spot_cap)
        mass = np.bincount(cells, shaped, minlength=len(sizes))
        if (mass <= cell_cap * (1 + 1e-9)).all():
            break
        fair = _water_fill(mass, cell_cap)
        scale = np.divide(fair, mass, out=np.zeros_like(fair), where=mass > 0)
        fill = np.divide(fair, sizes, out=np.zeros_like(fair), where=(mass <= 0) & (sizes > 0))
        shaped = shaped * scale[cells] + fill[cells]
    return shaped / shaped.sum()


def _water_fill(mass: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """``mass`` with no entry above its ``cap``: the excess goes to the entries below theirs in
    proportion to their mass (evenly when they have none). The caps must sum to the total or more."""
    mass = np.array(mass, np.float64)
    capped = np.zeros(len(mass), bool)
    for _ in range(len(mass)):  # each round caps at least one more entry, or ends
        over = ~capped & (mass > cap * (1 + 1e-12))
        if not over.any():
            break
        capped |= over
        excess = float((mass[capped] - cap[capped]).sum())
        mass[capped] = cap[capped]
        free = ~capped
        room = mass[free].sum()
        if not free.any():
            break
        mass[free] += excess * (mass[free] / room if room > 0 else 1.0 / free.sum())
    return mass
