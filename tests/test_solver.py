"""The closed-form solvers of docs/design.md 2.2-2.4, checked against references that share no code.

A convex program's solution is certified by its KKT conditions, so most tests recompute the
per-layer marginal ratios from the formulas in docs/design.md 2 and check them against the reported dual.
Randomised instances are compared with scipy.optimize (SLSQP, trust-constr as a fallback), the
integer allocation with an exact dynamic programme, and the real 7B score profiles in
``shared/reference/layer-scores`` serve as realistic inputs. Objectives are recomputed here from
the formulas, never read back from the solver under test.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import optimize

from cwca_export.planning.solver import (
    allocation_objective,
    pruning_objective,
    solve_allocation,
    solve_pruning,
    transfer_regret,
)

SCORES_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "layer-scores"
PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Mistral-7B-v0.1 Linear shapes per decoder block (out x in), from the scores README.
MISTRAL_LINEARS = {
    "q": (4096, 4096),
    "k": (1024, 4096),
    "v": (1024, 4096),
    "o": (4096, 4096),
    "gate": (14336, 4096),
    "up": (14336, 4096),
    "down": (4096, 14336),
}

# ============================================================================ references


def ref_prune_cost(rho: np.ndarray, w: np.ndarray, psi: str) -> float:
    """sum_k w_k psi(rho_k), written from docs/design.md 2.2 (a zero weight contributes nothing)."""
    if psi == "quadratic":
        return float(np.sum(w * rho**2))
    safe = np.where(w > 0, rho, 0.0)
    return float(np.sum(-w * np.log1p(-safe)))


def ref_prune_grad(rho: np.ndarray, w: np.ndarray, psi: str) -> np.ndarray:
    """d/d rho_k of w_k psi(rho_k)."""
    if psi == "quadratic":
        return 2.0 * w * rho
    return w / (1.0 - np.where(w > 0, rho, 0.0))


def ref_alloc_value(e: np.ndarray, g: np.ndarray, alpha: np.ndarray) -> float:
    """sum_k g_k log(1 + e_k) - alpha_k e_k, written from docs/design.md 2.3."""
    return float(np.sum(g * np.log(1.0 + e) - alpha * e))


def _at_bounds(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, ...]:
    tol = 1e-12 * np.maximum(1.0, np.abs(x))
    at_lo = x <= lo + tol
    at_hi = x >= hi - tol
    pinned = hi - lo <= tol
    return at_lo & ~pinned, at_hi & ~pinned, ~at_lo & ~at_hi


def assert_kkt(
    x: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    ratio: np.ndarray,
    scale: np.ndarray,
    dual: float,
    *,
    minimise: bool,
    rtol: float = 1e-9,
) -> None:
    """Check the KKT conditions of a separable program with one resource constraint.

    ``ratio`` is each layer's marginal objective per unit of resource (w psi'(rho)/n for
    pruning, (g/(1+e) - alpha)/c for allocation) and ``scale`` the size of the terms it was
    computed from, so the tolerance survives cancellation. With a multiplier ``dual`` >= 0:
    free layers have ratio == dual; for a minimisation (pruning) a layer at hi has
    ratio <= dual and one at lo has ratio >= dual; for a maximisation the other way round.
    Together with feasibility this certifies global optimality of a convex program.
    """
    assert dual >= 0.0
    tol = rtol * (np.abs(scale) + abs(dual)) + 1e-300
    at_lo, at_hi, free = _at_bounds(x, lo, hi)
    gap = ratio - dual
    bad_free = free & (np.abs(gap) > tol)
    assert not bad_free.any(), f"free layers off the dual: {gap[bad_free]} (dual {dual})"
    sign = 1.0 if minimise else -1.0
    bad_hi = at_hi & ~at_lo & (sign * gap > tol)
    bad_lo = at_lo & ~at_hi & (sign * gap < -tol)
    assert not bad_hi.any(), f"layers at hi want to move: {np.flatnonzero(bad_hi)}"
    assert not bad_lo.any(), f"layers at lo want to move: {np.flatnonzero(bad_lo)}"


def assert_pruning_optimal(
    res, q, n, target, *, eta=2.0, kappa=1.0, lo=0.0, hi=0.95, psi="quadratic"
) -> None:
    """Feasibility to 1e-9 of sum(n), bounds exactly, KKT, and the reported objective."""
    q, n = np.asarray(q, float), np.asarray(n, float)
    lo = np.broadcast_to(np.asarray(lo, float), q.shape)
    hi = np.broadcast_to(np.asarray(hi, float), q.shape)
    rho = res.x
    assert rho.shape == q.shape
    assert np.all(rho >= lo) and np.all(rho <= hi), "bounds violated"
    assert abs(n @ rho - target * n.sum()) <= 1e-9 * n.sum(), "sparsity equality violated"
    w = eta * q**kappa
    ratio = ref_prune_grad(rho, w, psi) / n
    assert_kkt(rho, lo, hi, ratio, ratio, res.dual, minimise=True)
    expected = ref_prune_cost(rho, w, psi)
    assert res.objective == pytest.approx(expected, rel=1e-12, abs=1e-300)


def assert_allocation_optimal(
    res, q, cost, budget, *, gamma=0.9, beta=2.0, alpha=0.5, lo=0.0, hi=np.inf
) -> None:
    """Budget to 1e-9, bounds exactly, KKT with complementary slackness, the objective."""
    q = np.asarray(q, float)
    c = np.broadcast_to(np.asarray(cost, float), q.shape)
    a = np.broadcast_to(np.asarray(alpha, float), q.shape)
    lo = np.broadcast_to(np.asarray(lo, float), q.shape)
    hi = np.broadcast_to(np.asarray(hi, float), q.shape)
    e = res.x
    assert np.all(e >= lo) and np.all(e <= hi), "bounds violated"
    spent = c @ e
    assert spent <= budget + 1e-9 * max(budget, 1e-300), "over budget"
    g = gamma * q**beta
    gain = g / (1.0 + e)
    ratio = (gain - a) / c
    assert_kkt(e, lo, hi, ratio, (gain + a) / c, res.dual, minimise=False)
    if res.dual > 0:  # complementary slackness: a priced budget is spent
        # e = g / (alpha + lam c) - 1 resolves each e_k only to an ulp of 1 + e_k
        ulps = 8 * np.finfo(float).eps * (c @ (1.0 + e))
        assert spent >= budget - 1e-9 * budget - ulps
    expected = ref_alloc_value(e, g, a)
    assert res.objective == pytest.approx(expected, rel=1e-12, abs=1e-12 * (g.sum() + 1))


# ------------------------------------------------------------------- scipy as an oracle


def _trust_constr(fun, x0, jac, bounds, constraint) -> list[np.ndarray]:
    """trust-constr's answer, or nothing when it breaks down (degenerate instances)."""
    try:
        res = optimize.minimize(
            fun,
            x0,
            jac=jac,
            bounds=bounds,
            constraints=[constraint],
            method="trust-constr",
            options={"gtol": 1e-13, "xtol": 1e-15, "maxiter": 5000},
        )
    except (ValueError, np.linalg.LinAlgError):
        return []
    return [res.x]


