"""Estimators fed by gradient moments: ``fisher`` (default), ``gradnorm`` and ``obd``.

One pass accumulates sum_n g_n and sum_n g_n^2 per weight; from them

- ``fisher``: zeta2_k = sum_i g_i^2 / (F_i + lambda_k), F = (1/N) sum_n g_n^2;
- ``gradnorm``: zeta2_k = ||g_k||^2 (identity curvature);
- ``obd``: zeta2_k = sum_i F_i theta_i^2, the second-order loss increase of zeroing the block
  (Optimal Brain Damage saliency with the Fisher for the Hessian).

All three record the same raw statistics, enough to debias later: with N sequences,
E||g||^2 = ||mu||^2 + tr(Cov)/N, so ``(N ||g||^2 - tr F) / (N - 1)`` is unbiased for ||mu||^2,
and ``(N zeta2 - effective_dim) / (N - 1)`` does the same for the Fisher zeta2 at fixed lambda.
"""

from __future__ import annotations

import torch

from cwca_export.blocks import weight_out_in
from cwca_export.scoring.accumulators import (
    DiagFisherBlock,
    GradMoments,
    accumulate_grad_moments,
    finalize_diag_fisher,
    make_empty_grad_moments,
)
from cwca_export.scoring.passes import ScoringRun
from cwca_export.scoring.registry import Estimate, register_estimator


def collect_grad_moments(
    run: ScoringRun, split: str = "calibration", *, squares: bool = True
) -> list[dict[str, GradMoments]]:
    """One gradient pass over ``split``; per block, per Linear moments summed over all processes."""
    moments = [
        {name: make_empty_grad_moments(tuple(weight_out_in(m).shape), run.device, squares=squares)
         for name, m in block.linears.items()}
        for block in run.blocks
    ]
    run.gradient_pass(
        split,
        on_grad=lambda k, name, g: accumulate_grad_moments(moments[k][name], g.to(run.device)),
        desc="scoring: gradient moments",
    )
    run.reduce_sum([t for block in moments for m in block.values() for t in (m.total, m.squares) if t is not None])
    return moments


def diag_fisher(run: ScoringRun, moments: list[dict[str, GradMoments]]) -> list[DiagFisherBlock]:
    """Finalise every block's diagonal-Fisher statistics with the run's damping."""
    return [
        finalize_diag_fisher(list(block.values()), run.num_samples, run.damping, run.damping_mode)
        for block in moments
    ]


def gradient_stats(run: ScoringRun, fisher: list[DiagFisherBlock]) -> dict[str, list[float]]:
    """The raw per-block statistics every gradient estimator records."""
    n = run.num_samples
    stats = {
        "grad_sq_norm": [b.grad_sq_norm for b in fisher],
        "fisher_trace": [b.fisher_trace for b in fisher],
        "fisher_effective_dim": [b.effective_dim for b in fisher],
        "damping": [b.damping for b in fisher],
    }
    if n > 1:
        stats["grad_sq_norm_debiased"] = [(n * b.grad_sq_norm - b.fisher_trace) / (n - 1) for b in fisher]
    return stats


@register_estimator("fisher", summary="diagonal empirical Fisher, damped: g^T (F + lambda I)^-1 g")
def fisher(run: ScoringRun) -> Estimate:
    blocks = diag_fisher(run, collect_grad_moments(run))
    stats = gradient_stats(run, blocks)
    n = run.num_samples
    if n > 1:
        stats["zeta2_debiased"] = [(n * b.zeta2 - b.effective_dim) / (n - 1) for b in blocks]
    return Estimate(zeta2=[b.zeta2 for b in blocks], stats=stats)


@register_estimator("gradnorm", summary="identity curvature: ||g_k||^2, the loud-floor baseline")
def gradnorm(run: ScoringRun) -> Estimate:
    blocks = diag_fisher(run, collect_grad_moments(run))
    return Estimate(zeta2=[b.grad_sq_norm for b in blocks], stats=gradient_stats(run, blocks))


@register_estimator("obd", summary="Optimal Brain Damage saliency sum_i F_i theta_i^2")
def obd(run: ScoringRun) -> Estimate:
    moments = collect_grad_moments(run)
    saliency = []
    for block, block_moments in zip(run.blocks, moments, strict=True):
        total = 0.0
        for name, module in block.linears.items():
            theta = weight_out_in(module).detach().to(run.device, torch.float64)
            f = block_moments[name].squares.double() / run.num_samples
            total += float((f * theta * theta).sum())
        saliency.append(total)
    return Estimate(zeta2=saliency, stats=gradient_stats(run, diag_fisher(run, moments)))
