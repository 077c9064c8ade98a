"""Closed-form solvers for the two convex MDL programs of docs/design.md 2.2 and 2.3.

Pure NumPy (no torch import). Each program's KKT conditions give every layer's value as a
clipped, monotone function of one dual variable lambda; we find lambda by bisection over
vectorised O(K) evaluations, then polish it on the active set the bisection identified.

Pruning (minimise)::

    sum_k eta q_k^kappa psi(rho_k)   s.t.  sum_k n_k rho_k = target * sum_k n_k,  lo_k <= rho_k <= hi_k
    psi = rho^2:          rho_k(lam) = clip(lam n_k / (2 eta q_k^kappa), lo_k, hi_k)
    psi = -log(1 - rho):  rho_k(lam) = clip(1 - eta q_k^kappa / (lam n_k), lo_k, hi_k)

Capacity allocation (maximise)::

    sum_k gamma q_k^beta log(1 + e_k) - alpha_k e_k   s.t.  sum_k c_k e_k <= budget,  lo_k <= e_k <= hi_k
    e_k(lam) = clip(gamma q_k^beta / (alpha_k + lam c_k) - 1, lo_k, hi_k)

With ``integer=True`` the allocation takes whole units greedily by marginal gain per unit
cost (see :func:`solve_allocation` for the guarantee).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "SolverResult",
    "TransferRegret",
    "allocation_objective",
    "pruning_objective",
    "solve_allocation",
    "solve_pruning",
    "transfer_regret",
]

_MAX_BISECTIONS = 2000  # a safety net; geometric steps converge in < 200 for doubles
_REL_TOL = 1e-15  # relative width of the dual bracket at which bisection stops

ArrayLike = float | int | np.ndarray | list[float]
Psi = Literal["quadratic", "log"]


@dataclass(frozen=True)
class SolverResult:
    """The solution of one program.

    Attributes:
        x: per-layer solution (rho_k for pruning, units e_k for allocation).
        dual: the multiplier lambda of the budget constraint (0 when the budget is slack).
        objective: the program's objective at ``x``.
        iterations: dual evaluations spent (bisection steps plus polishing).
        gap_bound: for integer allocation, an upper bound on how far ``objective`` can lie
            below the integer optimum (0 when the greedy is provably optimal).
    """

    x: np.ndarray
    dual: float
    objective: float
    iterations: int
    gap_bound: float = 0.0


# ----------------------------------------------------------------------------- validation


def per_layer_vector(name: str, value: ArrayLike, k: int | None, *, allow_inf: bool = False) -> np.ndarray:
    """A float64 vector of length k from a scalar or a sequence; rejects NaN, inf and < 0."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        if k is None:
            raise ValueError(f"{name}: expected one value per layer, got a scalar")
        arr = np.full(k, float(arr))
    elif arr.ndim != 1:
        raise ValueError(f"{name}: expected a scalar or a 1-D array, got shape {arr.shape}")
    elif k is not None and arr.size != k:
        raise ValueError(f"{name}: has {arr.size} values but there are {k} layers")
    if arr.size == 0:
        raise ValueError(f"{name}: no layers given")
    if np.any(np.isnan(arr)):
        raise ValueError(f"{name}: contains NaN")
    if not allow_inf and np.any(np.isinf(arr)):
        raise ValueError(f"{name}: contains inf")
    if np.any(arr < 0):
        raise ValueError(f"{name}: contains negative values")
    return arr


def _scalar(name: str, value: float, *, positive: bool = False) -> float:
    v = float(value)
    if not np.isfinite(v) or v < 0 or (positive and v == 0):
        need = "positive" if positive else "non-negative"
        raise ValueError(f"{name}: must be a finite {need} number, got {value!r}")
    return v