def _best_feasible(candidates, repair, fun) -> tuple[np.ndarray, float]:
    points = [repair(x) for x in candidates]
    values = [fun(x) for x in points]
    i = int(np.argmin(values))
    return points[i], values[i]


def scipy_pruning(q, n, target, *, eta, kappa, lo, hi, psi) -> float:
    """The smallest cost scipy finds at a point made exactly feasible (an upper bound on OPT)."""
    w = eta * q**kappa
    total = n.sum()
    need = target * total
    move = hi > lo
    if not move.any():
        return ref_prune_cost(lo, w, psi)
    fixed = n[~move] @ lo[~move]
    wf, nf, lf, hf = w[move], n[move], lo[move], hi[move]
    need_f = need - fixed
    span = nf @ (hf - lf)
    x0 = lf + np.clip((need_f - nf @ lf) / span, 0.0, 1.0) * (hf - lf)
    scale = max(ref_prune_cost(hf, wf, psi), 1e-300)

    def fun(x):
        return ref_prune_cost(np.clip(x, lf, hf), wf, psi) / scale

    def jac(x):
        return ref_prune_grad(np.clip(x, lf, hf), wf, psi) / scale

    def repair(x):
        # clip into the box, then move along the box towards the side that restores the sum
        x = np.clip(x, lf, hf)
        short = need_f - nf @ x
        side = hf if short > 0 else lf
        room = nf @ (side - x)
        return x + (short / room if room != 0 else 0.0) * (side - x)

    eq = {"type": "eq", "fun": lambda x: (nf @ x - need_f) / total, "jac": lambda x: nf / total}
    bounds = optimize.Bounds(lf, hf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = optimize.minimize(
            fun,
            x0,
            jac=jac,
            bounds=bounds,
            constraints=[eq],
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        found = [x0, res.x]
        if not res.success:
            lin = optimize.LinearConstraint(nf[None, :] / total, need_f / total, need_f / total)
            found += _trust_constr(fun, x0, jac, bounds, lin)
    xf, _ = _best_feasible(found, repair, fun)
    x = lo.copy()
    x[move] = xf
    return ref_prune_cost(x, w, psi)


def scipy_allocation(q, cost, budget, *, gamma, beta, alpha, lo, hi) -> float:
    """The largest value scipy finds at a point made exactly feasible (a lower bound on OPT)."""
    g = gamma * q**beta
    room = budget - cost @ lo
    cap = np.minimum(hi, lo + 1.0)
    grow = cost @ (cap - lo)
    x0 = lo + (min(1.0, 0.5 * room / grow) if grow > 0 else 0.0) * (cap - lo)
    scale = max(g.sum(), 1e-300)
    b_scale = budget if budget > 0 else 1.0

    def fun(x):
        return -ref_alloc_value(np.clip(x, lo, hi), g, alpha) / scale

    def jac(x):
        return -(g / (1.0 + np.clip(x, lo, hi)) - alpha) / scale

    def repair(x):
        x = np.clip(x, lo, hi)
        over = cost @ x - budget
        if over > 0:  # shrink towards lo, which fits
            x = lo + (room / (cost @ (x - lo))) * (x - lo)
        return x

    ineq = {
        "type": "ineq",
        "fun": lambda x: (budget - cost @ x) / b_scale,
        "jac": lambda x: -cost / b_scale,
    }
    bounds = optimize.Bounds(lo, hi)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = optimize.minimize(
            fun,
            x0,
            jac=jac,
            bounds=bounds,
            constraints=[ineq],
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        found = [x0, res.x]
        if not res.success:
            lin = optimize.LinearConstraint(cost[None, :] / b_scale, -np.inf, budget / b_scale)
            found += _trust_constr(fun, x0, jac, bounds, lin)
    x, _ = _best_feasible(found, repair, fun)
    return ref_alloc_value(x, g, alpha)


# --------------------------------------------------------------- exact dynamic programme


def dp_allocation(g, alpha, cost, budget, lo, hi) -> float:
    """Exact integer optimum of the allocation program: a knapsack DP over integer spend.

    ``cost`` and ``budget - cost @ lo`` must be integers; ``lo``/``hi`` whole numbers
    (``hi`` may be inf). best[b] is the best value of the layers so far spending <= b.
    """
    cost = np.asarray(cost, dtype=np.int64)
    room = int(np.floor(budget - cost @ lo + 1e-9))
    best = np.zeros(room + 1)
    for gk, ak, ck, lk, hk in zip(g, alpha, cost, lo, hi, strict=True):
        top = int(min(hk - lk, room // ck))
        new = np.full(room + 1, -np.inf)
        for extra in range(top + 1):
            e = lk + extra
            value = gk * np.log1p(e) - ak * e
            spend = extra * ck
            new[spend:] = np.maximum(new[spend:], best[: room + 1 - spend] + value)
        best = new
    return float(best[room])


# ============================================================================ pruning: KKT


@pytest.mark.parametrize("psi", ["quadratic", "log"])
def test_pruning_kkt_mixed_active_set(psi):
    rng = np.random.default_rng(0)
    q = rng.uniform(0.0, 1.0, 40) ** 3
    q[[3, 17]] = 0.0
    n = rng.uniform(1e3, 1e6, 40)
    lo = np.where(rng.random(40) < 0.3, 0.1, 0.0)
    hi = rng.uniform(0.5, 0.95, 40)
    res = solve_pruning(q, n, 0.45, lo=lo, hi=hi, psi=psi)
    assert_pruning_optimal(res, q, n, 0.45, lo=lo, hi=hi, psi=psi)
    at_lo, at_hi, free = _at_bounds(res.x, lo, hi)
    assert free.sum() >= 3 and at_hi.sum() >= 1, "instance should exercise every KKT case"
    assert np.all(res.x[[3, 17]] == hi[[3, 17]])  # q = 0 costs nothing: pruned to its cap


@pytest.mark.parametrize("psi", ["quadratic", "log"])
@pytest.mark.parametrize("kappa", [0.5, 1.0, 2.0])
def test_pruning_kkt_eta_kappa(psi, kappa):
    q = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    n = np.array([10.0, 20.0, 30.0, 40.0, 50.0])
    res = solve_pruning(q, n, 0.3, eta=3.0, kappa=kappa, psi=psi)
    assert_pruning_optimal(res, q, n, 0.3, eta=3.0, kappa=kappa, psi=psi)


def test_pruning_docstring_example_matches_closed_form():
    # all free: rho_k = lam n / (2 eta q_k), lam from the equality -> rho proportional to 1/q
    q = np.array([0.5, 0.3, 0.2])
    res = solve_pruning(q, [100, 100, 100], 0.5)
    inv = 1.0 / q
    np.testing.assert_allclose(res.x, 1.5 * inv / inv.sum(), rtol=1e-12)


def test_pruning_log_closed_form():
    # all free: rho_k = 1 - eta q_k / (lam n_k) and sum n (1 - rho) = (eta / lam) sum q
    q, n = np.array([0.5, 0.3, 0.2]), np.array([2.0, 1.0, 1.0])
    res = solve_pruning(q, n, 0.4, psi="log")
    keep = n.sum() * 0.6
    np.testing.assert_allclose(res.x, 1.0 - q / n * keep / q.sum(), rtol=1e-12)
    assert res.dual == pytest.approx(2.0 * q.sum() / keep, rel=1e-12)


# ========================================================================= allocation: KKT


def test_allocation_kkt_binding_budget_per_layer_alpha_and_cost():
    rng = np.random.default_rng(1)
    q = rng.uniform(0.0, 1.0, 30)
    q[5] = 0.0
    cost = rng.uniform(0.5, 4.0, 30)
    alpha = rng.uniform(0.0, 1.0, 30)
    lo = np.where(rng.random(30) < 0.3, 1.0, 0.0)
    hi = np.where(rng.random(30) < 0.5, 6.0, np.inf)
    kw = dict(gamma=20.0, beta=2.0, alpha=alpha, lo=lo, hi=hi)
    budget = cost @ lo + 25.0
    res = solve_allocation(q, cost, budget, **kw)
    assert res.dual > 0
    assert_allocation_optimal(res, q, cost, budget, **kw)
    assert res.x[5] == lo[5]  # no value: stays at its floor
    _, at_hi, free = _at_bounds(res.x, lo, hi)
    assert free.sum() >= 3


def test_allocation_slack_budget_has_zero_dual():
    q = np.array([0.9, 0.5, 0.1])
    res = solve_allocation(q, 1.0, 1e6, gamma=10.0)
    assert res.dual == 0.0
    np.testing.assert_allclose(res.x, np.maximum(10.0 * q**2 / 0.5 - 1.0, 0.0), rtol=1e-14)
    assert_allocation_optimal(res, q, 1.0, 1e6, gamma=10.0)


def test_allocation_closed_form_when_all_free():
    # e_k = g_k / (alpha + lam c) - 1, sum (e_k) = B -> lam from sum g / (alpha + lam) = B + K
    q = np.array([1.0, 0.8, 0.6])
    g = 30.0 * q**2
    res = solve_allocation(q, 1.0, 6.0, gamma=30.0)
    lam = g.sum() / 9.0 - 0.5
    np.testing.assert_allclose(res.x, g / (0.5 + lam) - 1.0, rtol=1e-12)
    assert res.dual == pytest.approx(lam, rel=1e-12)


def test_objective_functions_match_the_formulas():
    rng = np.random.default_rng(2)
    q, rho, e = rng.random(9), rng.uniform(0, 0.9, 9), rng.uniform(0, 5, 9)
    alpha = rng.random(9)
    for psi in ("quadratic", "log"):
        expect = ref_prune_cost(rho, 1.5 * q**0.7, psi)
        got = pruning_objective(rho, q, eta=1.5, kappa=0.7, psi=psi)
        assert got == pytest.approx(expect, rel=1e-14)
    expect = ref_alloc_value(e, 2.0 * q**1.5, alpha)
    assert allocation_objective(e, q, gamma=2.0, beta=1.5, alpha=alpha) == pytest.approx(
        expect, rel=1e-14
    )
    # a free layer (q = 0) at rho = 1 costs nothing even under the log barrier
    assert pruning_objective([1.0, 0.5], [0.0, 1.0], psi="log") == pytest.approx(2 * np.log(2))


# ============================================================ randomised against scipy


@st.composite
def pruning_instances(draw) -> dict:
    k = draw(st.integers(1, 12))
    unit = st.floats(0.0, 1.0)
    q = np.array([draw(unit.map(lambda v: 0.0 if v < 0.15 else v)) for _ in range(k)])
    n = np.array([draw(st.floats(1.0, 1e6)) for _ in range(k)])
    lo, hi = np.zeros(k), np.zeros(k)
    for i in range(k):
        a = draw(st.floats(0.0, 0.98).map(lambda v: 0.0 if v < 0.3 else v))
        b = a if draw(st.integers(0, 9)) == 0 else draw(st.floats(0.0, 0.98))
        lo[i], hi[i] = min(a, b), max(a, b)
    u = draw(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)))
    target = (n @ lo + u * (n @ (hi - lo))) / n.sum()
    return dict(
        q=q,
        n=n,
        target=float(np.clip(target, 0.0, 1.0)),
        lo=lo,
        hi=hi,
        eta=draw(st.floats(0.1, 10.0)),
        kappa=draw(st.floats(0.25, 3.0)),
        psi=draw(st.sampled_from(["quadratic", "log"])),
    )


@st.composite
def allocation_instances(draw) -> dict:
    k = draw(st.integers(1, 12))
    unit = st.floats(0.0, 1.0)
    q = np.array([draw(unit.map(lambda v: 0.0 if v < 0.15 else v)) for _ in range(k)])
    cost = np.array([draw(st.floats(0.1, 10.0)) for _ in range(k)])
    alpha = np.array(
        [draw(st.floats(0.0, 2.0).map(lambda v: 0.0 if v < 0.1 else v)) for _ in range(k)]
    )
    lo = np.array(
        [draw(st.floats(0.0, 3.0).map(lambda v: 0.0 if v < 1.0 else v)) for _ in range(k)]
    )
    hi = np.array(
        [np.inf if draw(st.booleans()) else lo[i] + draw(st.floats(0.0, 8.0)) for i in range(k)]
    )
    u = draw(st.one_of(st.just(0.0), st.floats(0.0, 1.2)))
    budget = float(cost @ lo + u * (cost @ np.minimum(hi - lo, 10.0)))
    return dict(
        q=q,
        cost=cost,
        budget=budget,
        alpha=alpha,
        lo=lo,
        hi=hi,
        gamma=draw(st.floats(0.5, 50.0)),
        beta=draw(st.floats(0.5, 3.0)),
    )


@PROPERTY
@given(pruning_instances())
def test_pruning_matches_scipy_and_kkt(inst):
    res = solve_pruning(**inst)
    assert_pruning_optimal(res, **inst)
    oracle = scipy_pruning(**inst)
    ours = ref_prune_cost(res.x, inst["eta"] * inst["q"] ** inst["kappa"], inst["psi"])
    # one-sided: ours may be better than scipy's, never worse by more than 1e-7 relative
    assert ours <= oracle + 1e-7 * abs(oracle) + 1e-300


@PROPERTY
@given(allocation_instances())
def test_allocation_matches_scipy_and_kkt(inst):
    res = solve_allocation(**inst)
    assert_allocation_optimal(res, **inst)
    oracle = scipy_allocation(**inst)
    g = inst["gamma"] * inst["q"] ** inst["beta"]
    ours = ref_alloc_value(res.x, g, inst["alpha"])
    assert ours >= oracle - 1e-7 * max(abs(oracle), abs(ours)) - 1e-12 * (g.sum() + 1e-300)


def _log_uniform(lo_exp: float, hi_exp: float) -> st.SearchStrategy[float]:
    return st.floats(lo_exp, hi_exp).map(lambda x: 10.0**x)


@PROPERTY
@given(st.data())
def test_kkt_holds_over_wide_dynamic_ranges(data):
    # scores spanning 12 decades and layers from 1 to 1e11 weights: no oracle, only KKT
    k = data.draw(st.integers(1, 40))
    q = np.array([data.draw(_log_uniform(-12, 0)) for _ in range(k)])
    n = np.array([data.draw(_log_uniform(0, 11)) for _ in range(k)])
    psi = data.draw(st.sampled_from(["quadratic", "log"]))
    target = data.draw(st.floats(0.0, 0.95))
    res = solve_pruning(q, n, target, psi=psi)
    assert_pruning_optimal(res, q, n, target, psi=psi)
    cost = np.array([data.draw(_log_uniform(-3, 6)) for _ in range(k)])
    budget = data.draw(_log_uniform(-3, 3)) * cost.sum()
    kw = dict(gamma=data.draw(_log_uniform(0, 4)), alpha=data.draw(_log_uniform(-4, 0)))
    alloc = solve_allocation(q, cost, budget, **kw)
    assert_allocation_optimal(alloc, q, cost, budget, **kw)


# ===================================================================== integer allocation


@st.composite
def integer_instances(draw, *, equal_costs: bool) -> dict:
    k = draw(st.integers(1, 5))
    if equal_costs:
        cost = np.full(k, float(draw(st.integers(1, 3))))
    else:
        cost = np.array([float(draw(st.integers(1, 4))) for _ in range(k)])
    q = np.array([draw(st.floats(0.0, 1.0).map(lambda v: 0.0 if v < 0.1 else v)) for _ in range(k)])
    alpha = np.array([draw(st.floats(0.0, 1.5)) for _ in range(k)])
    lo = np.array([float(draw(st.integers(0, 2))) for _ in range(k)])
    hi = np.array(
        [np.inf if draw(st.booleans()) else lo[i] + draw(st.integers(0, 6)) for i in range(k)]
    )
    budget = float(cost @ lo + draw(st.integers(0, 25)) + draw(st.sampled_from([0.0, 0.5])))
    return dict(
        q=q,
        cost=cost,
        budget=budget,
        alpha=alpha,
        lo=lo,
        hi=hi,
        gamma=draw(st.floats(1.0, 30.0)),
        beta=draw(st.floats(0.5, 2.5)),
    )


def _check_integer(inst: dict):
    res = solve_allocation(**inst, integer=True)
    e = res.x
    assert np.all(e == np.round(e)), "not integral"
    assert np.all(e >= inst["lo"]) and np.all(e <= inst["hi"])
    assert inst["cost"] @ e <= inst["budget"] + 1e-9 * max(inst["budget"], 1.0)
    g = inst["gamma"] * inst["q"] ** inst["beta"]
    ours = ref_alloc_value(e, g, inst["alpha"])
    best = dp_allocation(g, inst["alpha"], inst["cost"], inst["budget"], inst["lo"], inst["hi"])
    assert ours <= best + 1e-9 * max(1.0, abs(best))  # the DP really is an upper bound
    return res, ours, best


@PROPERTY
@given(integer_instances(equal_costs=True))
def test_integer_allocation_equal_costs_is_optimal(inst):
    res, ours, best = _check_integer(inst)
    assert res.gap_bound == 0.0
    assert ours == pytest.approx(best, rel=1e-9, abs=1e-9)


@PROPERTY
@given(integer_instances(equal_costs=False))
def test_integer_allocation_unequal_costs_within_gap_bound(inst):
    res, ours, best = _check_integer(inst)
    assert res.gap_bound >= 0.0
    assert best - ours <= res.gap_bound + 1e-9


def test_integer_allocation_rounds_fractional_bounds_inwards():
    res = solve_allocation(
        [0.9, 0.9], 1.0, 10.0, gamma=40.0, lo=[0.5, 0.0], hi=[3.7, 9.0], integer=True
    )
    assert res.x[0] >= 1.0 and res.x[0] <= 3.0
    assert res.x.sum() <= 10.0
    with pytest.raises(ValueError, match="lo/hi"):
        solve_allocation([0.9], 1.0, 10.0, lo=0.2, hi=0.8, integer=True)


# ============================================================================ monotonicity


@PROPERTY
@given(pruning_instances(), st.data())
def test_pruning_more_quality_means_less_pruning(inst, data):
    k = inst["q"].size
    j = data.draw(st.integers(0, k - 1))
    up = inst["q"].copy()
    up[j] = up[j] * data.draw(st.floats(1.01, 4.0)) if up[j] > 0 else 0.5
    before = solve_pruning(**inst).x[j]
    after = solve_pruning(**{**inst, "q": up}).x[j]
    assert after <= before + 1e-9


@PROPERTY
@given(allocation_instances(), st.data())
def test_allocation_more_quality_means_more_units(inst, data):
    k = inst["q"].size
    j = data.draw(st.integers(0, k - 1))
    up = inst["q"].copy()
    up[j] = up[j] * data.draw(st.floats(1.01, 4.0)) if up[j] > 0 else 0.5
    before = solve_allocation(**inst).x[j]
    after = solve_allocation(**{**inst, "q": up}).x[j]
    assert after >= before - 1e-9 * max(1.0, before)


@pytest.mark.parametrize("psi", ["quadratic", "log"])
@pytest.mark.parametrize("target", [0.0, 0.1, 0.5, 0.95])
def test_equal_quality_and_size_gives_uniform_plan(psi, target):
    res = solve_pruning(np.full(16, 0.3), np.full(16, 1e6), target, psi=psi)
    np.testing.assert_allclose(res.x, target, rtol=1e-12, atol=1e-15)


def test_equal_quality_equal_cost_allocation_is_uniform():
    res = solve_allocation(np.full(8, 0.7), 2.0, 40.0, gamma=50.0)
    np.testing.assert_allclose(res.x, 2.5, rtol=1e-12)


# ============================================================================= edge cases


@pytest.mark.parametrize("psi", ["quadratic", "log"])
def test_single_layer(psi):
    res = solve_pruning([0.7], [123.0], 0.4, psi=psi)
    assert res.x.tolist() == pytest.approx([0.4], rel=1e-14)
    assert_pruning_optimal(res, [0.7], [123.0], 0.4, psi=psi)
    alloc = solve_allocation([0.8], 2.0, 5.0, gamma=40.0)
    assert alloc.x.tolist() == pytest.approx([2.5], rel=1e-14)  # budget-bound: 5 / 2
    assert solve_allocation([0.8], 2.0, 5.0, gamma=40.0, integer=True).x.tolist() == [2.0]


@pytest.mark.parametrize("psi", ["quadratic", "log"])
def test_zero_quality_layer_pruned_to_its_cap(psi):
    q, n = [0.0, 0.5, 0.3], [10.0, 10.0, 10.0]
    res = solve_pruning(q, n, 0.6, hi=[0.9, 0.95, 0.95], psi=psi)
    assert res.x[0] == 0.9
    assert_pruning_optimal(res, q, n, 0.6, hi=[0.9, 0.95, 0.95], psi=psi)


@pytest.mark.parametrize("psi", ["quadratic", "log"])
@pytest.mark.parametrize("target", [0.0, 0.1, 0.25, 0.475, 0.5])
def test_zero_quality_layers_absorb_small_targets_for_free(psi, target):
    # Pruning a q = 0 layer costs nothing, so a target the free layers alone can reach must
    # leave every other layer untouched, and the equality must still hold exactly.
    q, n = np.array([0.0, 1.0, 0.0, 0.5]), np.array([1.0, 1.0, 3.0, 2.0])
    res = solve_pruning(q, n, target, psi=psi)
    assert_pruning_optimal(res, q, n, target, psi=psi)
    if target * n.sum() <= 0.95 * 4.0:
        assert res.objective == 0.0


def test_all_quality_zero_still_meets_the_target():
    res = solve_pruning([0.0, 0.0], [1.0, 3.0], 0.25)
    assert res.objective == 0.0
    assert np.dot([1.0, 3.0], res.x) == pytest.approx(1.0, rel=1e-12)


def test_zero_quality_layer_gets_no_units():
    res = solve_allocation([0.0, 0.9, 0.5], 1.0, 4.0, gamma=30.0, lo=[1.0, 0.0, 0.0])
    assert res.x[0] == 1.0
    assert_allocation_optimal(res, [0.0, 0.9, 0.5], 1.0, 4.0, gamma=30.0, lo=[1.0, 0.0, 0.0])
    res = solve_allocation([0.0, 0.9, 0.5], 1.0, 4.0, gamma=30.0, integer=True)
    assert res.x[0] == 0.0


@pytest.mark.parametrize("psi", ["quadratic", "log"])
def test_bounds_that_pin_every_layer(psi):
    lo = np.array([0.1, 0.5, 0.3])
    n = np.array([1.0, 2.0, 3.0])
    target = float(n @ lo / n.sum())
    res = solve_pruning([0.2, 0.3, 0.5], n, target, lo=lo, hi=lo, psi=psi)
    np.testing.assert_array_equal(res.x, lo)
    alloc = solve_allocation([0.2, 0.3, 0.5], 1.0, 10.0, lo=[1, 2, 3], hi=[1, 2, 3])
    np.testing.assert_array_equal(alloc.x, [1, 2, 3])


def test_target_at_the_ends_of_the_reachable_range():
    n, lo, hi = np.array([1.0, 2.0]), np.array([0.1, 0.2]), np.array([0.6, 0.9])
    low = solve_pruning([0.5, 0.5], n, float(n @ lo / 3), lo=lo, hi=hi)
    high = solve_pruning([0.5, 0.5], n, float(n @ hi / 3), lo=lo, hi=hi)
    np.testing.assert_allclose(low.x, lo)
    np.testing.assert_allclose(high.x, hi)


GOOD_PRUNE = dict(q=[0.5, 0.3], n=[10.0, 10.0], target=0.5)
GOOD_ALLOC = dict(q=[0.5, 0.3], cost=[1.0, 1.0], budget=4.0)


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"q": [0.5, np.nan]}, "q"),
        ({"q": [0.5, np.inf]}, "q"),
        ({"q": [0.5, -0.1]}, "q"),
        ({"q": []}, "q"),
        ({"n": [10.0, np.nan]}, "n"),
        ({"n": [10.0, -1.0]}, "n"),
        ({"n": [10.0, 0.0]}, "n"),
        ({"n": [10.0, 10.0, 10.0]}, "n"),
        ({"target": np.nan}, "target"),
        ({"target": -0.1}, "target"),
        ({"target": np.inf}, "target"),
        ({"lo": [0.2, np.nan]}, "lo"),
        ({"lo": [0.2]}, "lo"),
        ({"hi": [0.9, -0.5]}, "hi"),
        ({"hi": [0.9, np.inf]}, "hi"),
        ({"hi": [0.9, 1.2]}, "hi"),
        ({"lo": [0.6, 0.0], "hi": [0.5, 0.9]}, "lo"),
        ({"eta": 0.0}, "eta"),
        ({"kappa": -1.0}, "kappa"),
        ({"psi": "cubic"}, "psi"),
        ({"psi": "log", "hi": 1.0}, "hi"),
        ({"target": 0.99}, "reachable"),
        ({"lo": 0.6, "hi": 0.9}, "reachable"),
    ],
)
def test_pruning_rejects_bad_input_naming_it(change, name):
    with pytest.raises(ValueError, match=name):
        solve_pruning(**{**GOOD_PRUNE, **change})


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"q": [np.nan, 0.3]}, "q"),
        ({"q": [-1.0, 0.3]}, "q"),
        ({"cost": [1.0, np.inf]}, "cost"),
        ({"cost": [1.0, -1.0]}, "cost"),
        ({"cost": [1.0, 0.0]}, "cost"),
        ({"cost": [1.0]}, "cost"),
        ({"budget": np.nan}, "budget"),
        ({"budget": -1.0}, "budget"),
        ({"alpha": [0.5, np.nan]}, "alpha"),
        ({"alpha": -0.5}, "alpha"),
        ({"alpha": [0.5, 0.5, 0.5]}, "alpha"),
        ({"gamma": 0.0}, "gamma"),
        ({"beta": np.inf}, "beta"),
        ({"lo": [np.inf, 0.0]}, "lo"),
        ({"hi": [np.nan, 1.0]}, "hi"),
        ({"lo": [3.0, 0.0], "hi": [2.0, 5.0]}, "lo"),
        ({"lo": [3.0, 3.0]}, "reachable"),
    ],
)
def test_allocation_rejects_bad_input_naming_it(change, name):
    with pytest.raises(ValueError, match=name):
        solve_allocation(**{**GOOD_ALLOC, **change})


