"""Noise floors, snr, debiasing and the within-noise warning.

Synthetic per-sequence gradients g_n = mu + sigma * eps (eps standard normal, seeded) drive
the accumulators exactly as the gradient pass does, over many repeats; the repeat means are
checked against expectations computed here independently: closed forms for ``gradnorm``, and
for ``fisher`` (whose weights 1 / (F + lambda) are themselves random) a two-dimensional
Gauss quadrature over the exact law of (g, F) per weight, g ~ N(mu, sigma^2 / N) independent of
N (F - g^2) / sigma^2 ~ chi^2_(N - 1). Then one end-to-end run through ``cwca-export score``.
"""

from __future__ import annotations

import json
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import sample_text, save_tiny_model, tiny_model, tiny_tokenizer
from scipy.special import roots_genlaguerre

from cwca_export.blocks import find_blocks
from cwca_export.cli import cli
from cwca_export.data import calibration_data
from cwca_export.scores import (
    NOISE_SNR_THRESHOLD,
    SNR_MAX,
    LayerScores,
    ScoreNoiseWarning,
    signal_to_noise,
    warn_if_within_noise,
    within_noise,
)
from cwca_export.scoring import score
from cwca_export.scoring.accumulators import accumulate_grad_moments, finalize_diag_fisher, make_empty_grad_moments
from cwca_export.scoring.fisher import noisy_estimate

N = 64  # sequences per repeat
REPEATS = 400
SHAPES = [(4, 6), (2, 8)]  # a block of two Linears, 40 weights
N_WEIGHTS = sum(o * i for o, i in SHAPES)
TOL_SE = 4.0  # repeat means must fall within this many standard errors of the expectation


def block_params(seed: int, signal: float) -> tuple[np.ndarray, np.ndarray]:
    """mu and sigma for one block: sigma in [0.5, 2], mu_i^2 ~ signal * sigma_i^2 (0: pure noise)."""
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(0.5, 2.0, N_WEIGHTS)
    mu = rng.standard_normal(N_WEIGHTS) * sigma * math.sqrt(signal)
    return mu, sigma


def finalise(grads: np.ndarray, damping: float, mode: str):
    """Feed (N, n) per-sequence gradients to the accumulators, one sequence at a time."""
    moments = [make_empty_grad_moments(shape, torch.device("cpu")) for shape in SHAPES]
    for row in torch.from_numpy(grads).float():
        offset = 0
        for m, (o, i) in zip(moments, SHAPES, strict=True):
            accumulate_grad_moments(m, row[offset : offset + o * i].reshape(o, i))
            offset += o * i
    return finalize_diag_fisher(moments, grads.shape[0], damping, mode)


def repeats(mu, sigma, *, seed: int, damping: float, mode: str, n: int = N, count: int = REPEATS):
    """``count`` independent finalisations of ``n`` draws each."""
    rng = np.random.default_rng(seed)
    return [finalise(mu + sigma * rng.standard_normal((n, mu.size)), damping, mode) for _ in range(count)]


def assert_mean(values, expected: float, what: str) -> None:
    values = np.asarray(values, dtype=np.float64)
    se = values.std(ddof=1) / math.sqrt(values.size)
    assert abs(values.mean() - expected) <= TOL_SE * se + 1e-12, (
        f"{what}: repeat mean {values.mean():.6g} +- {se:.3g}, expected {expected:.6g}"
    )


def fisher_expectations(mu, sigma, lam: float, n: int) -> tuple[float, float]:
    """E[zeta2] and E[noise_floor] of the fisher estimator at absolute damping ``lam``.

    Per weight, g = mu + sigma z / sqrt(n), z ~ N(0, 1), and V = F - g^2 = sigma^2 Q / n with
    Q ~ chi^2_(n-1) independent of z; zeta2_i = g^2 / (F + lam), floor_i = V / ((n-1)(F + lam)).
    Gauss-Hermite in z, generalised Gauss-Laguerre in Q / 2 ~ Gamma((n-1)/2).
    """
    z, wz = np.polynomial.hermite_e.hermegauss(80)
    wz = wz / math.sqrt(2 * math.pi)
    k = n - 1
    y, wy = roots_genlaguerre(80, k / 2 - 1)
    wy = wy / math.gamma(k / 2)
    mu, sigma = mu[:, None, None], sigma[:, None, None]
    g = mu + sigma * z[None, :, None] / math.sqrt(n)
    v = sigma**2 * 2 * y[None, None, :] / n
    f = v + g * g
    w = wz[:, None] * wy[None, :]
    zeta2 = float((g * g / (f + lam) * w).sum())
    floor = float((v / ((n - 1) * (f + lam)) * w).sum())
    return zeta2, floor


