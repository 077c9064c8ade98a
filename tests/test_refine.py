"""Measured exchange refinement on synthetic, non-separable losses with a scipy reference optimum."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from cwca_export.planning.curve_solver import solve_pruning_curves
from cwca_export.planning.refine import choose_by_loss, refine_exchange

A = np.array([0.3, 2.0, 1.0, 0.6, 1.5, 0.2])
N = np.array([100.0, 100.0, 100.0, 100.0, 200.0, 200.0])


def joint_loss(x):
    """Sum of single-block damage a_k x^4, inflated by the plan's skew (damage is not additive)."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.sum(A * x**4) * (1.0 + 8.0 * np.var(x)))


def _reference(target, lo, hi):
    cons = [{"type": "eq", "fun": lambda r: N @ r - target * N.sum()}]
    best = None
    for start in (np.full(A.size, target), np.linspace(hi, lo, A.size)):
        res = minimize(joint_loss, start, method="SLSQP", bounds=[(lo, hi)] * A.size, constraints=cons,
                       options={"ftol": 1e-14, "maxiter": 1000})
        if best is None or res.fun < best.fun:
            best = res
    return best


def test_refinement_beats_the_separable_plan_and_approaches_the_joint_optimum():
    target, lo, hi = 0.6, 0.0, 0.95
    points = np.array([0.3, 0.5, 0.7, 0.9])
    single = A[:, None] * points[None, :] ** 4  # what single-block probes would measure
    start = solve_pruning_curves(points, single, N, target, lo=lo, hi=hi, form="power").x
    ref = _reference(target, lo, hi)
    r = refine_exchange(start, N, joint_loss, lo=lo, hi=hi, step=0.05, min_step=0.005, max_evals=400)

    assert r.evaluations <= 400
    assert N @ r.x == pytest.approx(target * N.sum(), rel=1e-12)
    assert np.all(r.x >= lo - 1e-12) and np.all(r.x <= hi + 1e-12)
    assert r.start_loss == pytest.approx(joint_loss(start))
    assert r.loss == pytest.approx(joint_loss(r.x))
    gap_start = joint_loss(start) - ref.fun
    assert gap_start > 0.01 * ref.fun  # the separable plan is measurably off the joint optimum
    assert r.loss - ref.fun < 0.1 * gap_start  # refinement closes over 90% of the gap


def test_budget_is_respected_and_result_never_worse():
    calls = []

    def measure(x):
        calls.append(np.array(x))
        return joint_loss(x)

    start = np.full(A.size, 0.5)
    r = refine_exchange(start, N, measure, max_evals=9)
    assert len(calls) == r.evaluations <= 9
    assert r.loss <= r.start_loss
    assert [len(c) for c in calls] == [A.size] * len(calls)


def test_a_flat_loss_accepts_nothing():
    r = refine_exchange([0.4, 0.4, 0.4], [1, 1, 1], lambda x: 1.0, max_evals=50)
    assert r.accepted == [] and r.x.tolist() == [0.4, 0.4, 0.4] and r.evaluations <= 50


def test_bad_arguments():
    with pytest.raises(ValueError, match="--max-evals"):
        refine_exchange([0.5], [1], joint_loss, max_evals=1)
    with pytest.raises(ValueError, match="outside the bounds"):
        refine_exchange([0.99, 0.1], [1, 1], joint_loss, hi=0.95)
    with pytest.raises(ValueError, match="min_step"):
        refine_exchange([0.5, 0.5], [1, 1], joint_loss, step=0.01, min_step=0.02)


def test_choose_by_loss_picks_the_lowest():
    name, losses = choose_by_loss({"flat": np.full(6, 0.6), "skewed": np.linspace(0.9, 0.3, 6)}, joint_loss)
    assert losses == {"flat": joint_loss(np.full(6, 0.6)), "skewed": joint_loss(np.linspace(0.9, 0.3, 6))}
    assert name == min(losses, key=losses.get)
    with pytest.raises(ValueError):
        choose_by_loss({}, joint_loss)
