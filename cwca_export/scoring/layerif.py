"""``layerif``: DataInf influence of the calibration set on a held-out split, per block.

zeta2_k = g_k^T (H_kk + lambda_k I)^-1 v_k, with g the calibration mean gradient, v the
held-out mean gradient and the inverse in DataInf's closed form (Kwon et al., 2024)

    (H + lambda I)^-1 v ~ (1/(n lambda)) sum_i [v - (v.g_i) / (lambda + ||g_i||^2) g_i],
    lambda = 0.1 * mean(g_i^2)  (the default relative damping, delta = 0.1).

-g^T (H + lambda I)^-1 v summed over calibration samples is LayerIF's per-layer influence on
the held-out loss; its negation is the held-out loss decrease a damped Newton step on the
block predicts, a cross-fitted zeta2 (g and v come from disjoint data, so no noise floor).
Negative values are clipped to 0 in zeta2 and kept signed in ``stats["layerif_influence"]``.
Passes: gradient moments of both splits (g, v, lambda), then per-sample dot products.
"""

from __future__ import annotations

import torch

from cwca_export.scoring.accumulators import datainf_term, finalize_datainf
from cwca_export.scoring.fisher import collect_grad_moments, diag_fisher, gradient_stats
from cwca_export.scoring.passes import ScoringRun
from cwca_export.scoring.registry import Estimate, register_estimator


@register_estimator(
    "layerif",
    summary="LayerIF: DataInf influence of calibration samples on a held-out split",
    needs_held_out=True,
    resumable=True,
)
def layerif(run: ScoringRun) -> Estimate:
    if run.damping == 0:
        raise ValueError("layerif: DataInf's inverse needs damping > 0")
    moments = collect_grad_moments(run)
    held = collect_grad_moments(run, "held_out", squares=False)
    fisher = diag_fisher(run, moments)
    lam = [b.damping for b in fisher]
    g = [{n: m.total / run.num_samples for n, m in block.items()} for block in moments]
    v = [{n: m.total / run.num_held_out for n, m in block.items()} for block in held]
    k_blocks = len(run.blocks)
    # per sequence b of the batch: g_i.v, g_i.g, |g_i|^2
    current = torch.zeros(3, run.batch_size, k_blocks, dtype=torch.float64, device=run.device)
    terms = torch.zeros(k_blocks, dtype=torch.float64, device=run.device)

    def on_sample_grad(k: int, name: str, b: int, gi: torch.Tensor) -> None:
        gi = gi.to(run.device)
        current[0, b, k] += (gi * v[k][name]).sum(dtype=torch.float64)
        current[1, b, k] += (gi * g[k][name]).sum(dtype=torch.float64)
        current[2, b, k] += (gi * gi).sum(dtype=torch.float64)

    def on_batch_end(indices: list[int]) -> None:
        for b in range(len(indices)):
            for k in range(k_blocks):
                terms[k] += datainf_term(
                    float(current[0, b, k]), float(current[1, b, k]), float(current[2, b, k]), lam[k])
        current.zero_()

    run.gradient_pass(
        on_sample_grad=on_sample_grad, on_batch_end=on_batch_end, desc="scoring: DataInf products", state=terms)
    run.reduce_sum([terms])
    influence = []
    for k in range(k_blocks):
        g_dot_v = sum(float((g[k][n].double() * v[k][n].double()).sum()) for n in g[k])
        influence.append(finalize_datainf(g_dot_v, float(terms[k]), run.num_samples, lam[k]))
    stats = gradient_stats(run, fisher)
    stats["layerif_influence"] = influence
    stats["heldout_grad_sq_norm"] = [
        sum(float((t.double() ** 2).sum()) for t in block.values()) for block in v
    ]
    return Estimate(zeta2=[max(0.0, x) for x in influence], stats=stats)
