"""Interaction-aware refinement: correct a separable plan with measurements of whole plans.

The one-dual plans (docs/design.md 2.2, :mod:`cwca_export.planning.curve_solver`) add up single-block damage.
Real damage is not additive: a whole plan's loss increase over the sum of its blocks' alone
is about 0.5-0.6 for uniform plans and 1.1-2.0 for skewed ones at 70% sparsity on small
Llamas, so a separable program skews too much. Refinement measures the loss of whole plans
(a callable: plan ratios -> calibration loss) and moves weight between blocks only where the
measurement says it helps:

1. marginals: price one step more pruning in every block on top of the current plan
   (K measurements), a finite-difference gradient of the true, joint loss;
2. exchanges: move ``step`` of sparsity from the block whose marginal per weight is highest
   to the one whose marginal is lowest (global sparsity kept, bounds respected); a move is
   kept only when the measured whole-plan loss drops; when no move in a round helps the
   step halves.

Every measurement counts against ``max_evals``; the result reports how many were spent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

Measure = Callable[[np.ndarray], float]


class _Counted:
    """``measure`` that ticks a progress bar of whole-plan forwards (at most ``max_evals``)."""

    def __init__(self, measure: Measure, max_evals: int, show: bool) -> None:
        from cwca_export.progress import bar

        self.measure = measure
        self.bar = bar(total=max_evals, desc="refine", unit="forward", show=show)

    def __call__(self, x: np.ndarray) -> float:
        loss = self.measure(x)
        self.bar.update()
        return loss


@dataclass
class Refinement:
    """What a refinement did.

    Attributes:
        x: the refined ratios.
        loss: measured loss of ``x``; start_loss: of the starting plan.
        evaluations: whole-plan measurements spent (the starting plan's included).
        accepted: exchanges kept, as ``(from_block, to_block, step)``: ``from`` pruned less.
        wall_time_s: time spent measuring.
        history: measured loss after each accepted exchange.
    """

    x: np.ndarray
    loss: float
    start_loss: float
    evaluations: int
    accepted: list[tuple[int, int, float]] = field(default_factory=list)
    wall_time_s: float = 0.0
    history: list[float] = field(default_factory=list)


class _Budget:
    def __init__(self, measure: Measure, max_evals: int) -> None:
        self.measure, self.left, self.spent = measure, max_evals, 0

    def __call__(self, x: np.ndarray) -> float:
        self.left -= 1
        self.spent += 1
        return float(self.measure(x))


def refine_exchange(
    x0: Sequence[float],
    n: Sequence[float],
    measure: Measure,
    *,
    lo: float | Sequence[float] = 0.0,
    hi: float | Sequence[float] = 0.95,
    step: float = 0.05,
    min_step: float = 0.0125,
    max_evals: int = 60,
    moves_per_round: int = 4,
    tol: float = 0.0,
    start_loss: float | None = None,
) -> Refinement:
    """Greedy, measured exchange of sparsity between blocks, within an evaluation budget.

    Args:
        x0: the starting ratios (e.g. the one-dual plan); sum(n * x0) is kept throughout.
        n: prunable weights per block.
        measure: whole-plan loss of a ratio vector (lower is better), e.g. a
            :class:`cwca_export.planning.plan_probe.PlanLoss`.
        lo, hi: per-block bounds.
        step: sparsity moved per exchange, in units of the receiving block's ratio.
        min_step: the smallest step tried before stopping.
        max_evals: measurements allowed, the starting plan's included (>= 2).
        moves_per_round: exchanges tried after each round of marginals.
        tol: a move is kept when it lowers the loss by more than this.
        start_loss: the starting plan's loss when already measured (saves one measurement).

    Returns:
        The :class:`Refinement`; never worse than the starting plan on the measure.

    Example:
        >>> loss = lambda x: float(np.sum([1.0, 4.0] * np.asarray(x) ** 2))
        >>> r = refine_exchange([0.5, 0.5], [1, 1], loss, max_evals=30)
        >>> r.x.round(2).tolist(), r.loss < r.start_loss
        ([0.8, 0.2], True)
    """
    x = np.asarray(x0, dtype=np.float64).copy()
    k = x.size
    n_v = np.broadcast_to(np.asarray(n, dtype=np.float64), (k,)).copy()
    lo_v = np.broadcast_to(np.asarray(lo, dtype=np.float64), (k,)).copy()
    hi_v = np.broadcast_to(np.asarray(hi, dtype=np.float64), (k,)).copy()
    if max_evals < 2:
        raise ValueError(f"--max-evals {max_evals}: needs at least 2 (the start and one move)")
    if not 0 < min_step <= step:
        raise ValueError(f"step {step:g} / min_step {min_step:g}: need 0 < min_step <= step")
    if np.any(x < lo_v - 1e-9) or np.any(x > hi_v + 1e-9):
        raise ValueError("x0: the starting plan lies outside the bounds")
    start = time.perf_counter()
    budget = _Budget(measure, max_evals)
    loss = start_loss = budget(x) if start_loss is None else float(start_loss)
    accepted: list[tuple[int, int, float]] = []
    history: list[float] = []
    while budget.left > 1 and step >= min_step:
        up = np.flatnonzero(x + step <= hi_v + 1e-12)
        if budget.left <= up.size:  # not enough left for a round of marginals and a move
            break
        marginal = np.full(k, np.inf)
        for j in up:
            y = x.copy()
            y[j] += step
            marginal[j] = (budget(y) - loss) / (step * n_v[j])
        # give (prune less) where one more step hurts most; take where it hurts least
        givers = [int(i) for i in np.argsort(-np.where(np.isfinite(marginal), marginal, -np.inf))]
        takers = [int(j) for j in np.argsort(marginal) if np.isfinite(marginal[j])]
        pairs = [(i, j) for i in givers for j in takers if i != j and marginal[i] > marginal[j]]
        pairs.sort(key=lambda p: marginal[p[1]] - marginal[p[0]])
        tried, improved, moved = 0, False, set()
        for i, j in pairs:
            if tried >= moves_per_round or budget.left < 1:
                break
            if i in moved or j in moved:
                continue
            y = x.copy()
            y[j] += step
            y[i] -= step * n_v[j] / n_v[i]
            if y[i] < lo_v[i] - 1e-12 or y[j] > hi_v[j] + 1e-12:
                continue
            tried += 1
            trial = budget(y)
            if trial < loss - tol:
                x, loss = y, trial
                accepted.append((i, j, step))
                history.append(loss)
                moved.update((i, j))
                improved = True
        if not improved:
            step /= 2
    return Refinement(
        x=x, loss=loss, start_loss=start_loss, evaluations=budget.spent, accepted=accepted,
        wall_time_s=time.perf_counter() - start, history=history,
    )


def choose_by_loss(candidates: Mapping[str, Sequence[float]], measure: Measure) -> tuple[str, dict[str, float]]:
    """Measure each candidate plan and return the name of the best, with every loss.

    Used to pick kappa and the band half-width from a small grid by calibration loss.

    Example:
        >>> choose_by_loss({"a": [0.5], "b": [0.2]}, lambda x: float(x[0]))
        ('b', {'a': 0.5, 'b': 0.2})
    """
    if not candidates:
        raise ValueError("candidates: nothing to choose from")
    losses = {name: float(measure(np.asarray(x, dtype=np.float64))) for name, x in candidates.items()}
    return min(losses, key=losses.__getitem__), losses


def candidate_plans(
    scores,
    sparsity: float,
    *,
    kappas: Sequence[float] = (1.0, 0.5, 0.25),
    bands: Sequence[float | None] = (None, 0.2, 0.1, 0.05),
    lo: float = 0.0,
    hi: float = 0.95,
) -> dict[str, object]:
    """The small grid a tuned plan is chosen from, by name: uniform plus every rule setting.

    Scores with measured damage curves give ``damage`` plans per band; other scores give
    MDL plans (docs/design.md 2.2) per kappa and band. Uniform is always a candidate, so a tuned
    plan is never worse than uniform on the calibration loss.
    """
    from cwca_export.planning.plan import Plan, has_damage_curves, plan_by_rule

    plans: dict[str, object] = {}
    k = scores.num_blocks
    plans["uniform"] = Plan("prune", x=[sparsity] * k, q=scores.qualities().tolist(), n_params=list(scores.n_params),
                            lo=[lo] * k, hi=[hi] * k, block_names=list(scores.block_names),
                            parameters={"sparsity": sparsity, "rule": "uniform",
                                        "made_by": {"rule": "uniform", "lo": lo, "hi": hi}},
                            model=dict(scores.model))
    curves = has_damage_curves(scores)
    for band in bands:
        suffix = "" if band is None else f"-band{band:g}"
        common = dict(band=band, lo=lo, hi=hi)
        if curves:
            plans[f"damage{suffix}"] = plan_by_rule(scores, sparsity, rule="damage", **common)
        else:
            for kappa in kappas:
                plans[f"cwca-k{kappa:g}{suffix}"] = plan_by_rule(scores, sparsity, rule="cwca", kappa=kappa, **common)
    return plans


def refine_plan(
    model,
    scores,
    sparsity: float,
    data,
    *,
    method: str = "wanda",
    tune: bool = True,
    max_evals: int = 40,
    lo: float = 0.0,
    hi: float = 0.95,
    band: float | None = None,
    batch_size: int = 8,
    progress: bool = False,
    probe_cache: int | None = None,
    processes=None,
):
    """A pruning plan for ``model``: closed-form first, then corrected on whole-plan losses.

    Args:
        model: the dense causal LM the plan is for (restored before returning).
        scores: its :class:`~cwca_export.scores.LayerScores` (measured damage recommended).
        sparsity: global target.
        data: calibration ids ``(N, L)`` or a ``CalibrationData``.
        method: the pruner the plan will be applied with (its loss is what is measured).
        tune: choose the starting plan (rule setting, kappa, band) by calibration loss from
            :func:`candidate_plans`; otherwise start from the closed form with ``band``.
        max_evals: whole-plan forwards for tuning and refinement together.
        lo, hi, band: bounds; ``band`` keeps every block within [S - band, S + band].
        batch_size: sequences per forward.
        progress: a bar over whole-plan forwards on stderr (shown on a terminal).
        probe_cache: bytes of pruned block copies kept between plans (least recently used
            evicted, recomputed on a miss; same plan); default 2 GiB.
        processes: a :class:`~cwca_export.data_parallel.Processes` to measure data-parallel:
            each process runs its share of the calibration batches and the sums are
            all-reduced, so every process returns the same plan as one process would.

    Returns:
        The :class:`~cwca_export.planning.plan.Plan`, with ``parameters["refinement"]`` recording the
        start, the forwards spent, the moves kept and the calibration losses.
    """
    import dataclasses

    from cwca_export.planning.plan_probe import PlanLoss

    ids = getattr(data, "input_ids", data)
    if band is not None:
        lo, hi = max(lo, sparsity - band), min(hi, sparsity + band)
    bands = (None, 0.2, 0.1, 0.05) if band is None else (None,)
    plans = candidate_plans(scores, sparsity, lo=lo, hi=hi, bands=bands)
    if not tune:
        plans = {name: p for name, p in plans.items() if name in ("damage", "cwca-k1")}
    if max_evals < len(plans) + 2:
        raise ValueError(
            f"--max-evals {max_evals}: tuning alone measures {len(plans)} plans; pass --max-evals"
            f" {len(plans) + 2} or more, or --no-tune"
        )
    cache = {} if probe_cache is None else {"cache_bytes": int(probe_cache)}
    ids, reduce = _share(ids, batch_size, processes)
    measure = PlanLoss(model, ids, method=method, batch_size=batch_size, reduce=reduce, **cache)
    counted = _Counted(measure, max_evals, progress)
    began = time.perf_counter()
    try:
        best, losses = choose_by_loss({name: p.x for name, p in plans.items()}, counted)
        start = plans[best]
        result = refine_exchange(start.x, start.n_params, counted, lo=start.lo, hi=start.hi,
                                 max_evals=max_evals - len(plans), start_loss=losses[best])
    finally:
        counted.bar.close()
        measure.close()
    record = _refinement_record(method, best, losses, measure, result, len(plans), began, processes)
    return dataclasses.replace(
        start, x=[float(v) for v in result.x],
        parameters={**start.parameters, "refinement": record},
    )


def _share(ids, batch_size: int, processes):
    """This process's calibration ids and the all-reduce that sums measurements over the rest."""
    if processes is None or processes.world == 1:
        return ids, None
    return processes.share(ids, batch_size), processes.reduce_sum


def _refinement_record(method, best, losses, measure, result, measured_starts, began, processes) -> dict:
    """What ``parameters["refinement"]`` records: the start, its rivals, the forwards, the losses."""
    return {
        "method": method,
        "start": best,
        "candidates": losses,
        "dense_loss": measure.dense_loss,
        "calib_loss_start": result.start_loss,
        "calib_loss": result.loss,
        "forwards": measured_starts + result.evaluations,
        "moves": [list(m) for m in result.accepted],
        "wall_time_s": round(time.perf_counter() - began, 2),
        "processes": 1 if processes is None else processes.world,
    }


# ---------------------------------------------------------------- ranks (allocation plans)


def _whole_units(
    x0: Sequence[float], lo: Sequence[float], hi: Sequence[float], step: float, max_evals: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The start, bounds (integer vectors) and step of a unit exchange, checked."""
    e = np.rint(np.asarray(x0, dtype=np.float64)).astype(np.int64)
    k = e.size
    lo_v = np.rint(np.broadcast_to(np.asarray(lo, dtype=np.float64), (k,))).astype(np.int64)
    hi_v = np.rint(np.broadcast_to(np.asarray(hi, dtype=np.float64), (k,))).astype(np.int64)
    if max_evals < 2:
        raise ValueError(f"--max-evals {max_evals}: needs at least 2 (the start and one move)")
    if int(step) != step or step < 1:
        raise ValueError(f"step {step}: a whole number of units >= 1")
    if np.any(np.abs(np.asarray(x0, dtype=np.float64) - e) > 1e-9):
        raise ValueError("x0: units must be whole numbers")
    if np.any(e < lo_v) or np.any(e > hi_v):
        raise ValueError("x0: the starting plan lies outside the bounds")
    return e, lo_v, hi_v, int(step)


def _unit_marginals(
    e: np.ndarray, loss: float, step: int, lo_v: np.ndarray, hi_v: np.ndarray,
    kept: Callable[[int, int], float], evals: _Budget,
) -> np.ndarray | None:
    """Measured loss per weight of ``step`` units in each block (NaN: not priced); None when out of evaluations."""
    k = e.size
    priced = [j for j in range(k) if e[j] - step >= lo_v[j] or e[j] + step <= hi_v[j]]
    if not priced or evals.left <= len(priced):
        return None
    marginal = np.full(k, np.nan)
    for j in priced:
        y = e.copy()
        if e[j] - step >= lo_v[j]:  # loss added per weight freed by giving up `step` units
            y[j] -= step
            marginal[j] = (evals(y) - loss) / (kept(j, int(e[j])) - kept(j, int(y[j])))
        else:  # at the lower bound: loss saved per weight added by `step` more
            y[j] += step
            marginal[j] = (loss - evals(y)) / (kept(j, int(y[j])) - kept(j, int(e[j])))
    return marginal


def _units_bought(i: int, e: np.ndarray, hi_v: np.ndarray, kept: Callable[[int, int], float], *, room: float) -> int:
    """How many whole units block ``i`` can take within ``room`` weights and its upper bound."""
    gain = 0
    while e[i] + gain + 1 <= hi_v[i] and kept(i, int(e[i] + gain + 1)) - kept(i, int(e[i])) <= room:
        gain += 1
    return gain


def refine_unit_exchange(
    x0: Sequence[float],
    kept: Callable[[int, int], float],
    budget: float,
    measure: Measure,
    *,
    lo: Sequence[float],
    hi: Sequence[float],
    step: int = 1,
    max_evals: int = 60,
    moves_per_round: int = 4,
    tol: float = 0.0,
    start_loss: float | None = None,
) -> Refinement:
    """Measured exchange of whole units between blocks; kept weights never exceed ``budget``.

    The integer counterpart of :func:`refine_exchange` for allocation plans (ranks), where
    a unit's weight cost differs between blocks and with the units (Linears that stay dense):

    1. marginals: price ``step`` units less in every block (one more step where a block is
       at its lower bound), the measured loss change per weight freed;
    2. exchanges: take ``step`` units from a block whose marginal is low and give the
       weights freed to one whose marginal is high, as many whole units as they buy; a move
       is kept only when the measured whole-plan loss drops; when no move in a round helps
       the step halves, down to one unit.

    Args:
        x0: starting units (whole numbers), within ``lo`` / ``hi`` and the budget.
        kept: ``kept(block, units)``: weights block keeps at that many units (increasing).
        budget: the most weights all blocks may keep together.
        measure: whole-plan loss of a units vector, e.g. a
            :class:`cwca_export.planning.plan_probe.RankPlanLoss`.
        lo, hi: per-block bounds in units.
        step: units taken per exchange at first.
        max_evals, moves_per_round, tol, start_loss: as in :func:`refine_exchange`.

    Returns:
        The :class:`Refinement` (x in units); never worse than the start on the measure. Its
        ``accepted`` moves are ``(from_block, to_block, step)``: ``step`` units taken from
        ``from_block``, the weights they freed given to ``to_block``.

    Example:
        >>> loss = lambda e: float(np.sum(np.array([1.0, 4.0]) / np.asarray(e)))
        >>> r = refine_unit_exchange([4, 4], lambda k, e: e, 8, loss, lo=[1, 1], hi=[8, 8], max_evals=30)
        >>> r.x.tolist(), r.loss < r.start_loss
        ([3.0, 5.0], True)
    """
    e, lo_v, hi_v, step = _whole_units(x0, lo, hi, step, max_evals)
    k = e.size

    def spent_of(units: np.ndarray) -> float:
        return float(sum(kept(i, int(u)) for i, u in enumerate(units)))

    spent = spent_of(e)
    if spent > budget:
        raise ValueError(f"x0: keeps {spent:g} weights, over the budget {budget:g}")
    start = time.perf_counter()
    evals = _Budget(lambda units: measure(units.astype(np.float64)), max_evals)
    loss = start_loss = evals(e) if start_loss is None else float(start_loss)
    accepted: list[tuple[int, int, float]] = []
    history: list[float] = []
    while evals.left > 1 and step >= 1:
        marginal = _unit_marginals(e, loss, step, lo_v, hi_v, kept, evals)
        if marginal is None:
            break
        gainers = [i for i in range(k) if e[i] < hi_v[i] and np.isfinite(marginal[i])]
        losers = [j for j in range(k) if e[j] - step >= lo_v[j] and np.isfinite(marginal[j])]
        pairs = [(i, j) for i in gainers for j in losers if i != j and marginal[i] > marginal[j]]
        pairs.sort(key=lambda p: marginal[p[1]] - marginal[p[0]])
        tried, improved, moved = 0, False, set()
        for i, j in pairs:
            if tried >= moves_per_round or evals.left < 1:
                break
            if i in moved or j in moved:
                continue
            y = e.copy()
            y[j] -= step
            gain = _units_bought(i, e, hi_v, kept, room=budget - spent + kept(j, int(e[j])) - kept(j, int(y[j])))
            if gain < 1:
                continue
            y[i] += gain
            tried += 1
            trial = evals(y)
            if trial < loss - tol:
                e, loss = y, trial
                spent = spent_of(e)
                accepted.append((j, i, float(step)))
                history.append(loss)
                moved.update((i, j))
                improved = True
        if not improved:
            step //= 2
    return Refinement(
        x=e.astype(np.float64), loss=loss, start_loss=start_loss, evaluations=evals.spent,
        accepted=accepted, wall_time_s=time.perf_counter() - start, history=history,
    )


def refine_ranks(
    model,
    scores,
    budget_fraction: float,
    data,
    *,
    method: str = "lowrank",
    rank_step: int = 8,
    max_evals: int = 40,
    tune: bool = True,
    form: str = "piecewise",
    lo: float = 0.0,
    hi: float = 0.95,
    step_units: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    processes=None,
    **options,
):
    """A rank plan for ``model``: measured damage in closed form, then corrected on whole plans.

    Args:
        model: the dense causal LM the plan is for (its Linears are put back before returning).
        scores: ``damage`` scores measured with ``pruner=lowrank`` or ``asvd``.
        budget_fraction: fraction of the blocks' Linear weights kept (see
            :func:`cwca_export.planning.rank_plans.plan_ranks_from_damage`); never exceeded.
        data: calibration ids ``(N, L)`` or a ``CalibrationData``.
        method: ``lowrank`` or ``asvd``, the method the plan will be applied with.
        rank_step: rank of one plan unit.
        max_evals: whole-plan forwards for choosing the start and refining together.
        tune: also measure the uniform plan at the same budget and start from the better one
            (so the result is never worse than uniform on the calibration loss).
        form: the curve model of the closed form (``piecewise`` or ``power``).
        lo, hi: bounds on each block's rank-removal fraction.
        step_units: units taken per exchange at first; default about 5% of a block's rank.
        batch_size: sequences per forward.
        progress: a bar over whole-plan forwards on stderr (shown on a terminal).
        processes: data-parallel measurement, as in :func:`refine_plan`.
        **options: the method's options (``damp`` for ``asvd``).

    Returns:
        The allocation :class:`~cwca_export.planning.plan.Plan` (units), ``parameters["refinement"]``
        recording the start, the forwards spent, the moves kept and the calibration losses;
        ``parameters["kept_params"]`` / ``["kept_fraction"]`` are the refined plan's.
    """
    import dataclasses

    from cwca_export.planning.plan_probe import RankPlanLoss
    from cwca_export.planning.rank_plans import (
        kept_parameters,
        linear_shapes,
        plan_ranks_from_damage,
        plan_ranks_uniform,
    )

    ids = getattr(data, "input_ids", data)
    shapes = linear_shapes(model)
    plans = {"damage": plan_ranks_from_damage(scores, budget_fraction, shapes=shapes, rank_step=rank_step,
                                              form=form, lo=lo, hi=hi)}
    if tune:
        plans["uniform"] = plan_ranks_uniform(scores, budget_fraction, shapes=shapes, rank_step=rank_step,
                                              lo=lo, hi=hi)
    if max_evals < len(plans) + 2:
        raise ValueError(
            f"--max-evals {max_evals}: choosing the start alone measures {len(plans)} plans; pass"
            f" --max-evals {len(plans) + 2} or more, or --no-tune"
        )
    total = float(sum(scores.n_params))
    budget = float(budget_fraction) * total

    def kept(block: int, units: int) -> float:
        return float(kept_parameters(shapes[block], units * rank_step))

    if step_units is None:
        full = float(np.median([max(min(m, n) for m, n in block) for block in shapes]))
        step_units = max(1, int(round(0.05 * full / rank_step)))
    ids, reduce = _share(ids, batch_size, processes)
    measure = RankPlanLoss(model, ids, method=method, rank_step=rank_step, batch_size=batch_size, reduce=reduce,
                           **options)
    counted = _Counted(measure, max_evals, progress)
    began = time.perf_counter()
    try:
        best, losses = choose_by_loss({name: p.x for name, p in plans.items()}, counted)
        start = plans[best]
        result = refine_unit_exchange(start.x, kept, budget, counted, lo=start.lo, hi=start.hi,
                                      step=step_units, max_evals=max_evals - len(plans),
                                      start_loss=losses[best])
    finally:
        counted.bar.close()
        measure.close()
    kept_total = int(sum(kept(i, int(u)) for i, u in enumerate(result.x)))
    record = _refinement_record(method, best, losses, measure, result, len(plans), began, processes)
    return dataclasses.replace(
        start, x=[float(v) for v in result.x],
        parameters={**start.parameters, "kept_params": kept_total, "kept_fraction": kept_total / total,
                    "refinement": record},
    )


# ---------------------------------------------------------------- refining again at a new target

_NOT_METHOD_OPTIONS = ("data", "batch_size", "device", "sequential", "check_fingerprint", "progress", "rank_step")


def refine_again(model, plan, data, *, batch_size: int = 8, **compress_options):
    """``plan``, moved to a new target by :func:`cwca_export.planning.plan_scaling.rescale_plan`,
    refined there again as its refinement was: the same method and forwards, the start chosen by
    calibration loss (``tune``), the bounds and curves the moved plan records.

    A budget search calls this at the structure levels it prices, so a refined plan keeps its
    rule at every level instead of falling back to the closed form it started from.

    Args:
        model: the dense causal LM (its Linears are put back before returning).
        plan: a moved plan; one without ``parameters["refine_with"]`` is returned as is.
        data: calibration ids ``(N, L)`` or a ``CalibrationData``.
        batch_size: sequences per forward.
        **compress_options: the options the plan is applied with; the method's own (e.g.
            ``damp``) go to the measurement, ``data`` and the like are dropped.

    Returns:
        The refined plan (``parameters["refinement"]`` as :func:`refine_ranks` /
        :func:`refine_plan` write it, ``parameters["rescaled_from"]`` kept).

    Raises:
        ValueError: the plan records per-block bounds that refinement cannot keep, or too
            few forwards to choose a start.
    """
    again = plan.parameters.get("refine_with")
    if not again:
        return plan
    from cwca_export.planning.plan import scores_from_snapshot
    from cwca_export.planning.plan_scaling import target_of

    made = plan.parameters.get("made_by") or {}
    if made.get("lo_blocks") or made.get("hi_blocks"):
        raise ValueError("the plan bounds single blocks (lo_blocks / hi_blocks), which refinement does not keep")
    scores = scores_from_snapshot(plan)
    kind, target = target_of(plan)
    options = {k: v for k, v in compress_options.items() if k not in _NOT_METHOD_OPTIONS}
    method, forwards = str(again["method"]), int(again["forwards"])
    lo, hi = made.get("lo", 0.0), made.get("hi", 0.95)
    if not all(isinstance(v, (int, float)) for v in (lo, hi)):
        raise ValueError("the plan bounds each block differently (lo / hi lists), which refinement does not keep")
    if kind == "kept_fraction":
        refined = refine_ranks(model, scores, target, data, method=method, rank_step=int(plan.parameters["rank_step"]),
                               max_evals=forwards, tune=True, form=made.get("form", "piecewise"), lo=lo, hi=hi,
                               batch_size=batch_size, **options)
    elif kind == "sparsity":
        refined = refine_plan(model, scores, target, data, method=method, tune=True, max_evals=forwards,
                              lo=lo, hi=hi, band=made.get("band"), batch_size=batch_size)
    else:
        raise ValueError("refinement moves ranks or sparsity; a unit-budget plan is not refined again")
    refined.parameters["rescaled_from"] = plan.parameters.get("rescaled_from")
    return refined
