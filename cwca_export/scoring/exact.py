"""``exact``: the true damped block Hessian, through Hessian-vector products and CG.

zeta2_k = g_k^T (H_kk + lambda_k I)^-1 g_k, H_kk = (1/N) sum_n d^2 l_n / d theta_k^2,
solved by conjugate gradients run for all blocks in lockstep: each CG iteration is one pass
over the data (a forward, a backward with ``create_graph`` and one double-backward per block
still iterating). Costly: for small models and for validating the cheaper estimators.
Relative damping is relative to the mean diagonal of the empirical Fisher, as for ``fisher``.
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cwca_export.blocks import is_conv1d
from cwca_export.scoring.fisher import collect_grad_moments, diag_fisher, gradient_stats
from cwca_export.scoring.passes import ScoringRun
from cwca_export.scoring.registry import Estimate, register_estimator

Vec = list[torch.Tensor]  # one block's parameters, one tensor per Linear weight (native layout)


def _dot(a: Vec, b: Vec) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def hessian_vector_products(run: ScoringRun, vectors: dict[int, Vec]) -> dict[int, Vec]:
    """(1/N) sum_n H_kk^(n) v_k for every block k in ``vectors``, summed over processes."""
    weights = {k: [m.weight for m in run.blocks[k].linears.values()] for k in vectors}
    out = {k: [torch.zeros_like(v) for v in vec] for k, vec in vectors.items()}
    # Fused SDPA kernels (flash / memory-efficient) have no double backward; the math one does.
    with sdpa_kernel([SDPBackend.MATH]):
        _accumulate_hvp(run, vectors, weights, out)
    run.reduce_sum([t for vec in out.values() for t in vec])
    return {k: [t / run.num_samples for t in vec] for k, vec in out.items()}


def _accumulate_hvp(run: ScoringRun, vectors: dict[int, Vec], weights: dict[int, Vec], out: dict[int, Vec]) -> None:
    for _, loss in run.losses(desc="scoring: Hessian-vector products"):
        flat = [w for k in vectors for w in weights[k]]
        grads = torch.autograd.grad(loss, flat, create_graph=True)
        offset = 0
        for k, vec in vectors.items():
            block_grads = grads[offset : offset + len(vec)]
            offset += len(vec)
            inner = sum((g * v.to(g.dtype)).sum() for g, v in zip(block_grads, vec, strict=True))
            hv = torch.autograd.grad(inner, weights[k], retain_graph=True)
            for acc, h in zip(out[k], hv, strict=True):
                acc.add_(h.detach().float().to(acc.device))


@register_estimator(
    "exact",
    summary="true damped block Hessian via Hessian-vector products and conjugate gradients",
    options={"cg_max_iter": 100, "cg_tol": 1e-6},
    needs_resident="Hessian-vector products differentiate twice through the weights, which offloaded"
    " weights never hold",
)
def exact(run: ScoringRun) -> Estimate:
    moments = collect_grad_moments(run)
    fisher = diag_fisher(run, moments)
    lam = [b.damping for b in fisher]
    g: dict[int, Vec] = {}
    for block, block_moments in zip(run.blocks, moments, strict=True):
        g[block.index] = [
            (block_moments[name].total / run.num_samples).t().contiguous()
            if is_conv1d(m) else block_moments[name].total / run.num_samples
            for name, m in block.linears.items()
        ]
    max_iter, tol = int(run.options["cg_max_iter"]), float(run.options["cg_tol"])
    x = {k: [torch.zeros_like(t) for t in vec] for k, vec in g.items()}
    r = {k: [t.clone() for t in vec] for k, vec in g.items()}
    p = {k: [t.clone() for t in vec] for k, vec in g.items()}
    rs = {k: _dot(vec, vec) for k, vec in g.items()}
    target = {k: tol * math.sqrt(v) for k, v in rs.items()}
    active = {k for k, v in rs.items() if v > 0}
    iterations = dict.fromkeys(g, 0)
    negative = dict.fromkeys(g, 0.0)
    while active and max(iterations[k] for k in active) < max_iter:
        hp = hessian_vector_products(run, {k: p[k] for k in sorted(active)})
        for k in sorted(active):
            ap = [h + lam[k] * v for h, v in zip(hp[k], p[k], strict=True)]  # (H + lambda I) p
            curvature = _dot(p[k], ap)
            iterations[k] += 1
            if curvature <= 0:  # damped H not positive definite along p: keep the last iterate
                negative[k] = 1.0
                active.discard(k)
                continue
            alpha = rs[k] / curvature
            for xi, ri, pi, api in zip(x[k], r[k], p[k], ap, strict=True):
                xi.add_(pi, alpha=alpha)
                ri.sub_(api, alpha=alpha)
            new_rs = _dot(r[k], r[k])
            if math.sqrt(new_rs) <= target[k] or iterations[k] >= max_iter:
                rs[k] = new_rs
                active.discard(k)
                continue
            for pi, ri in zip(p[k], r[k], strict=True):
                pi.mul_(new_rs / rs[k]).add_(ri)
            rs[k] = new_rs
    zeta2 = [max(0.0, _dot(g[k], x[k])) for k in sorted(g)]
    stats = gradient_stats(run, fisher)
    stats["cg_iterations"] = [float(iterations[k]) for k in sorted(g)]
    stats["cg_relative_residual"] = [
        math.sqrt(rs[k]) / math.sqrt(_dot(g[k], g[k])) if _dot(g[k], g[k]) > 0 else 0.0 for k in sorted(g)
    ]
    stats["cg_negative_curvature"] = [negative[k] for k in sorted(g)]
    return Estimate(zeta2=zeta2, stats=stats)
