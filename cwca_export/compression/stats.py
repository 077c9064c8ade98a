"""Per-Linear input statistics as pure functions: make_empty_*, accumulate_*, finalize_*.

The block driver (:mod:`cwca_export.compression.sequential`) feeds them from forward hooks;
tests call them directly. Sums are fp32 whatever dtype the model runs in; inputs arrive as
``(tokens, in)`` (the same for ``nn.Linear`` and GPT-2's ``Conv1D``).

- ``input_norms``: ||X_j||_2 over all calibration tokens per input feature j (Wanda's
  metric, and the activation weight of structured-width importance).
- ``hessian``: H = X^T X / tokens, ``(in, in)`` (SparseGPT's Hessian up to a factor 2, the
  K-FAC A factor, SVD-LLM's whitening covariance).

Both accumulate sums over tokens, so data-parallel processes add theirs up before finalizing
(:func:`sum_across_processes`) and finalize exactly what one process would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cwca_export.scoring.accumulators import accumulate_input_norms, make_empty_input_norms


def finalize_input_norms(sum_squares: torch.Tensor) -> torch.Tensor:
    """||X_j||_2 per input feature from the running sum of squares, ``(in,)``."""
    return sum_squares.sqrt()


@dataclass
class Gram:
    """Running X^T X of one Linear's inputs.

    Attributes:
        total: sum over tokens of a a^T, ``(in, in)`` fp32.
        tokens: tokens added so far.
    """

    total: torch.Tensor
    tokens: int = 0


def make_empty_hessian(in_features: int, device: torch.device) -> Gram:
    """A zeroed fp32 Gram matrix for a Linear with ``in_features`` inputs."""
    return Gram(torch.zeros(in_features, in_features, dtype=torch.float32, device=device))


def accumulate_hessian(gram: Gram, a: torch.Tensor) -> None:
    """Add inputs ``a`` ``(tokens, in)`` to the Gram matrix, in place."""
    a = a.float()
    gram.total.addmm_(a.t(), a)
    gram.tokens += a.shape[0]


def finalize_hessian(gram: Gram) -> torch.Tensor:
    """H = X^T X / tokens, ``(in, in)``."""
    if gram.tokens == 0:
        raise ValueError("hessian: no calibration tokens reached this Linear")
    return gram.total / gram.tokens


@dataclass(frozen=True)
class Statistic:
    """One statistic's three pure functions."""

    make_empty: Callable[[int, torch.device], Any]
    accumulate: Callable[[Any, torch.Tensor], None]
    finalize: Callable[[Any], torch.Tensor]


def sum_across_processes(states: dict[str, Any], reduce: Callable[[list[torch.Tensor]], None] | None) -> None:
    """Sum unfinalized accumulators (sum-of-squares tensors, :class:`Gram`) across processes, in place.

    ``reduce`` is an in-place all-reduce sum over a list of tensors; None (one process) does nothing.
    """
    if reduce is None:
        return
    for state in states.values():
        if isinstance(state, torch.Tensor):
            reduce([state])
        elif isinstance(state, Gram):
            tokens = torch.tensor([float(state.tokens)], dtype=torch.float64, device=state.total.device)
            reduce([state.total, tokens])
            state.tokens = int(round(float(tokens.item())))
        else:
            raise TypeError(f"cannot sum a {type(state).__name__} statistic across processes")


def _accumulate_norms(norms: torch.Tensor, a: torch.Tensor) -> None:
    accumulate_input_norms(norms, a.float())


STATISTICS: dict[str, Statistic] = {
    "input_norms": Statistic(make_empty_input_norms, _accumulate_norms, finalize_input_norms),
    "hessian": Statistic(make_empty_hessian, accumulate_hessian, finalize_hessian),
}
