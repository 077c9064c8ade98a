"""Measured-curve pruning solver against independent references (scipy LP / SLSQP, brute force)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import linprog, minimize

from cwca_export.planning.curve_solver import convex_envelope, curve_value, fit_power, solve_pruning_curves

POINTS = np.array([0.25, 0.5, 0.75, 0.9])


def _curves(rng, k):
    """Random increasing damage, roughly rho^b with per-block scale and exponent, plus noise."""
    a = rng.lognormal(0, 1, size=k)
    b = rng.uniform(1.5, 5.5, size=k)
    d = a[:, None] * POINTS[None, :] ** b[:, None]
    return d * rng.uniform(0.9, 1.1, size=d.shape)


def _lp_reference(points, damage, n, target, lo, hi):
    """min sum_k t_k  s.t. t_k >= every chord line of block k's probes, sum n rho = target sum n.

    The epigraph of the convex envelope is the intersection of the half-planes above its
    segments; the LP finds it without knowing which probes lie on the envelope.
    """
    k = damage.shape[0]
    x = np.concatenate([[0.0], points])
    rows, rhs = [], []
    for i in range(k):
        y = np.concatenate([[0.0], damage[i]])
        for a, b in itertools.combinations(range(x.size), 2):
            slope = (y[b] - y[a]) / (x[b] - x[a])
            # only lines that lie below every probe bound the envelope from below
            line = y[a] + slope * (x - x[a])
            if np.all(line <= y + 1e-12):
                row = np.zeros(2 * k)
                row[i] = slope  # slope * rho_i - t_i <= slope * x_a - y_a
                row[k + i] = -1.0
                rows.append(row)
                rhs.append(slope * x[a] - y[a])
    c = np.concatenate([np.zeros(k), np.ones(k)])
    a_eq = np.concatenate([n, np.zeros(k)])[None, :]
    bounds = [(lo, hi)] * k + [(None, None)] * k
    res = linprog(c, A_ub=np.array(rows), b_ub=np.array(rhs), A_eq=a_eq, b_eq=[target * n.sum()],
                  bounds=bounds, method="highs")
    assert res.status == 0
    return res.fun


@pytest.mark.parametrize("seed", range(8))
def test_piecewise_matches_linear_program(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 13))
    damage = _curves(rng, k)
    n = rng.integers(50, 500, size=k).astype(float)
    target = float(rng.uniform(0.1, 0.8))
    res = solve_pruning_curves(POINTS, damage, n, target, lo=0.0, hi=0.9)
    assert n @ res.x == pytest.approx(target * n.sum(), rel=1e-9)
    assert np.all(res.x >= -1e-12) and np.all(res.x <= 0.9 + 1e-12)
    assert res.objective == pytest.approx(_lp_reference(POINTS, damage, n, target, 0.0, 0.9), rel=1e-7, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_power_form_matches_slsqp(seed):
    rng = np.random.default_rng(100 + seed)
    k = int(rng.integers(2, 9))
    damage = _curves(rng, k)
    n = rng.integers(50, 500, size=k).astype(float)
    target = float(rng.uniform(0.2, 0.7))
    a, b = fit_power(POINTS, damage)
    res = solve_pruning_curves(POINTS, damage, n, target, lo=0.05, hi=0.95, form="power")

    ref = minimize(lambda r: float(np.sum(a * r**b)), np.full(k, target), method="SLSQP",
                   jac=lambda r: a * b * r ** (b - 1),
                   bounds=[(0.05, 0.95)] * k,
                   constraints=[{"type": "eq", "fun": lambda r: n @ r - target * n.sum(), "jac": lambda r: n}],
                   options={"ftol": 1e-14, "maxiter": 500})
    assert ref.success
    assert n @ res.x == pytest.approx(target * n.sum(), rel=1e-8)
    assert res.objective <= ref.fun * (1 + 1e-6) + 1e-12


def test_piecewise_brute_force_grid():
    """Two blocks: every split of the target on a fine grid costs at least the solver's plan."""
    damage = np.array([[0.01, 0.05, 0.3, 0.9], [0.2, 0.5, 1.2, 2.0]])
    n = np.array([100.0, 300.0])
    res = solve_pruning_curves(POINTS, damage, n, 0.4, hi=0.9)
    grid = np.linspace(0, 0.9, 9001)
    partner = (0.4 * n.sum() - n[0] * grid) / n[1]
    ok = (partner >= 0) & (partner <= 0.9)
    costs = [curve_value([r0, r1], POINTS, damage).sum() for r0, r1 in zip(grid[ok], partner[ok], strict=True)]
    assert res.objective <= min(costs) + 1e-9


def test_envelope_lowers_non_convex_probes_and_fit_recovers_power_law():
    x, env = convex_envelope([0.5, 1.0], [[0.8, 1.0]])
    assert env[0].tolist() == pytest.approx([0.0, 0.5, 1.0])
    a, b = fit_power(POINTS, (0.7 * POINTS**4.2)[None, :])
    assert a[0] == pytest.approx(0.7) and b[0] == pytest.approx(4.2)


def test_flat_block_absorbs_target_first_and_edge_cases():
    damage = np.array([[0.0, 0.0, 0.0, 0.0], [0.1, 0.4, 0.9, 1.5]])
    res = solve_pruning_curves(POINTS, damage, [1, 1], 0.4, hi=0.8)
    assert res.x.tolist() == pytest.approx([0.8, 0.0])
    res = solve_pruning_curves(POINTS, damage[1:], [7], 0.3)  # K = 1: the target itself
    assert res.x.tolist() == pytest.approx([0.3])
    with pytest.raises(ValueError, match="reachable range"):
        solve_pruning_curves(POINTS, damage, [1, 1], 0.9, hi=0.5)
    with pytest.raises(ValueError, match="points"):
        solve_pruning_curves([0.5, 0.25], damage[:, :2], [1, 1], 0.3)
    with pytest.raises(ValueError, match="damage"):
        solve_pruning_curves(POINTS, damage[:, :3], [1, 1], 0.3)
    with pytest.raises(ValueError, match="NaN"):
        solve_pruning_curves(POINTS, np.full((2, 4), np.nan), [1, 1], 0.3)
    with pytest.raises(ValueError, match="form"):
        solve_pruning_curves(POINTS, damage, [1, 1], 0.3, form="cubic")
