"""The order a budget search builds its finalists (docs/design.md 3.4).

Lowest calibration loss first, with one exception: a storage that a plain export would give too
(one format for every block, no structure removed: what ``--quantize int8`` or ``int4`` ships)
is not passed over for a per-layer or structured candidate unless that candidate is better by
more than the noise. Both are evaluated on the same sequences, so the test is paired: the mean
per-sequence loss difference must lie below zero by ``sigmas`` standard errors of that mean.
Calibration losses that differ by a thousandth of a nat rank candidates by chance
(BENCHMARKS.md, "Budgets: the tool's search against peers"), and a user's budget should get
the plain peer unless the tool can show it does better.

The search runs the test on held-out windows of the calibration text, disjoint from the ones
its per-layer plans were fitted and priced on; only where the text has none does it read the
calibration sequences, where the test is optimistic (it guards against noise, not against a
plan tuned to its calibration text).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from cwca_export.defaults import EXPORT_SIGNIFICANCE

DEFAULT_SIGMAS = EXPORT_SIGNIFICANCE  # one-sided: about 98% under a normal difference

T = TypeVar("T")


@dataclass(frozen=True)
class Comparison:
    """A candidate against a peer on the same sequences: mean loss difference (candidate less
    peer, nats) and its standard error."""

    difference: float
    standard_error: float
    sequences: int

    def proven(self, sigmas: float) -> bool:
        """Whether the candidate is better by more than ``sigmas`` standard errors (0: any margin)."""
        if sigmas <= 0:
            return True
        return self.difference + sigmas * self.standard_error < 0

    @property
    def sigmas(self) -> float:
        """How many standard errors the candidate is better by (negative: worse)."""
        if self.standard_error == 0:
            return math.inf if self.difference < 0 else (-math.inf if self.difference > 0 else 0.0)
        return -self.difference / self.standard_error

    def text(self) -> str:
        return (f"{-self.difference:+.2g} nats ({self.sigmas:.2g} standard errors of the paired difference"
                f" over {self.sequences} sequences)")


def compare(candidate: Sequence[float], peer: Sequence[float]) -> Comparison:
    """Paired comparison of per-sequence losses (the same sequences, in the same order)."""
    a, b = np.asarray(candidate, dtype=np.float64), np.asarray(peer, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired losses need equal, non-empty 1-D shapes: {a.shape} and {b.shape}")
    d = a - b
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.inf
    return Comparison(float(d.mean()), se, int(d.size))


def build_order(
    options: Sequence[T], *, losses: Callable[[T], Any], is_peer: Callable[[T], bool], sigmas: float
) -> tuple[list[T], dict[int, dict[int, tuple[T, Comparison]]]]:
    """``options`` (sorted by loss, lowest first) in the order to build them, and for each option
    that peers went ahead of (keyed by ``id``): those peers (by ``id``) with the comparison that
    held it back.

    At each step the next option is the lowest-loss one that is either a peer, or ahead of the
    first remaining peer and proven better than it; else that peer. So a peer that is built and
    misses a limit lets the options it held back compete against the next peer."""
    rest, order = list(options), []
    held: dict[int, dict[int, tuple[T, Comparison]]] = {}
    while rest:
        peer = next((o for o in rest if is_peer(o)), None)
        if peer is None or sigmas <= 0:
            order += rest
            break
        pick = peer
        for o in rest[: rest.index(peer)]:
            c = compare(losses(o), losses(peer))
            if c.proven(sigmas):
                pick = o
                break
            held.setdefault(id(o), {})[id(peer)] = (peer, c)
        order.append(pick)
        rest.remove(pick)
    return order, held