def per_layer_bounds(lo: ArrayLike, hi: ArrayLike, k: int, *, allow_inf_hi: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer lower and upper bounds as float64 vectors of length k; refuses lo > hi."""
    lo_v = per_layer_vector("lo", lo, k)
    hi_v = per_layer_vector("hi", hi, k, allow_inf=allow_inf_hi)
    bad = np.flatnonzero(lo_v > hi_v)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"lo > hi at layer {i} ({lo_v[i]} > {hi_v[i]})")
    return lo_v, hi_v


# ----------------------------------------------------------------------------- bisection


def bisect_decreasing(
    decreasing_excess, lam_hi: float
) -> tuple[float, float, int]:
    """Bracket the root of a monotone decreasing excess(lam) on [0, lam_hi].

    excess(0) > 0 >= excess(lam_hi) on entry. Steps are arithmetic while the lower end is 0
    and geometric afterwards, so a root many decades below lam_hi costs tens of steps, not
    thousands. Returns (lam_lo, lam_hi, steps) with excess(lam_lo) > 0 >= excess(lam_hi).
    """
    a, b, steps = 0.0, lam_hi, 0
    while steps < _MAX_BISECTIONS and b - a > _REL_TOL * b:
        m = 0.5 * (a + b) if a == 0.0 or b > 4.0 * a else np.sqrt(a * b)
        if m <= a or m >= b:  # the bracket cannot shrink further in floating point
            break
        steps += 1
        if decreasing_excess(m) > 0:
            a = m
        else:
            b = m
    return a, b, steps


# ----------------------------------------------------------------------------- pruning


def pruning_mass(n_v: np.ndarray, lo_v: np.ndarray, hi_v: np.ndarray, target: float):
    """(total, need, reach_lo, reach_hi, slack) of a global-sparsity target; refuses unreachable ones."""
    total = n_v.sum()
    need = target * total
    reach_lo, reach_hi = float(n_v @ lo_v), float(n_v @ hi_v)
    slack = 1e-12 * total
    if need < reach_lo - slack or need > reach_hi + slack:
        raise ValueError(
            f"target: global sparsity {target:g} is not reachable; with these bounds the"
            f" reachable range is [{reach_lo / total:.6g}, {reach_hi / total:.6g}]"
        )
    return total, need, reach_lo, reach_hi, slack


def pruning_objective(
    rho: ArrayLike, q: ArrayLike, *, eta: float = 2.0, kappa: float = 1.0, psi: Psi = "quadratic"
) -> float:
    """sum_k eta q_k^kappa psi(rho_k): the pruning program's cost of a plan."""
    rho_v = np.asarray(rho, dtype=np.float64)
    w = eta * np.power(np.asarray(q, dtype=np.float64), kappa)
    if psi == "quadratic":
        return float(np.sum(w * rho_v**2))
    if psi == "log":
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 * inf for q = 0 at rho = 1
            terms = -w * np.log1p(-rho_v)
        return float(np.sum(np.where(w > 0, terms, 0.0)))
    raise ValueError(f"psi: expected 'quadratic' or 'log', got {psi!r}")


def _pruning_inputs(
    q: ArrayLike, n: ArrayLike, target: float, eta: float, kappa: float, lo: ArrayLike, hi: ArrayLike, psi: str
) -> tuple[np.ndarray, np.ndarray, float, float, float, np.ndarray, np.ndarray]:
    """The pruning program's inputs, checked: q, n, lo, hi as float64 vectors (one entry per layer)."""
    q_v = per_layer_vector("q", q, None)
    k = q_v.size
    n_v = per_layer_vector("n", n, k)
    if np.any(n_v == 0):
        raise ValueError("n: every layer needs a positive number of prunable weights")
    target = _scalar("target", target)
    eta = _scalar("eta", eta, positive=True)
    kappa = _scalar("kappa", kappa)
    lo_v, hi_v = per_layer_bounds(lo, hi, k, allow_inf_hi=False)
    if np.any(hi_v > 1):
        raise ValueError("hi: a pruning ratio cannot exceed 1")
    if psi not in ("quadratic", "log"):
        raise ValueError(f"psi: expected 'quadratic' or 'log', got {psi!r}")
    if psi == "log" and np.any(hi_v >= 1):
        raise ValueError("hi: psi='log' has a barrier at rho = 1, so hi must be below 1")
    return q_v, n_v, target, eta, kappa, lo_v, hi_v


def solve_pruning(
    q: ArrayLike,
    n: ArrayLike,
    target: float,
    *,
    eta: float = 2.0,
    kappa: float = 1.0,
    lo: ArrayLike = 0.0,
    hi: ArrayLike = 0.95,
    psi: Psi = "quadratic",
) -> SolverResult:
    """Per-layer pruning ratios rho_k that reach a global sparsity at least quality cost.

    Args:
        q: layer qualities q_k >= 0 (a layer with q_k = 0 costs nothing to prune: rho_k = hi_k).
        n: prunable weights n_k > 0 per layer.
        target: global sparsity as a fraction of sum(n), in [0, 1].
        eta, kappa: cost weight eta q^kappa; kappa < 1 flattens the plan.
        lo, hi: per-layer bounds on rho (scalar or one per layer), 0 <= lo <= hi <= 1;
            with ``psi="log"`` hi must stay below 1.
        psi: ``"quadratic"`` (rho^2) or ``"log"`` (-log(1 - rho), a barrier at 1).

    Returns:
        SolverResult with x = rho; sum(n * rho) equals target * sum(n) to rounding.

    Raises:
        ValueError: naming the argument for NaN, inf, negative or mismatched inputs, lo > hi,
            and naming the reachable sparsity range when ``target`` is outside it.

    Example:
        >>> r = solve_pruning([0.5, 0.3, 0.2], [100, 100, 100], 0.5)
        >>> r.x.round(3).tolist()
        [0.29, 0.484, 0.726]
    """
    q_v, n_v, target, eta, kappa, lo_v, hi_v = _pruning_inputs(q, n, target, eta, kappa, lo, hi, psi)

    w = eta * np.power(q_v, kappa)
    free_w = w > 0
    total, need, reach_lo, reach_hi, slack = pruning_mass(n_v, lo_v, hi_v, target)

    def rho_at(lam: float) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            raw = lam * n_v / (2.0 * w) if psi == "quadratic" else 1.0 - w / (lam * n_v)
        # q = 0: the cost does not depend on rho, so any positive price pushes it to hi.
        raw = np.where(free_w, raw, np.inf if lam > 0 else -np.inf)
        return np.clip(raw, lo_v, hi_v)

    def objective(rho: np.ndarray) -> float:
        return pruning_objective(rho, q_v, eta=eta, kappa=kappa, psi=psi)

    # The price at which every layer sits at hi; beyond it nothing changes.
    with np.errstate(divide="ignore"):
        lam_top = 2.0 * w * hi_v / n_v if psi == "quadratic" else w / ((1.0 - hi_v) * n_v)
    lam_max = float(lam_top[free_w].max()) if free_w.any() else 0.0

    if need <= reach_lo + slack:
        rho = lo_v.copy()
        return SolverResult(rho, 0.0, objective(rho), 0)
    # q = 0 layers cost nothing to prune, so they take the target first at a zero price; only
    # what they cannot hold goes to the priced layers (rho_at jumps them to hi at any lam > 0).
    zero = ~free_w
    zero_room = float(n_v[zero] @ (hi_v[zero] - lo_v[zero]))
    if zero_room > 0 and need <= reach_lo + zero_room + slack:
        rho = lo_v.copy()
        share = min(max((need - reach_lo) / zero_room, 0.0), 1.0)
        rho[zero] = np.minimum(lo_v[zero] + share * (hi_v[zero] - lo_v[zero]), hi_v[zero])
        return SolverResult(rho, 0.0, objective(rho), 0)
    if need >= reach_hi - slack or lam_max == 0.0:
        rho = hi_v.copy()
        return SolverResult(rho, lam_max, objective(rho), 0)

    a, b, steps = bisect_decreasing(lambda lam: need - n_v @ rho_at(lam), lam_max)

    # Polish: on the bracket every layer is either clipped or free; solve the free ones exactly.
    rho_b = rho_at(b)
    free = (rho_b > lo_v) & (rho_b < hi_v) & free_w
    fixed_mass = n_v[~free] @ rho_b[~free]
    lam = b
    if free.any():
        if psi == "quadratic":
            lam = (need - fixed_mass) / np.sum(n_v[free] ** 2 / (2.0 * w[free]))
        else:
            inv = (n_v[free].sum() - (need - fixed_mass)) / w[free].sum()
            lam = 1.0 / inv if inv > 0 else b
        if not (a * (1 - 1e-9) <= lam <= b * (1 + 1e-9)):
            lam = b  # the active set changed inside the bracket: keep the bisection's answer
    rho = rho_at(lam)
    return SolverResult(rho, float(lam), objective(rho), steps + 1)


# ----------------------------------------------------------------------------- allocation


def allocation_objective(
    e: ArrayLike,
    q: ArrayLike,
    *,
    gamma: float = 0.9,
    beta: float = 2.0,
    alpha: ArrayLike = 0.5,
) -> float:
    """sum_k gamma q_k^beta log(1 + e_k) - alpha_k e_k: the allocation program's value."""
    e_v = np.asarray(e, dtype=np.float64)
    g = gamma * np.power(np.asarray(q, dtype=np.float64), beta)
    return float(np.sum(g * np.log1p(e_v) - np.asarray(alpha, dtype=np.float64) * e_v))


def solve_allocation(
    q: ArrayLike,
    cost: ArrayLike,
    budget: float,
    *,
    gamma: float = 0.9,
    beta: float = 2.0,
    alpha: ArrayLike = 0.5,
    lo: ArrayLike = 0.0,
    hi: ArrayLike = np.inf,
    integer: bool = False,
) -> SolverResult:
    """Per-layer capacity e_k (experts, rank steps, LoRA rank units) within a cost budget.

    Args:
        q: layer qualities q_k >= 0 (q_k = 0 gets lo_k).
        cost: cost c_k > 0 of one unit in layer k (scalar or per layer).
        budget: total cost allowed, sum(c * e) <= budget.
        gamma, beta, alpha: value gamma q^beta log(1 + e) - alpha e per layer (alpha per layer ok).
        lo, hi: per-layer bounds (hi may be inf).
        integer: return whole units.

    Integer mode takes units greedily by marginal gain per unit cost, all at once: it finds
    the gain-per-cost threshold by bisection (a closed-form count per layer, vectorised) and
    then adds the next-best units, in order, while they fit. This is the greedy that starts
    from the floor of the continuous optimum, and:

    * with equal costs it is optimal for the concave integer program (``gap_bound`` = 0);
    * with unequal costs the integer program is a knapsack, and the result is within
      ``gap_bound`` = the gain of the first unit that did not fit of the integer optimum
      (the greedy value plus that unit's gain bounds the LP relaxation from above).

    Returns:
        SolverResult with x = e (float array; integral values when ``integer``).

    Raises:
        ValueError: for invalid inputs (naming the argument) and for a budget below the
            smallest reachable cost sum(c * lo).

    Example:
        >>> solve_allocation([0.5, 0.3, 0.2], 1.0, 2.0, gamma=10, beta=1, integer=True).x.tolist()
        [1.0, 1.0, 0.0]
    """
    q_v = per_layer_vector("q", q, None)
    k = q_v.size
    c_v = per_layer_vector("cost", cost, k)
    if np.any(c_v == 0):
        raise ValueError("cost: every layer's unit cost must be positive")
    a_v = per_layer_vector("alpha", alpha, k)
    budget = _scalar("budget", budget)
    gamma = _scalar("gamma", gamma, positive=True)
    beta = _scalar("beta", beta)
    lo_v, hi_v = per_layer_bounds(lo, hi, k, allow_inf_hi=True)
    if integer:
        lo_v, hi_v = np.ceil(lo_v), np.floor(hi_v)
        bad = np.flatnonzero(lo_v > hi_v)
        if bad.size:
            raise ValueError(f"lo/hi: no whole unit fits between the bounds of layer {int(bad[0])}")

    g = gamma * np.power(q_v, beta)
    reach_lo = float(c_v @ lo_v)
    if budget < reach_lo * (1 - 1e-12):
        reach_hi = float(c_v @ hi_v)
        raise ValueError(
            f"budget: {budget:g} is below the smallest reachable cost; the reachable range is"
            f" [{reach_lo:.6g}, {reach_hi:.6g}] (sum of cost * lo .. cost * hi)"
        )

    def e_at(lam: float) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            raw = g / (a_v + lam * c_v) - 1.0
        raw = np.where(g > 0, raw, -np.inf)  # no value: stay at lo
        return np.clip(raw, lo_v, hi_v)

    def value(e: np.ndarray) -> float:
        return allocation_objective(e, q_v, gamma=gamma, beta=beta, alpha=a_v)

    cont, lam, steps = _continuous_allocation(e_at, g, c_v, a_v, lo_v, hi_v, budget)
    if not integer:
        return SolverResult(cont, lam, value(cont), steps)
    units, gap, more = _greedy_units(g, c_v, a_v, lo_v, hi_v, budget)
    return SolverResult(units, lam, value(units), steps + more, gap_bound=gap)


def _continuous_allocation(e_at, g, c, alpha, lo, hi, budget) -> tuple[np.ndarray, float, int]:
    """The continuous optimum, its dual and the number of dual evaluations."""
    e0 = e_at(0.0)
    with np.errstate(over="ignore", invalid="ignore"):  # e0 is inf where alpha = 0 and hi = inf
        slack = c @ e0 <= budget
    if slack:  # the budget is slack: every layer sits at its own optimum
        return e0, 0.0, 1
    with np.errstate(divide="ignore", invalid="ignore"):
        lam_all_lo = np.where(g > 0, (g / (1.0 + lo) - alpha) / c, 0.0)
    lam_max = max(float(lam_all_lo.max()), 0.0)
    a, b, steps = bisect_decreasing(lambda lam: c @ e_at(lam) - budget, lam_max)

    # Polish with Newton on the free set from the feasible end; the spend is convex and
    # decreasing in lam, so a Newton step from either side never crosses the free piece.
    lam = b
    e_b = e_at(b)
    free = (e_b > lo) & (e_b < hi) & (g > 0)
    if free.any():
        rest = budget - c[~free] @ e_b[~free] + c[free].sum()
        gf, cf, af = g[free], c[free], alpha[free]
        for _ in range(50):
            denom = af + lam * cf
            spend = np.sum(cf * gf / denom) - rest
            slope = -np.sum(cf * cf * gf / denom**2)
            step = spend / slope
            lam_new = lam - step
            steps += 1
            if not (a <= lam_new <= b) or abs(step) <= 1e-16 * max(lam, 1e-300):
                break
            lam = lam_new
        if c @ e_at(lam) > budget * (1 + 1e-12):
            lam = b
    e = e_at(lam)
    above = c @ (e - lo)
    if c @ e > budget and above > 0:
        # g / (alpha + lam c) - 1 cannot resolve e below one ulp of 1 + e, so a budget at (or
        # within rounding of) sum(c * lo) can come out a few ulps over: give those ulps back.
        e = np.minimum(lo + (e - lo) * (max(budget - c @ lo, 0.0) / above), hi)
    return e, float(lam), steps


def _greedy_units(g, c, alpha, lo, hi, budget) -> tuple[np.ndarray, float, int]:
    """Integer allocation: every unit with gain per cost above a threshold, then a greedy fill."""

    def ratio(e: np.ndarray) -> np.ndarray:
        # gain per cost of the unit that takes layer k from e_k to e_k + 1
        with np.errstate(divide="ignore", invalid="ignore"):
            return (g * np.log1p(1.0 / (e + 1.0)) - alpha) / c

    def count(t: float) -> np.ndarray:
        # units from lo whose ratio >= t > 0: e + 1 <= 1 / expm1((t c + alpha) / g)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            s = np.where(g > 0, (t * c + alpha) / g, np.inf)
            last = np.floor(1.0 / np.expm1(s) - 1.0)
        cnt = np.clip(last - lo + 1.0, 0.0, hi - lo)
        # guard the floor against rounding at the boundary, one unit either way
        cnt = np.where((cnt > 0) & (ratio(lo + cnt - 1.0) < t), cnt - 1.0, cnt)
        grow = (cnt < hi - lo) & (ratio(lo + cnt) >= t)
        return np.where(grow, cnt + 1.0, cnt)

    room = budget - c @ lo
    first = ratio(lo)
    evaluations = 0
    take = np.zeros_like(lo)
    if np.any((first > 0) & (hi > lo)):
        t_top = float(first.max())
        tiny = np.finfo(np.float64).tiny
        evaluations += 1
        with np.errstate(over="ignore"):  # alpha = 0 and hi = inf: ~1e308 units have a gain
            fits_all = c @ count(tiny) <= room
        if fits_all:
            take = count(tiny)  # every unit with positive gain fits
        else:
            # bisect the threshold: spend(t) is a decreasing step function of t
            def over(t: float) -> float:
                return c @ count(t) - room

            t_lo, t_hi = tiny, t_top * (1.0 + 1e-12)
            while evaluations < _MAX_BISECTIONS and t_hi - t_lo > _REL_TOL * t_hi:
                m = np.sqrt(t_lo * t_hi) if t_hi > 4.0 * t_lo else 0.5 * (t_lo + t_hi)
                if m <= t_lo or m >= t_hi:
                    break
                evaluations += 1
                if over(m) > 0:
                    t_lo = m
                else:
                    t_hi = m
            take = count(t_hi)
    e = lo + take

    # Greedy fill: the next unit of each layer, best gain per cost first, while they fit.
    nxt = ratio(e)
    open_ = (e < hi) & (nxt > 0)
    order = np.argsort(-np.where(open_, nxt, -np.inf), kind="stable")[: int(open_.sum())]
    spent = np.cumsum(c[order])
    fits = spent <= budget - c @ e + 1e-12 * max(budget, 1.0)
    chosen = order[fits]
    e[chosen] += 1.0
    gap = 0.0
    stuck = order[~fits]
    if stuck.size and not np.allclose(c, c[0]):
        gap = float(nxt[stuck[0]] * c[stuck[0]])  # gain of the first unit that did not fit
    return e, gap, evaluations


# ----------------------------------------------------------------------------- transfer


@dataclass(frozen=True)
class TransferRegret:
    """How much a plan solved on source qualities loses on the target domain (docs/design.md 2.4).

    Attributes:
        delta: ||q_source - q_target||_2.
        regret: objective loss on the target of using the source plan, >= 0 (for pruning
            F_T(x*_S) - F_T(x*_T), for allocation F_T(x*_T) - F_T(x*_S)).
        ratio: regret / delta^2 (0 when delta = 0), bounded as delta -> 0.
        source: the plan solved on q_source; target: the plan solved on q_target.
    """

    delta: float
    regret: float
    ratio: float
    source: SolverResult
    target: SolverResult


def transfer_regret(
    q_source: ArrayLike,
    q_target: ArrayLike,
    *,
    program: Literal["prune", "allocate"] = "prune",
    **kwargs,
) -> TransferRegret:
    """Solve one program on both quality vectors and measure the source plan's target regret.

    Args:
        q_source, q_target: qualities from the two domains (same length).
        program: ``"prune"`` (then pass ``n`` and ``target``) or ``"allocate"``
            (then pass ``cost`` and ``budget``).
        **kwargs: the rest of :func:`solve_pruning` / :func:`solve_allocation`'s arguments.

    Example:
        >>> r = transfer_regret([0.5, 0.3, 0.2], [0.45, 0.33, 0.22], n=[1, 1, 1], target=0.5)
        >>> r.regret >= 0 and r.ratio < 10
        True
    """
    qs = per_layer_vector("q_source", q_source, None)
    qt = per_layer_vector("q_target", q_target, qs.size)
    delta = float(np.linalg.norm(qs - qt))
    if program == "prune":
        src = solve_pruning(qs, **kwargs)
        tgt = solve_pruning(qt, **kwargs)
        params = {k: kwargs[k] for k in ("eta", "kappa", "psi") if k in kwargs}
        regret = pruning_objective(src.x, qt, **params) - tgt.objective
    elif program == "allocate":
        src = solve_allocation(qs, **kwargs)
        tgt = solve_allocation(qt, **kwargs)
        params = {k: kwargs[k] for k in ("gamma", "beta", "alpha") if k in kwargs}
        if "alpha" in params:
            params["alpha"] = np.broadcast_to(np.asarray(params["alpha"], float), qs.shape)
        regret = tgt.objective - allocation_objective(src.x, qt, **params)
    else:
        raise ValueError(f"program: expected 'prune' or 'allocate', got {program!r}")
    regret = max(regret, 0.0)  # rounding can leave a -1e-17 when the plans coincide
    ratio = regret / delta**2 if delta > 0 else 0.0
    return TransferRegret(delta, float(regret), float(ratio), src, tgt)