def test_transfer_regret_rejects_bad_input():
    with pytest.raises(ValueError, match="q_target"):
        transfer_regret([0.5, 0.3], [0.5, 0.3, 0.2], n=[1, 1], target=0.5)
    with pytest.raises(ValueError, match="q_source"):
        transfer_regret([0.5, np.nan], [0.5, 0.3], n=[1, 1], target=0.5)
    with pytest.raises(ValueError, match="program"):
        transfer_regret([0.5, 0.3], [0.5, 0.3], program="merge", n=[1, 1], target=0.5)


# ================================================================= realistic: Mistral-7B


@dataclass(frozen=True)
class Profile:
    """One model's per-block scores and sizes."""

    q: np.ndarray
    n: np.ndarray  # prunable weights per block
    rank_cost: np.ndarray  # parameters of one LoRA rank unit per block (sum of in + out)


def _mistral(name: str) -> Profile:
    if not SCORES_DIR.is_dir():
        pytest.skip(f"reference scores not found at {SCORES_DIR} (needs shared/ beside the repo)")
    per_linear = np.load(SCORES_DIR / name)
    assert per_linear.shape == (224,)
    per_block = per_linear[::7]
    # one value per Linear sublayer, repeated over the block's seven Linears
    np.testing.assert_array_equal(per_linear.reshape(32, 7), np.repeat(per_block, 7).reshape(32, 7))
    n_block = sum(o * i for o, i in MISTRAL_LINEARS.values())
    cost_block = sum(o + i for o, i in MISTRAL_LINEARS.values())
    return Profile(
        per_block.astype(float), np.full(32, float(n_block)), np.full(32, float(cost_block))
    )