# ---- gradnorm: closed forms ---------------------------------------------------------------


@pytest.mark.parametrize("signal", [0.0, 0.25])
def test_gradnorm_floor_and_debiased_match_closed_forms(signal):
    mu, sigma = block_params(1, signal)
    runs = repeats(mu, sigma, seed=2, damping=0.1, mode="relative")
    floor = float((sigma**2).sum()) / N  # trace Cov / N
    assert_mean([b.grad_sq_norm for b in runs], float(mu @ mu) + floor, "E||g||^2 = ||mu||^2 + tr Cov / N")
    assert_mean([b.grad_noise_floor for b in runs], floor, "E[noise floor] = tr Cov / N")
    assert_mean([b.grad_sq_norm_debiased for b in runs], float(mu @ mu), "E[debiased] = ||mu||^2")
    # the debiased value is the old closed form (N ||g||^2 - tr F) / (N - 1)
    b = runs[0]
    assert b.grad_sq_norm_debiased == pytest.approx((N * b.grad_sq_norm - b.fisher_trace) / (N - 1), rel=1e-9)


# ---- fisher: exact expectations by quadrature -------------------------------------------


@pytest.mark.parametrize("signal", [0.0, 0.02, 0.25])
def test_fisher_biased_floor_and_debiased_means_match_quadrature(signal):
    lam = 0.1
    mu, sigma = block_params(3, signal)
    runs = repeats(mu, sigma, seed=4, damping=lam, mode="absolute")
    e_zeta2, e_floor = fisher_expectations(mu, sigma, lam, N)
    assert_mean([b.zeta2 for b in runs], e_zeta2, "E[zeta2]")
    assert_mean([b.noise_floor for b in runs], e_floor, "E[noise floor]")
    assert_mean([b.zeta2_debiased for b in runs], e_zeta2 - e_floor, "E[zeta2 - floor]")

    # Against the population values, weights at their limits 1 / (mu^2 + sigma^2 + lam): the
    # floor is sum_i w_i sigma_i^2 / N, the biased mean is the weighted signal plus that floor
    # and the debiased mean is the weighted signal, up to the O(1/N) of random weights.
    w = 1 / (mu**2 + sigma**2 + lam)
    signal_w, floor_w = float((w * mu**2).sum()), float((w * sigma**2).sum()) / N
    assert e_floor == pytest.approx(floor_w, rel=0.01)
    assert e_zeta2 == pytest.approx(signal_w + floor_w, rel=0.05)
    if signal == 0:
        assert abs(e_zeta2 - e_floor) < 1e-12  # pure noise: E[zeta2] is exactly E[floor]
    else:
        assert e_zeta2 - e_floor == pytest.approx(signal_w, rel=0.05)
    # and the old closed form of the debiased value agrees with zeta2 - floor
    b = runs[0]
    assert b.zeta2_debiased == pytest.approx((N * b.zeta2 - b.effective_dim) / (N - 1), rel=1e-6, abs=1e-9)


def test_fisher_debiased_is_unbiased_for_pure_noise_under_relative_damping():
    # g_i^2 / (F_i + lambda) with a lambda that depends on every F: still exactly E[floor],
    # because for Gaussian noise g_i^2 / (N F_i) is independent of every F_j.
    mu, sigma = block_params(5, 0.0)
    runs = repeats(mu, sigma, seed=6, damping=0.5, mode="relative")
    assert_mean([b.zeta2_debiased for b in runs], 0.0, "pure noise E[zeta2 - floor]")
    assert np.mean([b.zeta2 for b in runs]) > 0.2  # while the raw zeta2 sits on its floor, ~0.4


def test_floors_need_two_sequences():
    mu, sigma = block_params(7, 0.25)
    one = repeats(mu, sigma, seed=8, damping=0.1, mode="relative", n=1, count=1)[0]
    assert one.noise_floor is None and one.grad_noise_floor is None and one.zeta2_debiased is None
    run = SimpleNamespace(options={"debias": True}, num_samples=1)
    with pytest.raises(ValueError, match="at least 2 calibration sequences"):
        noisy_estimate(run, [one.zeta2], [one.noise_floor], {})


