"""Accumulators as pure functions: ``make_empty_*``, ``accumulate_*``, ``finalize_*``.

Estimators wire these to the taps of :mod:`cwca_export.scoring.passes`; tests call them
directly. Everything here is fp32 whatever dtype the model runs in. Per-Linear tensors use
the ``(out, in)`` layout (GPT-2's ``Conv1D`` weights are transposed by the taps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# ---- gradient moments: sum_n g_n and sum_n g_n^2 per weight --------------------------------


@dataclass
class GradMoments:
    """Running sums over sequences for one Linear.

    Attributes:
        total: sum_n g_n, ``(out, in)``.
        squares: sum_n g_n^2 (elementwise), ``(out, in)``; None when not tracked.
    """

    total: torch.Tensor
    squares: torch.Tensor | None


def make_empty_grad_moments(shape: tuple[int, int], device: torch.device, *, squares: bool = True) -> GradMoments:
    """Zeroed fp32 moments for a weight of ``shape`` (out, in)."""
    zeros = torch.zeros(shape, dtype=torch.float32, device=device)
    return GradMoments(total=zeros, squares=torch.zeros_like(zeros) if squares else None)


def accumulate_grad_moments(moments: GradMoments, grad: torch.Tensor) -> None:
    """Add one sequence's gradient (or a batch's summed gradient) to the moments, in place."""
    moments.total.add_(grad)
    if moments.squares is not None:
        moments.squares.addcmul_(grad, grad)


@dataclass
class DiagFisherBlock:
    """Finalised diagonal-Fisher statistics of one block.

    With N sequences, g = (1/N) sum_n g_n the mean gradient, F = (1/N) sum_n g_n^2 the
    uncentred second moment and S^2 = N (F - g^2) / (N - 1) the unbiased per-weight variance,
    E[g_i^2] = mu_i^2 + s_i^2 / N (mu = E g_n, s^2 = Var g_n), so at fixed weights w_i the
    noise contributes sum_i w_i s_i^2 / N to sum_i w_i g_i^2, estimated without bias by
    sum_i w_i S_i^2 / N = sum_i w_i (F_i - g_i^2) / (N - 1): the noise floor.

    Attributes:
        zeta2: sum_i g_i^2 / (F_i + lambda).
        grad_sq_norm: ||g||^2 of the mean gradient g.
        fisher_trace: trace F = (1/N) sum_n ||g_n||^2.
        effective_dim: sum_i F_i / (F_i + lambda), the expected zeta2 * N of pure noise.
        damping: lambda used.
        noise_floor: sum_i (F_i - g_i^2) / ((N - 1)(F_i + lambda)), zeta2's noise floor
            (weights 1 / (F_i + lambda) held fixed); None when N < 2.
        grad_noise_floor: (trace F - ||g||^2) / (N - 1) = trace(Cov) / N, ||g||^2's noise
            floor; None when N < 2.
    """

    zeta2: float
    grad_sq_norm: float
    fisher_trace: float
    effective_dim: float
    damping: float
    noise_floor: float | None = None
    grad_noise_floor: float | None = None

    @property
    def zeta2_debiased(self) -> float | None:
        """zeta2 - noise_floor = (N zeta2 - effective_dim) / (N - 1): unbiased for
        sum_i mu_i^2 / (F_i + lambda) at fixed weights (may be negative)."""
        return None if self.noise_floor is None else self.zeta2 - self.noise_floor

    @property
    def grad_sq_norm_debiased(self) -> float | None:
        """||g||^2 - grad_noise_floor = (N ||g||^2 - trace F) / (N - 1), unbiased for ||mu||^2."""
        return None if self.grad_noise_floor is None else self.grad_sq_norm - self.grad_noise_floor


def finalize_diag_fisher(
    moments: list[GradMoments], num_samples: int, damping: float, damping_mode: str
) -> DiagFisherBlock:
    """zeta2 = g^T (diag F + lambda I)^-1 g for one block from its Linears' moments.

    Args:
        moments: the block's per-Linear moments, summed over all N sequences (one gradient
            per sequence: the floors assume the squares are per-sequence).
        num_samples: N.
        damping: delta (relative: lambda = delta * mean F) or lambda (absolute).
        damping_mode: ``"relative"`` or ``"absolute"``.
    """
    n = num_samples
    n_params = sum(m.total.numel() for m in moments)
    trace = sum(float(m.squares.sum(dtype=torch.float64)) for m in moments) / n
    lam = damping * trace / n_params if damping_mode == "relative" else damping
    zeta2 = grad_sq = eff = floor = grad_floor = 0.0
    for m in moments:
        g = m.total.double() / n
        f = m.squares.double() / n
        denom = f + lam
        if lam == 0:  # undamped: a weight with no gradient contributes nothing
            denom = torch.where(f > 0, f, torch.ones_like(f))
        g2 = g * g
        var = (f - g2).clamp_min(0)  # N/(N-1) x this is the unbiased variance; >= 0 up to rounding
        zeta2 += float((g2 / denom).sum())
        grad_sq += float(g2.sum())
        eff += float((f / denom).sum())
        floor += float((var / denom).sum())
        grad_floor += float(var.sum())
    if n < 2:
        return DiagFisherBlock(zeta2, grad_sq, trace, eff, lam)
    return DiagFisherBlock(zeta2, grad_sq, trace, eff, lam, floor / (n - 1), grad_floor / (n - 1))


# ---- K-FAC factors: A = E[a a^T] over tokens, G = E_n[sum_t s s^T] -------------------------


@dataclass
class KfacFactors:
    """Running K-FAC sums for one Linear.

    Attributes:
        a_sum: sum over tokens of a a^T, ``(in, in)``.
        g_sum: sum over tokens of s s^T, ``(out, out)``, s = dl_n/d(W a) for the token's sequence.
        tokens: tokens seen by ``a_sum``.
    """

    a_sum: torch.Tensor
    g_sum: torch.Tensor
    tokens: int = 0


def make_empty_kfac(in_features: int, out_features: int, device: torch.device) -> KfacFactors:
    """Zeroed fp32 K-FAC sums for a Linear ``in -> out``."""
    return KfacFactors(
        a_sum=torch.zeros(in_features, in_features, dtype=torch.float32, device=device),
        g_sum=torch.zeros(out_features, out_features, dtype=torch.float32, device=device),
    )


def accumulate_kfac_input(factors: KfacFactors, a: torch.Tensor) -> None:
    """Add inputs ``a`` ``(tokens, in)`` to A, in place."""
    factors.a_sum.addmm_(a.t(), a)
    factors.tokens += a.shape[0]


def accumulate_kfac_output_grad(factors: KfacFactors, s: torch.Tensor) -> None:
    """Add output gradients ``s`` ``(tokens, out)`` to G, in place."""
    factors.g_sum.addmm_(s.t(), s)


@dataclass
class KfacEigen:
    """Eigendecompositions A = Q_A diag(la) Q_A^T and G = Q_G diag(lg) Q_G^T (float64)."""

    la: torch.Tensor  # (in,)
    qa: torch.Tensor  # (in, in)
    lg: torch.Tensor  # (out,)
    qg: torch.Tensor  # (out, out)

    @property
    def trace(self) -> float:
        """trace(A kron G) = trace(A) trace(G), the K-FAC Fisher's trace."""
        return float(self.la.sum() * self.lg.sum())