MISTRAL_FILES = ["mistral-7b_IF-300-96.npy", "mistral-7b_IF-300-96-smoothed.npy"]


@pytest.mark.parametrize("name", MISTRAL_FILES)
@pytest.mark.parametrize("psi", ["quadratic", "log"])
def test_mistral_pruning_at_half_sparsity(name, psi):
    prof = _mistral(name)
    q = prof.q / prof.q.sum()
    res = solve_pruning(q, prof.n, 0.5, hi=0.95, psi=psi)
    assert_pruning_optimal(res, q, prof.n, 0.5, hi=0.95, psi=psi)
    uniform = ref_prune_cost(np.full(32, 0.5), 2.0 * q, psi)
    assert res.objective <= uniform  # the uniform plan is feasible, so it cannot be better
    # the authors' LLM caps: every block <= 0.55, block 0 (protected) <= 0.3
    hi = np.full(32, 0.55)
    hi[0] = 0.3
    capped = solve_pruning(q, prof.n, 0.5, lo=0.0, hi=hi, psi=psi)
    assert_pruning_optimal(capped, q, prof.n, 0.5, lo=0.0, hi=hi, psi=psi)
    assert capped.x[0] <= 0.3


def test_mistral_per_linear_alpha_profile():
    if not SCORES_DIR.is_dir():
        pytest.skip(f"reference scores not found at {SCORES_DIR} (needs shared/ beside the repo)")
    alpha = np.load(SCORES_DIR / "mistral-7b_alpha_peak.npy").astype(float)
    n = np.tile([float(o * i) for o, i in MISTRAL_LINEARS.values()], 32)
    q = alpha / alpha.sum()
    for psi in ("quadratic", "log"):
        res = solve_pruning(q, n, 0.5, hi=0.95, psi=psi)
        assert_pruning_optimal(res, q, n, 0.5, hi=0.95, psi=psi)


