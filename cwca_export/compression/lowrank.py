"""Low-rank factorisation: W ~ B A with A ``(r, in)`` and B ``(out, r)``, two thin Linears.

- plain truncated SVD: the best rank-r approximation in Frobenius norm, ||W - B A||_F;
- activation-aware (SVD-LLM's truncation-aware whitening): with C = X^T X / tokens = S S^T
  (Cholesky), the truncated SVD of W S gives B A = [W S]_r S^-1, the rank-r W' that
  minimises ||(W - W') X^T||_F, the layer's output error on the calibration tokens.

Plan units map to ranks as rank = units * rank_step. A Linear ``in -> out`` is factorised
only where that saves parameters, r (in + out) < in * out, i.e. r < in out / (in + out);
otherwise it stays dense.
"""

from __future__ import annotations

import torch
from torch import nn

from cwca_export.blocks import weight_out_in

DEFAULT_RANK_STEP = 8  # rank per plan unit when neither the call nor the plan sets one


def shrinks(out_features: int, in_features: int, rank: int) -> bool:
    """True when rank r factors use fewer weights than the dense layer: r < m n / (m + n).

    Example:
        >>> shrinks(64, 64, 31), shrinks(64, 64, 32)
        (True, False)
    """
    return rank * (out_features + in_features) < out_features * in_features


def _split_singular(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


@torch.no_grad()
def svd_factors(
    weight: torch.Tensor, rank: int, *, compute_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of ``weight`` ``(out, in)``: ``(A (r, in), B (out, r))`` with B A = [W]_r.

    The singular values are split evenly (sqrt) between the two factors.
    """
    u, s, vh = torch.linalg.svd(weight.detach().to(compute_dtype), full_matrices=False)
    return _split_singular(u, s, vh, rank)


@torch.no_grad()
def whitened_svd_factors(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    rank: int,
    *,
    damp: float = 1e-4,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM factors: ``(A (r, in), B (out, r))`` with B A = [W S]_r S^-1, C = S S^T.

    Args:
        weight: ``(out, in)``.
        covariance: C = X^T X / tokens of the layer's inputs, ``(in, in)``.
        rank: r.
        damp: added to C's diagonal as a fraction of its mean; multiplied by 10 until the
            Cholesky factorisation succeeds (a singular C, e.g. fewer tokens than inputs).
        compute_dtype: dtype of the arithmetic.
    """
    w = weight.detach().to(compute_dtype)
    c = covariance.to(device=w.device, dtype=compute_dtype)
    scale = float(torch.diag(c).mean()) or 1.0
    eye = torch.eye(c.shape[0], dtype=compute_dtype, device=w.device)
    while True:
        s, info = torch.linalg.cholesky_ex(c + damp * scale * eye)  # (in, in), lower
        if int(info) == 0:
            break
        if damp >= 1.0:
            raise ValueError("activation-aware SVD: the input covariance is not positive definite")
        damp = max(10 * damp, 1e-10)
    u, sigma, vh = torch.linalg.svd(w @ s, full_matrices=False)
    a, b = _split_singular(u, sigma, vh, rank)  # a: (r, in) in the whitened basis
    # A S^-1: solve S^T A'^T = A^T, i.e. A' = A S^-1
    a = torch.linalg.solve_triangular(s, a, upper=False, left=False)
    return a, b


def factor_function(method: str, options: dict):
    """``(weight, statistic, rank) -> (a, b)`` for the low-rank method ``method`` ('lowrank' or 'asvd').

    The probes of measured damage and whole-plan losses factor weights exactly as the method does.
    """
    if method == "asvd":
        return lambda w, stat, r: whitened_svd_factors(w, stat, r, damp=options["damp"])
    if method == "lowrank":
        return lambda w, _stat, r: svd_factors(w, r)
    raise ValueError(f"measured damage knows the low-rank probes of 'lowrank' and 'asvd', not {method!r}")


def make_factorised(
    in_features: int,
    out_features: int,
    rank: int,
    *,
    bias: bool,
    dtype: torch.dtype,
    device: torch.device | str,
) -> nn.Sequential:
    """An (untrained) ``Sequential(Linear(in, r, bias=False), Linear(r, out, bias))``."""
    return nn.Sequential(
        nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device),
        nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device),
    )


@torch.no_grad()
def factorised_linear(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> nn.Sequential:
    """The two-Linear replacement of ``module`` (``nn.Linear`` or ``Conv1D``) with factors A, B.

    The bias, dtype and device are the original layer's.
    """
    w = weight_out_in(module)
    out_features, in_features = w.shape
    rank = a.shape[0]
    new = make_factorised(
        in_features,
        out_features,
        rank,
        bias=module.bias is not None,
        dtype=w.dtype,
        device=w.device,
    )
    new[0].weight.copy_(a)
    new[1].weight.copy_(b)
    if module.bias is not None:
        new[1].bias.copy_(module.bias)
    return new