def finalize_kfac(factors: KfacFactors, num_samples: int) -> KfacEigen:
    """A = a_sum / tokens and G = g_sum / N, then their eigendecompositions.

    With this scaling A kron G approximates E_n[vec(dW_n) vec(dW_n)^T], the per-sequence
    empirical Fisher whose diagonal the ``fisher`` estimator uses.
    """
    a = factors.a_sum.double() / max(factors.tokens, 1)
    g = factors.g_sum.double() / num_samples
    la, qa = torch.linalg.eigh(a)
    lg, qg = torch.linalg.eigh(g)
    return KfacEigen(la.clamp_min(0), qa, lg.clamp_min(0), qg)


def kfac_inverse_apply(eigen: KfacEigen, dw: torch.Tensor, damping: float) -> torch.Tensor:
    """(A kron G + damping I)^-1 vec(dW) as a matrix: G and A inverted in their eigenbasis.

    Damping is added to the Kronecker eigenvalues lg_i * la_j (EK-FAC style), not to each
    factor, so it is exactly the Tikhonov term of the explicit Kronecker matrix.

    Args:
        eigen: the factors' eigendecompositions.
        dw: ``(out, in)``.
        damping: lambda > 0 (or >= 0 when A kron G is non-singular).
    """
    v = eigen.qg.t() @ dw.double() @ eigen.qa  # (out, in) in the eigenbasis
    v = v / (eigen.lg[:, None] * eigen.la[None, :] + damping)
    return eigen.qg @ v @ eigen.qa.t()


def kfac_quadratic(eigen: KfacEigen, dw: torch.Tensor, damping: float) -> float:
    """vec(dW)^T (A kron G + damping I)^-1 vec(dW)."""
    v = eigen.qg.t() @ dw.double() @ eigen.qa
    return float((v * v / (eigen.lg[:, None] * eigen.la[None, :] + damping)).sum())


# ---- OWL: Wanda metric |W_ij| * ||X_j|| and its outlier ratio -------------------------------


def make_empty_input_norms(in_features: int, device: torch.device) -> torch.Tensor:
    """Zeroed sum over tokens of squared inputs per input feature, ``(in,)``."""
    return torch.zeros(in_features, dtype=torch.float32, device=device)


def accumulate_input_norms(norms: torch.Tensor, a: torch.Tensor) -> None:
    """Add ``a`` ``(tokens, in)``'s squared column norms, in place."""
    norms.add_((a * a).sum(dim=0))


def finalize_owl_ratio(
    weights: list[torch.Tensor], norms: list[torch.Tensor], num_samples: int, threshold: float
) -> float:
    """OWL's layerwise outlier ratio: the fraction of Wanda metrics above threshold x their mean.

    The metric |W_ij| * sqrt(||X_j||^2 / N) is pooled over the block's Linears, as OWL does.
    """
    metrics = [
        (w.detach().float().abs() * torch.sqrt(x / num_samples)[None, :]).reshape(-1)
        for w, x in zip(weights, norms, strict=True)
    ]
    pooled = torch.cat(metrics)
    return float((pooled > threshold * pooled.mean()).double().mean())


# ---- DataInf: (H + lambda I)^-1 v ~ (1/(n lambda)) sum_i [v - (v.g_i)/(lambda + |g_i|^2) g_i] ----


def datainf_term(gi_dot_v: float, gi_dot_u: float, gi_sq: float, damping: float) -> float:
    """One sample's correction (u.g_i)(g_i.v) / (lambda + ||g_i||^2) of u^T (H + lambda I)^-1 v."""
    return gi_dot_v * gi_dot_u / (damping + gi_sq)


def finalize_datainf(u_dot_v: float, terms_sum: float, num_samples: int, damping: float) -> float:
    """u^T (H + lambda I)^-1 v in DataInf's form: (1/lambda) [u.v - (1/n) sum_i term_i]."""
    return (u_dot_v - terms_sum / num_samples) / damping