@pytest.mark.parametrize("name", MISTRAL_FILES)
def test_mistral_lora_rank_allocation(name):
    prof = _mistral(name)
    kw = dict(gamma=64.0, beta=2.0, alpha=0.5, lo=0.0, hi=64.0)
    budget = 8.0 * prof.rank_cost.sum()  # an average rank of 8
    res = solve_allocation(prof.q, prof.rank_cost, budget, **kw)
    assert res.dual > 0
    assert_allocation_optimal(res, prof.q, prof.rank_cost, budget, **kw)
    whole = solve_allocation(prof.q, prof.rank_cost, budget, **kw, integer=True)
    assert np.all(whole.x == np.round(whole.x)) and prof.rank_cost @ whole.x <= budget
    assert whole.objective <= res.objective + 1e-9  # the continuous program relaxes it


@pytest.mark.parametrize("name", MISTRAL_FILES)
def test_mistral_expert_counts_match_the_dp(name):
    prof = _mistral(name)
    kw = dict(gamma=64.0, beta=2.0, alpha=0.5, lo=1.0, hi=16.0)
    res = solve_allocation(prof.q, 1.0, 4.0 * 32, **kw, integer=True)
    g = 64.0 * prof.q**2
    best = dp_allocation(g, np.full(32, 0.5), np.ones(32), 128.0, np.ones(32), np.full(32, 16.0))
    assert res.x.sum() <= 128 and res.x.min() >= 1 and res.x.max() <= 16
    assert ref_alloc_value(res.x, g, np.full(32, 0.5)) == pytest.approx(best, rel=1e-12)


