"""Pruning plans from measured per-block damage curves, in closed form.

NumPy only. The pruning program of docs/design.md 2.2 prices block k at eta q_k^kappa psi(rho_k)
with one psi for every block. Measured single-block damage D_k(rho) (the calibration-loss
increase of compressing block k alone, see :mod:`cwca_export.planning.damage`) says both how much a
block matters and how fast its damage grows (on small Llamas like rho^4 to rho^5.6, not
rho^2), so here each block gets its own curve and the program becomes

    minimise sum_k D_k(rho_k)   s.t.  sum_k n_k rho_k = target * sum_k n_k,  lo_k <= rho_k <= hi_k

still solved through one dual variable (the price of a pruned weight):

- ``form="piecewise"``: D_k is the lower convex envelope of the probes (0, 0), (p_j, d_kj),
  extended past the last probe with its last slope. Each block's Lagrangian minimiser is a
  breakpoint, so the dual is the per-weight slope at which the segments sorted by slope
  fill the target; sorting them is the exact one-dual solve.
- ``form="power"``: D_k(rho) = a_k rho^b_k fitted by least squares in log space; KKT gives
  rho_k(nu) = clip((nu n_k / (a_k b_k))^(1 / (b_k - 1)), lo_k, hi_k), found by bisection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from cwca_export.planning.solver import (
    SolverResult,
    bisect_decreasing,
    per_layer_bounds,
    per_layer_vector,
    pruning_mass,
)

CurveForm = Literal["piecewise", "power"]
_MIN_EXPONENT = 1.05  # a power fit flatter than this is not convex enough to price
_MAX_EXPONENT = 12.0

__all__ = [
    "CurveForm", "convex_envelope", "curve_function", "curve_value", "fit_power", "lower_hull", "solve_pruning_curves",
]


def _check_curves(points, damage) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(points, dtype=np.float64)
    d = np.asarray(damage, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError("points: expected a non-empty 1-D array of probe ratios")
    if np.any(~np.isfinite(p)) or np.any(p <= 0) or np.any(p > 1) or np.any(np.diff(p) <= 0):
        raise ValueError("points: probe ratios must be strictly increasing, in (0, 1]")
    if d.ndim != 2 or d.shape[1] != p.size:
        raise ValueError(f"damage: expected shape (blocks, {p.size}), got {d.shape}")
    if d.shape[0] == 0:
        raise ValueError("damage: no blocks given")
    if not np.all(np.isfinite(d)):
        raise ValueError("damage: contains NaN or inf")
    return p, d


def convex_envelope(points, damage) -> tuple[np.ndarray, np.ndarray]:
    """The lower convex envelope of each block's probes, with (0, 0) prepended.

    Args:
        points: probe ratios ``(P,)``, increasing in (0, 1].
        damage: measured damage ``(K, P)``.

    Returns:
        ``(x, y)`` of shape ``(P + 1,)`` and ``(K, P + 1)``: y is the envelope evaluated at
        every probe (a probe above the envelope is lowered onto it).

    Example:
        >>> convex_envelope([0.5, 1.0], [[0.6, 1.0]])[1].round(3).tolist()  # 0.6 > chord: lowered
        [[0.0, 0.5, 1.0]]
    """
    p, d = _check_curves(points, damage)
    x = np.concatenate([[0.0], p])
    y = np.concatenate([np.zeros((d.shape[0], 1)), d], axis=1)
    env = np.empty_like(y)
    for k, row in enumerate(y):  # P is a handful of probes: a monotone-chain hull per block
        hull = lower_hull(x, row)
        env[k] = np.interp(x, x[hull], row[hull])
    return x, env


def lower_hull(x: np.ndarray, y: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of points ``(x, y)`` given in increasing ``x`` (monotone chain).

    Example:
        >>> lower_hull(np.array([0.0, 1.0, 2.0]), np.array([0.0, 2.0, 2.0]))
        [0, 2]
    """
    hull: list[int] = []
    for j in range(x.size):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the chord a -> j: not on the lower envelope
            if (y[b] - y[a]) * (x[j] - x[a]) >= (y[j] - y[a]) * (x[b] - x[a]):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def fit_power(points, damage) -> tuple[np.ndarray, np.ndarray]:
    """Fit D_k(rho) = a_k rho^b_k to each block's positive probes (least squares on logs).

    A block with fewer than two positive probes keeps the exponent 2 and matches its largest
    probe; one with none gets a_k = 0 (free to prune). Exponents are clipped to
    [1.05, 12] so every fitted curve stays convex and finite.

    Example:
        >>> a, b = fit_power([0.25, 0.5, 1.0], [[0.5 * 0.25**3, 0.5 * 0.5**3, 0.5]])
        >>> round(float(a[0]), 6), round(float(b[0]), 6)
        (0.5, 3.0)
    """
    p, d = _check_curves(points, damage)
    k = d.shape[0]
    a = np.zeros(k)
    b = np.full(k, 2.0)
    logp = np.log(p)
    for i, row in enumerate(d):
        pos = row > 0
        if pos.sum() >= 2:
            slope, intercept = np.polyfit(logp[pos], np.log(row[pos]), 1)
            b[i] = float(np.clip(slope, _MIN_EXPONENT, _MAX_EXPONENT))
            # refit the scale for the clipped exponent: mean log residual
            a[i] = float(np.exp(np.mean(np.log(row[pos]) - b[i] * logp[pos])))
        elif pos.any():
            j = int(np.flatnonzero(pos)[-1])
            a[i] = row[j] / p[j] ** b[i]
    return a, b


