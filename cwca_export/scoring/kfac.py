"""``kfac``: Kronecker-factored curvature per Linear, A = E[a a^T], G = E[s s^T].

zeta2_k = sum over the block's Linears of vec(dW)^T (A kron G + lambda_k I)^-1 vec(dW), with
dW the mean gradient; the inverse is applied in the factors' eigenbasis (EK-FAC-style
damping on the Kronecker eigenvalues). One pass feeds A (forward taps), G (backward taps) and
the mean gradient; it needs no per-sequence gradients, so it may batch sequences.
"""

from __future__ import annotations

import torch

from cwca_export.blocks import weight_out_in
from cwca_export.scoring.accumulators import (
    accumulate_grad_moments,
    accumulate_kfac_input,
    accumulate_kfac_output_grad,
    finalize_kfac,
    kfac_quadratic,
    make_empty_grad_moments,
    make_empty_kfac,
)
from cwca_export.scoring.passes import ScoringRun
from cwca_export.scoring.registry import Estimate, register_estimator


@register_estimator(
    "kfac",
    summary="K-FAC: per Linear (A kron G + lambda I)^-1 in the eigenbasis",
    per_sequence=False,
    resumable=True,
)
def kfac(run: ScoringRun) -> Estimate:
    factors, moments = [], []
    for block in run.blocks:
        shapes = {name: tuple(weight_out_in(m).shape) for name, m in block.linears.items()}
        factors.append({name: make_empty_kfac(i, o, run.device) for name, (o, i) in shapes.items()})
        moments.append({name: make_empty_grad_moments(s, run.device, squares=False) for name, s in shapes.items()})
    run.gradient_pass(
        on_grad=lambda k, name, g: accumulate_grad_moments(moments[k][name], g.to(run.device)),
        on_input=lambda k, name, a: accumulate_kfac_input(factors[k][name], a.to(run.device)),
        on_output_grad=lambda k, name, s: accumulate_kfac_output_grad(factors[k][name], s.to(run.device)),
        desc="scoring: K-FAC factors",
        state=[factors, moments],
    )
    tokens = torch.tensor(
        [float(f.tokens) for block in factors for f in block.values()], dtype=torch.float64, device=run.device
    )
    run.reduce_sum(
        [t for block in factors for f in block.values() for t in (f.a_sum, f.g_sum)]
        + [m.total for block in moments for m in block.values()]
        + [tokens]
    )
    for f, count in zip((f for block in factors for f in block.values()), tokens.tolist(), strict=True):
        f.tokens = int(count)

    zeta2, traces, grad_sq, damping = [], [], [], []
    for block, block_factors, block_moments in zip(run.blocks, factors, moments, strict=True):
        eigens = {name: finalize_kfac(f, run.num_samples) for name, f in block_factors.items()}
        trace = sum(e.trace for e in eigens.values())
        lam = run.damping_for(trace / block.n_params)
        grads = {name: m.total.double() / run.num_samples for name, m in block_moments.items()}
        zeta2.append(sum(kfac_quadratic(eigens[name], g, lam) for name, g in grads.items()))
        traces.append(trace)
        grad_sq.append(sum(float((g * g).sum()) for g in grads.values()))
        damping.append(lam)
    return Estimate(
        zeta2=zeta2,
        stats={"grad_sq_norm": grad_sq, "kfac_trace": traces, "damping": damping},
    )