def test_mistral_transfer_raw_to_smoothed():
    raw, smooth = _mistral(MISTRAL_FILES[0]), _mistral(MISTRAL_FILES[1])
    qs, qt = raw.q / raw.q.sum(), smooth.q / smooth.q.sum()
    r = transfer_regret(qs, qt, n=raw.n, target=0.5)
    assert r.delta == pytest.approx(np.linalg.norm(qs - qt), rel=1e-14)
    regret = ref_prune_cost(r.source.x, 2.0 * qt, "quadratic") - ref_prune_cost(
        r.target.x, 2.0 * qt, "quadratic"
    )
    assert regret >= 0.0 and r.regret == pytest.approx(regret, rel=1e-9, abs=1e-15)


# ======================================================================== transfer regret


def _drift_instance(program: str, psi: str) -> tuple[np.ndarray, np.ndarray, dict]:
    rng = np.random.default_rng(7)
    k = 10
    qs = rng.uniform(0.2, 1.0, k)
    d = rng.standard_normal(k)
    d /= np.linalg.norm(d)
    if program == "prune":
        kw = dict(n=rng.uniform(1.0, 5.0, k), target=0.5, hi=0.8, psi=psi)
    else:
        kw = dict(cost=rng.uniform(0.5, 2.0, k), budget=12.0, gamma=20.0, hi=4.0)
    return qs, d, kw