def curve_function(points, damage, *, form: CurveForm = "piecewise") -> Callable[[int, np.ndarray], np.ndarray]:
    """``f(k, rho)``: block k's modelled damage at ratios ``rho`` under ``form``.

    ``piecewise``: the convex envelope, extended past the last probe with its last slope;
    ``power``: the a_k rho^b_k fit.
    """
    if form == "piecewise":
        x, env = convex_envelope(points, damage)

        def piecewise(k: int, rho: np.ndarray) -> np.ndarray:
            last = (env[k, -1] - env[k, -2]) / (x[-1] - x[-2])
            return np.interp(rho, x, env[k]) + np.maximum(np.asarray(rho) - x[-1], 0.0) * last

        return piecewise
    if form == "power":
        a, b = fit_power(points, damage)
        return lambda k, rho: a[k] * np.power(rho, b[k])
    raise ValueError(f"form: expected 'piecewise' or 'power', got {form!r}")


def curve_value(rho, points, damage, *, form: CurveForm = "piecewise") -> np.ndarray:
    """Each block's modelled damage D_k(rho_k) under ``form`` (what the solver minimises)."""
    r = np.asarray(rho, dtype=np.float64)
    f = curve_function(points, damage, form=form)
    return np.array([float(f(k, r[k])) for k in range(r.size)])


def solve_pruning_curves(
    points,
    damage,
    n,
    target: float,
    *,
    lo=0.0,
    hi=0.95,
    form: CurveForm = "piecewise",
) -> SolverResult:
    """Per-block ratios reaching a global sparsity at the least total measured damage.

    Args:
        points: probe ratios ``(P,)`` shared by every block, increasing in (0, 1].
        damage: measured damage ``(K, P)`` of compressing each block alone at each probe.
        n: prunable weights n_k per block (or any per-block cost of one unit of rho).
        target: global sparsity as a fraction of sum(n).
        lo, hi: per-block bounds (scalar or one per block), 0 <= lo <= hi <= 1.
        form: ``"piecewise"`` (convex envelope of the probes) or ``"power"`` (a rho^b fit).

    Returns:
        SolverResult: x = rho, dual = price of one pruned weight, objective = the modelled
        total damage sum_k D_k(rho_k).

    Raises:
        ValueError: for malformed curves or bounds, or a target outside the reachable range.

    Example:
        >>> r = solve_pruning_curves([0.5, 1.0], [[0.1, 0.4], [1.0, 4.0]], [1, 1], 0.5, hi=0.75)
        >>> r.x.round(3).tolist()
        [0.75, 0.25]
    """
    p, d = _check_curves(points, damage)
    k = d.shape[0]
    n_v = per_layer_vector("n", n, k)
    if np.any(n_v == 0):
        raise ValueError("n: every block needs a positive number of prunable weights")
    lo_v, hi_v = per_layer_bounds(lo, hi, k, allow_inf_hi=False)
    if np.any(hi_v > 1):
        raise ValueError("hi: a pruning ratio cannot exceed 1")
    target = float(target)
    if not np.isfinite(target) or target < 0:
        raise ValueError(f"target: must be a finite non-negative fraction, got {target!r}")
    _total, need, _reach_lo, _reach_hi, slack = pruning_mass(n_v, lo_v, hi_v, target)
    if form == "piecewise":
        rho, dual, steps = _fill_segments(p, d, n_v, lo_v, hi_v, need)
    elif form == "power":
        rho, dual, steps = _solve_power(p, d, n_v, lo_v, hi_v, need, slack)
    else:
        raise ValueError(f"form: expected 'piecewise' or 'power', got {form!r}")
    objective = float(curve_value(rho, p, d, form=form).sum())
    return SolverResult(rho, float(dual), objective, steps)