# ---- snr, debias and the warning ------------------------------------------------------------


def blocks_estimate(signals: list[float], *, seed: int, debias: bool = False):
    """One fisher estimate (relative damping) for blocks of the given signal levels."""
    rng = np.random.default_rng(seed)
    blocks = []
    for s in signals:
        mu, sigma = block_params(int(rng.integers(1 << 30)), s)
        blocks.append(finalise(mu + sigma * rng.standard_normal((N, N_WEIGHTS)), 0.1, "relative"))
    run = SimpleNamespace(options={"debias": debias}, num_samples=N)
    return noisy_estimate(run, [b.zeta2 for b in blocks], [b.noise_floor for b in blocks], {}), blocks


def test_snr_separates_signal_from_noise_blocks():
    for seed in range(20):
        estimate, _ = blocks_estimate([0.0, 0.0, 0.0, 0.25, 0.25], seed=seed)
        snr = estimate.stats["snr"]
        assert all(s < NOISE_SNR_THRESHOLD for s in snr[:3]), snr
        assert all(s > 4 * NOISE_SNR_THRESHOLD for s in snr[3:]), snr
        assert within_noise(snr) == [True, True, True, False, False]
        for z, f, s, d in zip(estimate.zeta2, estimate.stats["noise_floor"], snr, estimate.stats["zeta2_debiased"],
                              strict=True):
            assert s == pytest.approx((z - f) / f) and d == pytest.approx(z - f)


def test_debias_scores_with_the_clipped_debiased_value_and_keeps_the_raw_one():
    raw, _ = blocks_estimate([0.0, 0.0, 0.25], seed=11)
    debiased, _ = blocks_estimate([0.0, 0.0, 0.25], seed=11, debias=True)
    assert "zeta2_biased" not in raw.stats
    assert debiased.stats["zeta2_biased"] == raw.zeta2
    assert debiased.zeta2 == [max(d, 0.0) for d in raw.stats["zeta2_debiased"]]
    assert debiased.stats["snr"] == raw.stats["snr"]  # snr describes the raw score either way


def test_warning_fires_when_most_blocks_are_noise_and_not_otherwise():
    noisy, _ = blocks_estimate([0.0] * 5 + [0.25] * 3, seed=12)
    with pytest.warns(ScoreNoiseWarning, match=r"5 of 8 blocks score within their noise floor") as record:
        count = warn_if_within_noise(noisy.stats["snr"], method="fisher", samples=N)
    assert count == 5
    message = str(record[0].message)
    assert "\n" not in message and "--samples" in message and "--debias" in message and "obd" in message
    with pytest.warns(ScoreNoiseWarning) as record:
        warn_if_within_noise(noisy.stats["snr"], method="gradnorm", samples=N, debiased=True)
    assert "--debias" not in str(record[0].message) and "use obd" in str(record[0].message)

    for signals in ([0.0] * 3 + [0.25] * 5, [0.0] * 4 + [0.25] * 4):  # a minority, exactly half
        clean, _ = blocks_estimate(signals, seed=13)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ScoreNoiseWarning)
            assert warn_if_within_noise(clean.stats["snr"], method="fisher", samples=N) == signals.count(0.0)


def test_signal_to_noise_edges():
    assert signal_to_noise(3.0, 1.0) == 2.0 and signal_to_noise(0.5, 1.0) == -0.5
    assert signal_to_noise(0.0, 0.0) == 0.0 and signal_to_noise(1.0, 0.0) == SNR_MAX
    with pytest.raises(ValueError, match="finite"):
        signal_to_noise(float("nan"), 1.0)


# ---- end to end ------------------------------------------------------------------------