def _regret_by_hand(program: str, r, qt: np.ndarray, kw: dict) -> float:
    """F_T(source plan) vs F_T(target plan) from the formulas, signed as a loss."""
    if program == "prune":
        w = 2.0 * qt
        return ref_prune_cost(r.source.x, w, kw["psi"]) - ref_prune_cost(r.target.x, w, kw["psi"])
    g, alpha = kw["gamma"] * qt**2.0, np.full(qt.size, 0.5)
    return ref_alloc_value(r.target.x, g, alpha) - ref_alloc_value(r.source.x, g, alpha)


@pytest.mark.parametrize(
    ("program", "psi"), [("prune", "quadratic"), ("prune", "log"), ("allocate", None)]
)
def test_transfer_regret_is_second_order(program, psi):
    qs, d, kw = _drift_instance(program, psi)
    ratios = []
    for eps in (1e-1, 1e-2, 1e-3, 1e-4):
        qt = qs + eps * d
        r = transfer_regret(qs, qt, program=program, **kw)
        assert r.delta == pytest.approx(eps, rel=1e-9)
        by_hand = _regret_by_hand(program, r, qt, kw)
        # the target plan is optimal on the target, so the source plan cannot beat it
        assert by_hand >= -1e-15 * max(1.0, abs(r.target.objective))
        assert r.regret >= 0.0
        assert r.regret == pytest.approx(max(by_hand, 0.0), rel=1e-6, abs=1e-13)
        assert r.ratio == pytest.approx(r.regret / r.delta**2, rel=1e-12)
        ratios.append(r.ratio)
    assert ratios[0] > 0  # the drift really moves the plan
    assert max(ratios[1:]) <= 10.0 * ratios[0]  # regret / delta^2 stays bounded as delta -> 0


@pytest.mark.parametrize(("program", "psi"), [("prune", "quadratic"), ("allocate", None)])
def test_transfer_regret_zero_drift(program, psi):
    qs, _, kw = _drift_instance(program, psi)
    r = transfer_regret(qs, qs.copy(), program=program, **kw)
    assert (r.delta, r.regret, r.ratio) == (0.0, 0.0, 0.0)


def test_transfer_regret_allocation_with_per_layer_alpha():
    qs = np.array([0.9, 0.6, 0.3])
    qt = np.array([0.8, 0.7, 0.3])
    alpha = np.array([0.2, 0.5, 1.0])
    r = transfer_regret(qs, qt, program="allocate", cost=1.0, budget=5.0, gamma=20.0, alpha=alpha)
    g = 20.0 * qt**2
    expect = ref_alloc_value(r.target.x, g, alpha) - ref_alloc_value(r.source.x, g, alpha)
    assert r.regret == pytest.approx(expect, rel=1e-9)


# ========================================================================= light imports


@pytest.mark.parametrize("module", ["cwca_export.planning.solver", "cwca_export.scores", "cwca_export.planning.plan"])
def test_numpy_modules_do_not_import_torch(module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet")
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