def _fill_segments(p, d, n_v, lo_v, hi_v, need) -> tuple[np.ndarray, float, int]:
    """Exact solve for convex piecewise-linear curves: fill segments cheapest per weight first."""
    x, env = convex_envelope(p, d)
    # segment edges per block: the envelope's breakpoints, extended to rho = 1 with the last slope
    edges = np.concatenate([x, [1.0]]) if x[-1] < 1.0 else x
    slopes = np.diff(env, axis=1) / np.diff(x)  # (K, P)
    if edges.size > x.size:
        slopes = np.concatenate([slopes, slopes[:, -1:]], axis=1)
    start = np.clip(edges[:-1][None, :], lo_v[:, None], hi_v[:, None])  # (K, S) clipped segments
    stop = np.clip(edges[1:][None, :], lo_v[:, None], hi_v[:, None])
    width = stop - start
    price = slopes / n_v[:, None]  # damage per pruned weight on each segment
    rho = lo_v.copy()
    remaining = need - float(n_v @ lo_v)
    order = np.argsort(price, axis=None, kind="stable")
    dual = 0.0
    steps = 0
    for flat in order:  # at most K * (P + 1) segments; stops at the first partial one
        if remaining <= 0:
            break
        i, j = divmod(int(flat), width.shape[1])
        if width[i, j] <= 0:
            continue
        steps += 1
        take = min(width[i, j], remaining / n_v[i])
        rho[i] += take
        remaining -= take * n_v[i]
        dual = max(float(price[i, j]), 0.0)
    return np.clip(rho, lo_v, hi_v), dual, steps


def _solve_power(p, d, n_v, lo_v, hi_v, need, slack) -> tuple[np.ndarray, float, int]:
    a, b = fit_power(p, d)
    free = a > 0
    if need <= float(n_v @ lo_v) + slack:
        return lo_v.copy(), 0.0, 0
    zero_room = float(n_v[~free] @ (hi_v[~free] - lo_v[~free]))
    base = float(n_v @ lo_v)
    if zero_room > 0 and need <= base + zero_room + slack:  # damage-free blocks absorb it all
        rho = lo_v.copy()
        share = (need - base) / zero_room
        rho[~free] = lo_v[~free] + share * (hi_v[~free] - lo_v[~free])
        return rho, 0.0, 0

    def rho_at(nu: float) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            raw = np.power(nu * n_v / (a * b), 1.0 / (b - 1.0))
        raw = np.where(free, raw, np.inf if nu > 0 else 0.0)
        return np.clip(raw, lo_v, hi_v)

    with np.errstate(divide="ignore"):
        nu_top = a * b * np.power(np.maximum(hi_v, 1e-300), b - 1.0) / n_v
    nu_max = float(nu_top[free].max()) * (1 + 1e-9) if free.any() else 0.0
    if need >= float(n_v @ hi_v) - slack or nu_max == 0.0:
        return hi_v.copy(), nu_max, 0
    lo_nu, hi_nu, steps = bisect_decreasing(lambda nu: need - n_v @ rho_at(nu), nu_max)
    # the mass is continuous in nu: interpolate inside the final bracket
    m_lo, m_hi = n_v @ rho_at(lo_nu), n_v @ rho_at(hi_nu)
    t = 0.0 if m_hi == m_lo else (need - m_lo) / (m_hi - m_lo)
    rho = (1 - t) * rho_at(lo_nu) + t * rho_at(hi_nu)
    return rho, hi_nu, steps
