"""Estimators against references computed independently here: brute-force per-sequence
gradients, explicit Kronecker matrices, and Hessians from ``torch.autograd.functional``."""

from __future__ import annotations

import pytest
import torch
from helpers import sample_text, tiny_model, tiny_tokenizer

from cwca_export.blocks import find_blocks
from cwca_export.data import calibration_data
from cwca_export.scoring import score
from cwca_export.scoring.accumulators import (
    accumulate_kfac_input,
    accumulate_kfac_output_grad,
    finalize_kfac,
    kfac_inverse_apply,
    kfac_quadratic,
    make_empty_kfac,
)

MICRO = {  # one block of 144 weights: small enough for an explicit Hessian
    "hidden_size": 4, "intermediate_size": 8, "num_attention_heads": 2,
    "num_key_value_heads": 1, "num_hidden_layers": 1,
}


def per_sequence_grads(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per block, a (N, n_k) matrix of each sequence's own gradient, by a plain loop."""
    blocks = find_blocks(model)
    weights = [[m.weight for m in b.linears.values()] for b in blocks]
    rows: list[list[torch.Tensor]] = [[] for _ in blocks]
    for seq in ids:
        loss = model(input_ids=seq[None], labels=seq[None]).loss
        grads = torch.autograd.grad(loss, [w for ws in weights for w in ws])
        it = iter(grads)
        for k, ws in enumerate(weights):
            rows[k].append(torch.cat([next(it).reshape(-1) for _ in ws]).double())
    return [torch.stack(r) for r in rows]


def calib(num_samples, seq_len, held_out=0):
    return calibration_data([sample_text()], tiny_tokenizer(), num_samples=num_samples, seq_len=seq_len,
                            held_out=held_out)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_diag_fisher_gradnorm_and_obd_equal_a_per_sequence_loop(family):
    model = tiny_model(family)
    data = calib(6, 24)
    grads = per_sequence_grads(model, data.input_ids)
    fisher = score(model, data, method="fisher", progress=False)
    gradnorm = score(model, data, method="gradnorm", progress=False)
    obd = score(model, data, method="obd", progress=False)
    for k, (gk, block) in enumerate(zip(grads, find_blocks(model), strict=True)):
        g = gk.mean(0)
        f = (gk * gk).mean(0)
        lam = 0.1 * f.mean()
        theta = torch.cat([m.weight.detach().reshape(-1) for m in block.linears.values()]).double()
        assert fisher.zeta2[k] == pytest.approx(float((g * g / (f + lam)).sum()), rel=1e-4)
        assert fisher.stats["fisher_trace"][k] == pytest.approx(float(f.sum()), rel=1e-4)
        assert fisher.stats["grad_sq_norm"][k] == pytest.approx(float(g @ g), rel=1e-4)
        assert fisher.stats["zeta2_noise_ratio"][k] == pytest.approx(fisher.zeta2[k] * 6 / gk.shape[1])
        assert gradnorm.zeta2[k] == pytest.approx(float(g @ g), rel=1e-4)
        assert obd.zeta2[k] == pytest.approx(float((f * theta * theta).sum()), rel=1e-4)


def test_kfac_inverse_equals_the_explicit_kronecker_inverse():
    gen = torch.Generator().manual_seed(0)
    d_in, d_out, tokens, n, lam = 5, 3, 40, 4, 0.03
    a = torch.randn(tokens, d_in, generator=gen)
    s = torch.randn(tokens, d_out, generator=gen)
    factors = make_empty_kfac(d_in, d_out, torch.device("cpu"))
    accumulate_kfac_input(factors, a[:25])
    accumulate_kfac_input(factors, a[25:])
    accumulate_kfac_output_grad(factors, s)
    eigen = finalize_kfac(factors, n)
    big_a = (a.T @ a).double() / tokens  # E[a a^T] over tokens
    big_g = (s.T @ s).double() / n  # sum over tokens, mean over sequences
    dw = torch.randn(d_out, d_in, generator=gen).double()
    vec = dw.T.reshape(-1)  # column-major vec, so (A kron G) vec(dW) = vec(G dW A)
    explicit = torch.linalg.solve(torch.kron(big_a, big_g) + lam * torch.eye(d_in * d_out, dtype=torch.float64), vec)
    assert torch.allclose(kfac_inverse_apply(eigen, dw, lam).T.reshape(-1), explicit, rtol=1e-5, atol=1e-8)
    assert kfac_quadratic(eigen, dw, lam) == pytest.approx(float(vec @ explicit), rel=1e-6)
    assert eigen.trace == pytest.approx(float(torch.trace(big_a) * torch.trace(big_g)), rel=1e-6)  # fp32 sums


def block_hessian(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, H) of the mean per-sequence loss w.r.t. block 0's weights, H from autograd.functional."""
    block = find_blocks(model)[0]
    names = {name: module for name, module in block.linears.items()}
    shapes = [m.weight.shape for m in names.values()]
    sizes = [s.numel() for s in shapes]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        params = {f"{n}.weight": p.view(shape) for n, p, shape in zip(names, flat.split(sizes), shapes, strict=True)}
        total = 0
        for seq in ids:
            out = torch.func.functional_call(model, params, kwargs={"input_ids": seq[None], "labels": seq[None]})
            total = total + out.loss
        return total / ids.shape[0]

    flat = torch.cat([m.weight.detach().reshape(-1) for m in names.values()])
    g = torch.autograd.grad(loss_of(flat.requires_grad_()), flat)[0]
    return g, torch.autograd.functional.hessian(loss_of, flat.detach(), vectorize=True)


def test_exact_equals_the_damped_block_hessian_solve_and_the_quadratic_model_identity():
    model = tiny_model("llama", **MICRO).double()
    data = calib(2, 12)
    g, hess = block_hessian(model, data.input_ids)
    n = g.numel()
    lowest = float(torch.linalg.eigvalsh(hess)[0])
    tau = 1.5 * max(0.0, -lowest) + 1e-3  # H + tau I positive definite and well conditioned
    damped = hess + tau * torch.eye(n, dtype=torch.float64)
    reference = float(g @ torch.linalg.solve(damped, g))

    result = score(model, data, method="exact", damping=tau, damping_mode="absolute", progress=False,
                   options={"cg_max_iter": 300, "cg_tol": 1e-6})
    assert result.stats["cg_negative_curvature"] == [0.0]
    assert result.zeta2[0] == pytest.approx(reference, rel=1e-5)
    # m(d) = g.d + d^T (H + tau I) d / 2 is minimised at d* = -(H + tau I)^-1 g, m(d*) = -zeta2 / 2
    d_star = -torch.linalg.solve(damped, g)
    decrease = -float(g @ d_star + 0.5 * d_star @ damped @ d_star)
    assert result.zeta2[0] == pytest.approx(2 * decrease, rel=1e-5)


def test_layerif_equals_the_explicit_datainf_inverse():
    model = tiny_model("llama", **MICRO).double()
    data = calib(4, 16, held_out=2)
    train = per_sequence_grads(model, data.input_ids)[0]  # (N, n_k)
    v = per_sequence_grads(model, data.held_out)[0].mean(0)
    n, p = train.shape
    lam = 0.1 * float((train * train).mean())  # DataInf's lambda = 0.1 * mean(g^2)
    eye = torch.eye(p, dtype=torch.float64)
    inverse = sum(torch.linalg.inv(gi[:, None] * gi[None, :] + lam * eye) for gi in train) / n
    reference = float(train.mean(0) @ inverse @ v)

    result = score(model, data, method="layerif", progress=False)
    assert result.settings["held_out"] == 2
    assert result.stats["layerif_influence"][0] == pytest.approx(reference, rel=1e-6)
    assert result.zeta2[0] == pytest.approx(max(reference, 0.0), rel=1e-6)
