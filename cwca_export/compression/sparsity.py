"""Unstructured and N:M sparsity as pure functions on one weight ``(out, in)``.

Each function returns a keep-mask (True = weight survives) or, for SparseGPT, the updated
weight and its mask. Comparison groups, and so the exact count removed from each:

- magnitude: the whole matrix, round(rho * out * in) smallest |W|;
- Wanda: each output row, round(rho * in) smallest |W_ij| * ||X_j||;
- SparseGPT: each (out x block_size) column block, round(rho * out * cols) smallest
  w^2 / [U]_jj^2 (U = upper Cholesky factor of H^-1), chosen when the block is reached;
- N:M (any method): every run of M consecutive inputs of a row keeps its N largest scores.

GPT-2's ``Conv1D`` stores W as ``(in, out)``; callers pass the ``(out, in)`` view.
"""

from __future__ import annotations

import torch

NM = tuple[int, int]


def parse_nm(spec: str | NM | None) -> NM | None:
    """``"2:4"`` -> ``(2, 4)``: keep N of every M consecutive weights; None stays None.

    Example:
        >>> parse_nm("2:4"), parse_nm(None)
        ((2, 4), None)
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        n_text, sep, m_text = spec.partition(":")
        try:
            if not sep:
                raise ValueError
            spec = (int(n_text), int(m_text))
        except ValueError:
            raise ValueError(
                f"N:M pattern {spec!r}: expected N:M with integers, e.g. --nm 2:4"
            ) from None
    n, m = spec
    if not 0 < n < m:
        raise ValueError(f"N:M pattern {n}:{m}: need 0 < N < M (keep N of every M weights), e.g. --nm 2:4")
    return int(n), int(m)


def removed_count(rho: float, size: int) -> int:
    """Weights to remove from a comparison group of ``size``: the nearest integer to rho * size."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"sparsity {rho}: must lie in [0, 1]")
    return int(round(rho * size))


def _keep_largest(scores: torch.Tensor, rho: float) -> torch.Tensor:
    """Keep-mask of a 1-D score vector with its removed_count(rho) smallest entries dropped."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    k = removed_count(rho, scores.numel())
    if k:
        keep[torch.topk(scores, k, largest=False).indices] = False
    return keep


def _keep_largest_rows(scores: torch.Tensor, rho: float) -> torch.Tensor:
    """Keep-mask ``(out, in)`` with each row's removed_count(rho, in) smallest scores dropped."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    k = removed_count(rho, scores.shape[1])
    if k:
        keep.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, False)
    return keep


def nm_mask(scores: torch.Tensor, nm: NM) -> torch.Tensor:
    """Keep-mask ``(out, in)``: every M consecutive inputs of a row keep their N largest scores."""
    n, m = nm
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M {n}:{m} needs the input width ({cols}) to be a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)  # (out, in/M, M)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def magnitude_mask(weight: torch.Tensor, rho: float, *, nm: NM | None = None) -> torch.Tensor:
    """Keep-mask by |W|: the layer's smallest weights go (or N:M per row).

    Example:
        >>> magnitude_mask(torch.tensor([[1.0, -3.0], [0.5, 2.0]]), 0.5).tolist()
        [[False, True], [False, True]]
    """
    scores = weight.detach().float().abs()
    if nm is not None:
        return nm_mask(scores, nm)
    return _keep_largest(scores.reshape(-1), rho).reshape(scores.shape)


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, ``(out, in)``: Wanda's metric."""
    return weight.detach().float().abs() * input_norms.float()[None, :]


def wanda_mask(
    weight: torch.Tensor, input_norms: torch.Tensor, rho: float, *, nm: NM | None = None
) -> torch.Tensor:
    """Keep-mask by Wanda's metric, compared within each output row (or N:M per row).

    Args:
        weight: ``(out, in)``.
        input_norms: ||X_j||_2 over the calibration tokens, ``(in,)``.
        rho: fraction of each row to remove.
        nm: an N:M pattern instead of ``rho``.
    """
    scores = wanda_scores(weight, input_norms)
    if nm is not None:
        return nm_mask(scores, nm)
    return _keep_largest_rows(scores, rho)


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, and H's dead inputs."""
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0  # an input that is always zero: its weights change nothing
    h.diagonal().add_(damp * torch.diag(h).mean())
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h_inv, upper=True), dead


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    rho: float,
    *,
    nm: NM | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: prune columns left to right, compensating each loss with an OBS update.

    Column j's pruned weights are set to zero and their error is spread over the columns
    not yet processed through row j of U, the upper Cholesky factor of H^-1, as in Frantar &
    Alistarh (2023): lazy updates in blocks of ``block_size`` columns, the mask of each block
    chosen when it is reached.

    Args:
        weight: ``(out, in)``; not modified.
        hessian: H = X^T X / tokens of the layer's inputs, ``(in, in)``.
        rho: fraction to remove from every column block.
        nm: an N:M pattern instead of ``rho`` (chosen every M columns on the updated weights).
        block_size: columns per lazy-update block (the paper's 128).
        damp: dampening, a fraction of mean(diag H) added to the diagonal (the paper's 1%).
        compute_dtype: dtype of the arithmetic.

    Returns:
        ``(new_weight, keep_mask)``, both ``(out, in)``; new_weight has weight's dtype.
    """
    w = weight.detach().to(compute_dtype).clone()  # (out, in)
    rows, cols = w.shape
    if nm is not None and cols % nm[1]:
        raise ValueError(
            f"N:M {nm[0]}:{nm[1]} needs the input width ({cols}) to be a multiple of {nm[1]}"
        )
    u, dead = _inverse_cholesky(hessian.to(device=w.device, dtype=compute_dtype), damp)
    w[:, dead] = 0
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()  # (out, b)
        u1 = u[i1:i2, i1:i2]  # (b, b)
        d = torch.diag(u1)  # (b,)
        err1 = torch.zeros_like(w1)
        keep1 = torch.ones_like(w1, dtype=torch.bool)
        if nm is None:
            scores = (w1 * w1 / (d * d)[None, :]).reshape(-1)
            keep1 = _keep_largest(scores, rho).reshape(w1.shape)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                group = w1[:, i : i + nm[1]]
                scores = group * group / (d[i : i + nm[1]] ** 2)[None, :]
                keep1[:, i : i + nm[1]] = nm_mask(scores, nm)
            col = w1[:, i]
            q = torch.where(keep1[:, i], col, torch.zeros_like(col))
            err = (col - q) / d[i]  # (out,)
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        keep[:, i1:i2] = keep1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w.to(weight.dtype), keep