def test_score_noise_floor_matches_a_per_sequence_loop_and_debias_errors():
    model = tiny_model("llama")
    data = calibration_data([sample_text()], tiny_tokenizer(), num_samples=6, seq_len=24)
    with pytest.warns(ScoreNoiseWarning):  # a random tiny model on 6 sequences is all noise
        fisher = score(model, data, method="fisher", progress=False)
    blocks = find_blocks(model)
    for k, block in enumerate(blocks):
        weights = [m.weight for m in block.linears.values()]
        rows = []
        for seq in data.input_ids:
            grads = torch.autograd.grad(model(input_ids=seq[None], labels=seq[None]).loss, weights)
            rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
        gk = torch.stack(rows)
        g, f = gk.mean(0), (gk * gk).mean(0)
        lam = 0.1 * f.mean()
        floor = float(((f - g * g) / (5 * (f + lam))).sum())
        assert fisher.stats["noise_floor"][k] == pytest.approx(floor, rel=1e-3)
        assert fisher.stats["snr"][k] == pytest.approx((fisher.zeta2[k] - floor) / floor, rel=1e-2, abs=1e-4)
    assert fisher.settings["blocks_within_noise"] == sum(s < NOISE_SNR_THRESHOLD for s in fisher.stats["snr"])
    assert fisher.settings["debias"] is False

    with pytest.warns(ScoreNoiseWarning):
        gradnorm = score(model, data, method="gradnorm", debias=True, progress=False)
    assert gradnorm.settings["debias"] is True and gradnorm.settings["options"]["debias"] is True
    assert gradnorm.stats["zeta2_biased"] == pytest.approx(gradnorm.stats["grad_sq_norm"])
    assert gradnorm.zeta2 == [max(d, 0.0) for d in gradnorm.stats["grad_sq_norm_debiased"]]

    obd = score(model, data, method="obd", progress=False)
    assert "noise_floor" not in obd.stats and "snr" not in obd.stats
    assert obd.settings["blocks_within_noise"] is None and obd.within_noise() is None

    refusal = r"--debias: method 'kfac' has no debiased estimate; pass --estimator fisher or gradnorm"
    with pytest.raises(ValueError, match=refusal):
        score(model, data, method="kfac", debias=True)
    with pytest.raises(ValueError, match="at least 2 calibration sequences"):
        score(model, [sample_text()], tokenizer=tiny_tokenizer(), num_samples=1, seq_len=24, debias=True)


def test_cli_records_noise_figures_warns_on_one_line_and_debiases(tmp_path):
    folder = save_tiny_model("llama", tmp_path / "llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text(), encoding="utf-8")
    common = [str(folder), "--data", str(calib), "--samples", "4", "--seq-len", "24", "--no-progress"]

    raw = CliRunner().invoke(cli, ["score", *common, "--out", str(tmp_path / "raw.json")])
    assert raw.exit_code == 0, raw.output
    scores = LayerScores.load(tmp_path / "raw.json")
    body = json.loads((tmp_path / "raw.json").read_text())
    for name in ("noise_floor", "snr", "zeta2_debiased"):
        assert len(body["stats"][name]) == scores.num_blocks == 2
    assert all(f > 0 for f in scores.stats["noise_floor"])
    within = scores.settings["blocks_within_noise"]
    assert within == sum(scores.within_noise()) and scores.settings["noise_snr_threshold"] == NOISE_SNR_THRESHOLD
    assert "snr" in raw.stdout and f"{within} of 2 blocks within noise" in raw.stdout
    warning_lines = [line for line in raw.stderr.splitlines() if "within their noise floor" in line]
    if 2 * within > scores.num_blocks:
        assert len(warning_lines) == 1 and warning_lines[0].startswith("Warning: ")
    else:
        assert warning_lines == []

    debiased = CliRunner().invoke(cli, ["score", *common, "--debias", "--out", str(tmp_path / "deb.json")])
    assert debiased.exit_code == 0, debiased.output
    deb = LayerScores.load(tmp_path / "deb.json")
    assert deb.settings["debias"] is True and "(debiased)" in debiased.stdout
    assert deb.stats["zeta2_biased"] == pytest.approx(scores.zeta2, rel=1e-6)
    assert deb.zeta2 == pytest.approx([max(d, 0.0) for d in scores.stats["zeta2_debiased"]], rel=1e-6, abs=1e-12)

    refused = CliRunner().invoke(cli, ["score", *common, "--estimator", "kfac", "--debias",
                                       "--out", str(tmp_path / "k.json")])
    assert refused.exit_code == 1
    assert refused.output.strip().splitlines() == [
        "Error: --debias: method 'kfac' has no debiased estimate; pass --estimator fisher or gradnorm"
    ]
