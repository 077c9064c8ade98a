"""The compression math as pure functions, against independent NumPy / brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cwca_export.compression import lowrank, registry, sparsity, stats, width


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _inputs(tokens, features, seed=1):
    """Correlated, unevenly scaled inputs (tokens, in), as real activations are."""
    mix = _rand(features, features, seed=seed) / features**0.5
    scale = torch.logspace(-1, 1, features, dtype=torch.float64)
    return (_rand(tokens, features, seed=seed + 1) @ mix) * scale


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("rho", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_magnitude_mask_removes_the_smallest_rounded_count(rho):
    w = _rand(12, 20)
    keep = sparsity.magnitude_mask(w, rho)
    k = int(round(rho * w.numel()))
    assert int((~keep).sum()) == k
    order = np.argsort(np.abs(w.numpy()).reshape(-1), kind="stable")
    expected = np.ones(w.numel(), dtype=bool)
    expected[order[:k]] = False
    assert np.array_equal(keep.numpy().reshape(-1), expected)


def test_wanda_mask_matches_a_per_row_brute_force():
    w, x = _rand(9, 16), _inputs(50, 16)
    norms = torch.linalg.vector_norm(x, dim=0)
    keep = sparsity.wanda_mask(w, norms, 0.4)
    metric = np.abs(w.numpy()) * np.sqrt((x.numpy() ** 2).sum(axis=0))[None, :]
    k = int(round(0.4 * 16))
    for row in range(9):
        dropped = set(np.argsort(metric[row])[:k])
        assert set(np.flatnonzero(~keep[row].numpy())) == dropped


@settings(max_examples=40, deadline=None)
@given(
    pattern=st.sampled_from([(1, 2), (2, 4), (4, 8), (3, 8)]),
    rows=st.integers(1, 6),
    groups=st.integers(1, 4),
    seed=st.integers(0, 10_000),
)
def test_nm_mask_keeps_the_n_largest_of_every_m(pattern, rows, groups, seed):
    n, m = pattern
    scores = _rand(rows, groups * m, seed=seed)
    keep = sparsity.nm_mask(scores, (n, m))
    for r in range(rows):
        for g in range(groups):
            block = scores[r, g * m : (g + 1) * m].numpy()
            assert set(np.flatnonzero(keep[r, g * m : (g + 1) * m].numpy())) == set(
                np.argsort(block)[-n:]
            )


def test_nm_needs_a_multiple_of_m_and_a_valid_pattern():
    with pytest.raises(ValueError, match="multiple of 4"):
        sparsity.nm_mask(_rand(2, 6), (2, 4))
    for bad in ("4:2", "2-4", "a:b", "0:4"):
        with pytest.raises(ValueError, match="N:M"):
            sparsity.parse_nm(bad)
    assert sparsity.parse_nm("4:8") == (4, 8)


# ---------------------------------------------------------------- SparseGPT


def _reference_sparsegpt(w, h, rho, block_size, damp):
    """SparseGPT without Cholesky tricks: after freezing each column, the remaining columns take
    the least-squares optimum of (w - w0) H (w - w0)^T given the frozen prefix; each block's mask
    is the OBS saliency w^2 / [H_FF^-1]_jj on the current weights, F = the columns not yet frozen.
    """
    w0 = w.copy()
    h = h + damp * np.mean(np.diag(h)) * np.eye(h.shape[0])
    rows, cols = w.shape
    w = w.copy()
    keep = np.ones_like(w, dtype=bool)
    d2 = np.array([np.linalg.inv(h[j:, j:])[0, 0] for j in range(cols)])
    for j in range(cols):
        if j % block_size == 0:
            blk = slice(j, min(j + block_size, cols))
            scores = (w[:, blk] ** 2 / d2[blk][None, :]).reshape(-1)
            k = int(round(rho * scores.size))
            mask = np.ones(scores.size, dtype=bool)
            mask[np.argsort(scores, kind="stable")[:k]] = False
            keep[:, blk] = mask.reshape(rows, -1)
        w[:, j] = np.where(keep[:, j], w[:, j], 0.0)
        p, s = slice(0, j + 1), slice(j + 1, cols)
        if j + 1 < cols:  # optimal suffix given the prefix: H_ss (w_s - w0_s) = -H_sp (w_p - w0_p)
            w[:, s] = w0[:, s] - np.linalg.solve(h[s, s], h[s, p] @ (w[:, p] - w0[:, p]).T).T
    return w, keep


@pytest.mark.parametrize("block_size", [24, 8, 5])
def test_sparsegpt_equals_sequential_least_squares(block_size):
    w = _rand(6, 24)
    x = _inputs(200, 24)
    h = x.T @ x / x.shape[0]
    new, keep = sparsity.sparsegpt_prune(
        w, h, 0.5, block_size=block_size, damp=0.01, compute_dtype=torch.float64
    )
    ref_w, ref_keep = _reference_sparsegpt(w.numpy(), h.numpy(), 0.5, block_size, 0.01)
    assert np.array_equal(keep.numpy(), ref_keep)
    np.testing.assert_allclose(new.numpy(), ref_w, rtol=1e-8, atol=1e-10)
    assert torch.all(new[~keep] == 0)


def test_sparsegpt_beats_magnitude_on_the_layer_output():
    w = _rand(32, 64).float()
    # low rank plus noise, as LLM activations are: the case OBS compensation exists for
    x = (_rand(512, 8, seed=5) @ _rand(8, 64, seed=6) + 0.1 * _rand(512, 64, seed=7)).float()
    h = x.T @ x / x.shape[0]
    for rho, nm in ((0.5, None), (0.0, (2, 4))):
        new, keep = sparsity.sparsegpt_prune(w, h, rho, nm=nm)
        mag = w * sparsity.magnitude_mask(w, rho, nm=nm)
        err_gpt = torch.linalg.norm((w - new) @ x.T)
        err_mag = torch.linalg.norm((w - mag) @ x.T)
        assert int((~keep).sum()) == (~sparsity.magnitude_mask(w, rho, nm=nm)).sum()
        assert err_gpt < 0.5 * err_mag


def test_sparsegpt_nm_groups_and_dead_inputs():
    w = _rand(8, 16).float()
    x = _inputs(100, 16).float()
    x[:, 3] = 0  # an input that never fires
    h = x.T @ x / x.shape[0]
    new, keep = sparsity.sparsegpt_prune(w, h, 0.0, nm=(2, 4))
    nonzero = (new != 0).reshape(8, 4, 4).sum(dim=2)
    assert int(nonzero.max()) <= 2
    assert torch.all(new[:, 3] == 0)


# ---------------------------------------------------------------- low rank


def test_svd_factors_are_the_best_rank_r_approximation():
    w = _rand(20, 12)
    a, b = lowrank.svd_factors(w, 5, compute_dtype=torch.float64)
    assert a.shape == (5, 12) and b.shape == (20, 5)
    s = np.linalg.svd(w.numpy(), compute_uv=False)
    assert np.isclose(float(torch.linalg.norm(w - b @ a)), np.sqrt((s[5:] ** 2).sum()), rtol=1e-10)


def test_whitened_svd_minimises_the_output_error():
    w = _rand(10, 16)
    x = _inputs(300, 16)  # (tokens, in)
    cov = x.T @ x / x.shape[0]
    a, b = lowrank.whitened_svd_factors(w, cov, 4, damp=1e-12, compute_dtype=torch.float64)
    # Independent optimum: project W onto the top-4 left singular vectors of W X^T.
    u = np.linalg.svd(w.numpy() @ x.numpy().T, full_matrices=False)[0][:, :4]
    optimum = u @ u.T @ w.numpy()
    np.testing.assert_allclose((b @ a).numpy(), optimum, atol=1e-8)
    plain_a, plain_b = lowrank.svd_factors(w, 4, compute_dtype=torch.float64)
    assert torch.linalg.norm((w - b @ a) @ x.T) < torch.linalg.norm((w - plain_b @ plain_a) @ x.T)


def test_whitened_svd_survives_a_singular_covariance():
    w = _rand(6, 16)
    x = _inputs(8, 16)  # fewer tokens than inputs: X^T X has rank 8
    a, b = lowrank.whitened_svd_factors(w, x.T @ x / 8, 3, damp=0.0, compute_dtype=torch.float64)
    assert torch.isfinite(b @ a).all()


def test_factorise_only_where_it_shrinks():
    assert lowrank.shrinks(64, 256, 51) and not lowrank.shrinks(64, 256, 52)  # 64*256/320 = 51.2
    linear = torch.nn.Linear(16, 8)
    a, b = lowrank.svd_factors(linear.weight, 3)
    pair = lowrank.factorised_linear(linear, a, b)
    x = torch.randn(5, 16)
    torch.testing.assert_close(pair(x), x @ (b @ a).T + linear.bias)


# ---------------------------------------------------------------- width helpers


@pytest.mark.parametrize(
    ("d_ff", "rho", "multiple", "kept"),
    [
        (64, 0.0, 8, 64),
        (64, 0.5, 8, 32),
        (64, 0.3, 8, 48),
        (64, 0.99, 8, 8),
        (100, 0.0, 8, 100),
        (100, 0.01, 8, 96),
        (64, 0.5, 1, 32),
        (64, 0.25, 16, 48),
    ],
)
def test_kept_width_rounds_to_the_multiple(d_ff, rho, multiple, kept):
    assert width.kept_width(d_ff, rho, multiple) == kept


def test_kept_groups_keeps_at_least_one():
    assert [width.kept_groups(4, r) for r in (0.0, 0.3, 0.5, 0.9, 1.0)] == [4, 3, 2, 1, 1]


def test_narrow_linear_and_conv1d_select_the_same_features():
    from transformers.pytorch_utils import Conv1D

    linear = torch.nn.Linear(6, 5)
    conv = Conv1D(5, 6)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        conv.bias.copy_(linear.bias)
    x = torch.randn(3, 6)
    full = linear(x)
    keep_out, keep_in = torch.tensor([0, 2, 4]), torch.tensor([1, 2, 5])
    for module in (linear, conv):
        width.narrow_linear(module, "out", keep_out)
        torch.testing.assert_close(module(x), full[:, keep_out])
    ref = torch.nn.functional.linear(x[:, keep_in], linear.weight[:, keep_in], linear.bias)
    for module in (linear, conv):
        width.narrow_linear(module, "in", keep_in)
        torch.testing.assert_close(module(x[:, keep_in]), ref)
    assert (linear.in_features, linear.out_features, conv.nx, conv.nf) == (3, 3, 3, 3)


def test_channel_importance_is_activation_weighted_column_norm():
    w = _rand(4, 6)
    x = _inputs(30, 6)
    norms = torch.linalg.vector_norm(x, dim=0)
    got = width.channel_importance(w, norms)
    expected = np.linalg.norm(w.numpy(), axis=0) * np.linalg.norm(x.numpy(), axis=0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


# ---------------------------------------------------------------- accumulators and registry


def test_statistics_accumulate_in_batches_like_one_shot():
    x = _inputs(40, 8).float()
    for name, expected in (
        ("input_norms", torch.linalg.vector_norm(x, dim=0)),
        ("hessian", x.T @ x / 40),
    ):
        stat = stats.STATISTICS[name]
        state = stat.make_empty(8, torch.device("cpu"))
        for chunk in x.split(7):
            stat.accumulate(state, chunk)
        torch.testing.assert_close(stat.finalize(state), expected, rtol=1e-5, atol=1e-6)


def test_registry_refuses_bad_and_duplicate_names_and_unknown_options():
    with pytest.raises(ValueError, match="already registered"):
        registry.register_method("wanda", program="prune", summary="again")(lambda job: {})
    with pytest.raises(ValueError, match="lower-case"):
        registry.register_method("Bad-Name", program="prune", summary="x")
    with pytest.raises(ValueError, match="program"):
        registry.register_method("fine_name", program="shrink", summary="x")
    with pytest.raises(ValueError, match="does not take option"):
        registry.get_method("wanda").resolve({"rank_step": 4})
    with pytest.raises(ValueError, match="choose one of"):
        registry.get_method("pruneit")
