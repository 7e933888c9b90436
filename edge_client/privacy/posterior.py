"""p(cells message | spot) for the cells transform: one computation, two users.

A cells message is the sorted union of the phone's *real* group (the cells
its rule names for the photo) and ``d`` decoy groups (the same rule on
fictitious photos of popularity-drawn spots). So

    p(msg | s) = sum over R subset of msg:  L(s, R) * P(the d decoy groups, with R, make exactly msg)

where R ranges over the group sizes the rule can name and L(s, R) is how
often a photo of s names R. The evaluation's Bayes attacker
(``tools/evaluate/attackers.py``) fills L from the server's gallery; the
phone's privacy receipt (:mod:`edge_client.privacy.receipt`) from fictitious
photos of the public prototypes. Both call :func:`message_likelihood`.

The decoy term is computed by Moebius inversion over the subsets of the
message, so it costs O(n 2^n) for a message of n cells whatever the number
of decoy groups: with q(T) the probability that one decoy group lies inside
T, the d groups all lie inside T with probability q(T)^d, and

    P(R with the groups is exactly msg) = sum over T with R in T in msg of (-1)^|msg - T| q(T)^d.

A phone with a privacy floor adds a variable number of groups: ``groups``
may be a distribution over d.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Mapping

import numpy as np

#: p(the phone's rule names this group | spot), one row over the spots; groups are tuples of cells.
GroupLikelihood = Callable[[tuple[int, ...]], np.ndarray]

#: Beyond this many cells the subset tables (2^n floats) would not fit a phone's memory budget.
MAX_MESSAGE_CELLS = 22


def decoy_completions(message: tuple[int, ...], decoys: Mapping[tuple[int, ...], float],
                      groups: int | Mapping[int, float]) -> np.ndarray:
    """[2^n] over bitmasks R of the message's n cells: P(R together with the decoy groups is exactly
    the message). ``decoys`` gives each decoy group's probability (a group with a cell outside the
    message never happens given it); ``groups`` is the number of decoy groups or a distribution over it."""
    n = len(message)
    if n > MAX_MESSAGE_CELLS:
        raise ValueError(f"a message of {n} cells is longer than {MAX_MESSAGE_CELLS}")
    local = {cell: 1 << i for i, cell in enumerate(message)}
    inside = np.zeros(1 << n)
    for group, q in decoys.items():
        if all(c in local for c in group):
            inside[sum(local[c] for c in group)] += q
    _subset_sums(inside)  # inside[T] = q(T): one group lies within T
    sizes = np.array([bin(m).count("1") for m in range(1 << n)])
    sign = np.where((n - sizes) % 2, -1.0, 1.0)
    weights = {int(groups): 1.0} if isinstance(groups, (int, np.integer)) else groups
    terms = sign * sum(w * inside ** int(d) for d, w in weights.items() if w)
    _superset_sums(terms)  # terms[R] = sum over T containing R
    return np.maximum(terms, 0.0)  # alternating sums: rounding can leave a tiny negative


def message_likelihood(message: tuple[int, ...], real: GroupLikelihood, decoys: Mapping[tuple[int, ...], float],
                       sizes: Iterable[int], groups: int | Mapping[int, float], n_spots: int) -> np.ndarray:
    """p(message | spot) for every spot: the sum over which of the message's cells were the real
    group (each size in ``sizes``), ``real(group)`` times the decoys completing the message."""
    message = tuple(int(c) for c in message)
    completions = decoy_completions(message, decoys, groups)
    local = {cell: 1 << i for i, cell in enumerate(message)}
    total = np.zeros(n_spots)
    for size in sizes:
        for group in itertools.combinations(message, size):
            weight = completions[sum(local[c] for c in group)]
            if weight > 0:
                total += real(group) * weight
    return total


def _subset_sums(table: np.ndarray) -> None:
    """In place: table[T] becomes the sum of table[S] over the subsets S of T (zeta transform)."""
    n = int(table.size).bit_length() - 1
    view = table
    for bit in range(n):
        view = table.reshape(-1, 2, 1 << bit)
        view[:, 1, :] += view[:, 0, :]


def _superset_sums(table: np.ndarray) -> None:
    """In place: table[R] becomes the sum of table[T] over the supersets T of R."""
    n = int(table.size).bit_length() - 1
    for bit in range(n):
        view = table.reshape(-1, 2, 1 << bit)
        view[:, 0, :] += view[:, 1, :]


def summary(posterior: np.ndarray) -> tuple[float, float]:
    """(plausible spots, top-1 probability) of a posterior over spots. "Plausible" is its perplexity,
    exp(entropy): the posterior is as uncertain as a uniform guess among that many spots."""
    p = posterior[posterior > 0]
    return float(np.exp(-np.sum(p * np.log(p)))), float(posterior.max())
