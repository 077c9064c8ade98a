"""Estimators fed by gradient moments: ``fisher`` (default), ``gradnorm`` and ``obd``.

One pass accumulates sum_n g_n and sum_n g_n^2 per weight; from them

- ``fisher``: zeta2_k = sum_i g_i^2 / (F_i + lambda_k), F = (1/N) sum_n g_n^2;
- ``gradnorm``: zeta2_k = ||g_k||^2 (identity curvature);
- ``obd``: zeta2_k = sum_i F_i theta_i^2, the second-order loss increase of zeroing the block
  (Optimal Brain Damage saliency with the Fisher for the Hessian).

Noise: with N sequences, mu = E g_n and s_i^2 = Var g_{n,i}, E[g_i^2] = mu_i^2 + s_i^2 / N, so
fisher and gradnorm (quadratic in the mean gradient g) sit on a noise floor even where mu = 0.
Both record ``noise_floor`` = sum_i w_i (F_i - g_i^2) / (N - 1) (w_i = 1 / (F_i + lambda_k) for
fisher, 1 for gradnorm; the weights held fixed), an unbiased estimate of sum_i w_i s_i^2 / N,
``zeta2_debiased`` = zeta2 - noise_floor, unbiased for sum_i w_i mu_i^2, and ``snr`` =
zeta2_debiased / noise_floor (:func:`cwca_export.scores.signal_to_noise`). Option ``debias``
scores with max(zeta2_debiased, 0) and keeps the raw value in ``zeta2_biased``.

obd has no such floor: sum_i F_i theta_i^2 is a mean of per-sequence saliencies
sum_i g_{n,i}^2 theta_i^2, unbiased for its expectation at any N (its error shrinks like
1/sqrt(N) instead), so it records neither ``noise_floor`` nor ``snr``.
"""

from __future__ import annotations

import torch

from cwca_export.blocks import weight_out_in
from cwca_export.scores import signal_to_noise
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
    """One gradient pass over ``split``; per block, per Linear moments summed over all processes.

    The squares need each sequence's own gradient: at batch size 1 autograd's, at larger
    batch sizes the per-sequence gradients the pass splits from the batch (see
    :mod:`cwca_export.scoring.passes`), the same sums to float rounding.
    """
    moments = [
        {name: make_empty_grad_moments(tuple(weight_out_in(m).shape), run.device, squares=squares)
         for name, m in block.linears.items()}
        for block in run.blocks
    ]
    run.gradient_pass(
        split,
        on_sample_grad=lambda k, name, _, g: accumulate_grad_moments(moments[k][name], g.to(run.device)),
        desc="scoring: gradient moments",
        state=moments,
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
    stats = {
        "grad_sq_norm": [b.grad_sq_norm for b in fisher],
        "fisher_trace": [b.fisher_trace for b in fisher],
        "fisher_effective_dim": [b.effective_dim for b in fisher],
        "damping": [b.damping for b in fisher],
    }
    if run.num_samples > 1:
        stats["grad_sq_norm_debiased"] = [b.grad_sq_norm_debiased for b in fisher]
    return stats


def noisy_estimate(
    run: ScoringRun, raw: list[float], floors: list[float | None], stats: dict[str, list[float]]
) -> Estimate:
    """An estimate whose raw scores sit on a noise floor: record the floor, debias on request.

    Adds ``noise_floor``, ``zeta2_debiased`` (raw - floor) and ``snr`` to ``stats`` when N > 1;
    with ``run.options["debias"]`` the scores are max(zeta2_debiased, 0) and the raw ones go
    to ``stats["zeta2_biased"]``.
    """
    debias = bool(run.options.get("debias", False))
    if run.num_samples < 2:
        if debias:
            raise ValueError(f"debias: needs at least 2 calibration sequences, got {run.num_samples}")
        return Estimate(zeta2=list(raw), stats=stats)
    floors = [float(f) for f in floors]
    debiased = [z - f for z, f in zip(raw, floors, strict=True)]
    stats["noise_floor"] = floors
    stats["zeta2_debiased"] = debiased
    stats["snr"] = [signal_to_noise(z, f) for z, f in zip(raw, floors, strict=True)]
    if not debias:
        return Estimate(zeta2=list(raw), stats=stats)
    stats["zeta2_biased"] = list(raw)
    return Estimate(zeta2=[max(d, 0.0) for d in debiased], stats=stats)


_DEBIAS = {"debias": False}  # score with max(zeta2 - noise_floor, 0) instead of zeta2


@register_estimator(
    "fisher", summary="diagonal empirical Fisher, damped: g^T (F + lambda I)^-1 g", options=_DEBIAS, resumable=True
)
def fisher(run: ScoringRun) -> Estimate:
    blocks = diag_fisher(run, collect_grad_moments(run))
    return noisy_estimate(run, [b.zeta2 for b in blocks], [b.noise_floor for b in blocks], gradient_stats(run, blocks))


@register_estimator(
    "gradnorm", summary="identity curvature: ||g_k||^2, the loud-floor baseline", options=_DEBIAS, resumable=True
)
def gradnorm(run: ScoringRun) -> Estimate:
    blocks = diag_fisher(run, collect_grad_moments(run))
    return noisy_estimate(
        run, [b.grad_sq_norm for b in blocks], [b.grad_noise_floor for b in blocks], gradient_stats(run, blocks)
    )


@register_estimator("obd", summary="Optimal Brain Damage saliency sum_i F_i theta_i^2", resumable=True)
def obd(run: ScoringRun) -> Estimate:
    moments = collect_grad_moments(run)
    saliency = []
    for block, block_moments in zip(run.blocks, moments, strict=True):
        total = 0.0
        for name, module in block.linears.items():
            theta = run.weight(module).detach().to(run.device, torch.float64)
            f = block_moments[name].squares.double() / run.num_samples
            total += float((f * theta * theta).sum())
        saliency.append(total)
    return Estimate(zeta2=saliency, stats=gradient_stats(run, diag_fisher(run, moments)))
