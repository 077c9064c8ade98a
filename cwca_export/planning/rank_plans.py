"""Rank plans from measured low-rank damage: which rank each block keeps under a weight budget.

``compress`` gives every Linear of a block one shared rank r = units * rank_step and leaves
dense any Linear that rank would not shrink (r (m + n) >= m n), so the weights a block keeps
are not linear in its rank. The planner therefore works on each block's finite list of unit
options (kept weights, measured damage) and solves the integer program exactly: a one-dual
fill of the convex hulls, a pairwise polish, then a search bounded by the convex relaxation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cwca_export.planning import solver
from cwca_export.planning.curve_solver import CurveForm, curve_function, lower_hull
from cwca_export.planning.plan import Plan, damage_curves, damage_pruner, make_plan, per_block_vector, scores_snapshot
from cwca_export.scores import LayerScores

_RANK_PRUNERS = ("lowrank", "asvd")


def linear_shapes(model: Any, *, trust_remote_code: bool = False) -> list[list[tuple[int, int]]]:
    """``(out, in)`` of every Linear of every block, in block order.

    ``model`` is a loaded causal LM or a local checkpoint folder; a folder is instantiated
    from its ``config.json`` on the meta device (no weights are read). These are the shapes
    :func:`plan_ranks_from_damage` prices ranks with. A folder's own modelling code runs
    only with ``trust_remote_code``.
    """
    import torch

    from cwca_export.blocks import find_blocks, weight_out_in

    if isinstance(model, (str, os.PathLike)):
        from cwca_export.loading import check_model_folder, is_compressed_folder

        path = Path(model)
        check_model_folder(path, trust_remote_code=trust_remote_code, weights=False)  # only the config is read
        if is_compressed_folder(path):
            raise ValueError(f"{path}: an already compressed model; plan ranks for the dense one (--model)")
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return [
        [tuple(int(d) for d in weight_out_in(m).shape) for m in b.linears.values()]
        for b in find_blocks(model)
    ]


def kept_parameters(shapes: Sequence[tuple[int, int]], rank: int) -> int:
    """Weights a block keeps when ``lowrank`` / ``asvd`` give every Linear of it rank ``rank``.

    The compression methods use one rank for all Linears of a block (units * rank_step) and
    factorise a Linear ``(m, n)`` only where that saves weights, r (m + n) < m n; a Linear the
    rank does not shrink stays dense. So the block keeps sum_l min(r (m_l + n_l), m_l n_l).

    Example:
        >>> kept_parameters([(64, 64), (16, 64)], 8)  # 8 * 128 + 8 * 80
        1664
        >>> kept_parameters([(64, 64), (16, 64)], 16)  # the (16, 64) Linear stays dense
        3072
    """
    return int(sum(rank * (m + n) if rank * (m + n) < m * n else m * n for m, n in shapes))


@dataclass(frozen=True)
class _RankBlock:
    """One block's Linear shapes under a rank step: the units it can take and what they keep."""

    shapes: tuple[tuple[int, int], ...]
    rank_step: int

    @property
    def full_rank(self) -> int:
        """R_k = max_l min(m_l, n_l): the rank at which the curve's rank-removal fraction is 0."""
        return max(min(m, n) for m, n in self.shapes)

    @property
    def dense_units(self) -> int:
        """The fewest units at which no Linear of the block is factorised (it stays dense)."""
        return max(-(-(m * n) // ((m + n) * self.rank_step)) for m, n in self.shapes)

    def kept(self, units: int) -> int:
        return kept_parameters(self.shapes, int(units) * self.rank_step)

    def removed(self, units: np.ndarray) -> np.ndarray:
        """The curve's coordinate p = max(0, 1 - units * rank_step / R_k)."""
        return np.maximum(0.0, 1.0 - np.asarray(units, dtype=np.float64) * self.rank_step / self.full_rank)

    def unit_range(self, lo: float, hi: float) -> tuple[int, int]:
        """Units allowed by lo <= p <= hi: at least 1 (rank 0 deletes a Linear), at most dense."""
        eps = 1e-9
        low = max(1, int(np.ceil((1.0 - hi) * self.full_rank / self.rank_step - eps)))
        high = self.dense_units
        if lo > 0:
            high = min(high, int(np.floor((1.0 - lo) * self.full_rank / self.rank_step + eps)))
        return low, high


def _rank_pruner(scores: LayerScores) -> str:
    pruner = damage_pruner(scores)
    if pruner not in _RANK_PRUNERS:
        raise ValueError(
            f"rank plans need damage curves measured with a low-rank method, but these scores were"
            f" measured with pruner {pruner!r} (there a point is a fraction of weights removed, not of"
            " rank); hint: cwca-export score MODEL --data FILE --estimator damage --option pruner=lowrank"
            " (or pruner=asvd)"
        )
    return str(pruner)


def _rank_blocks(scores: LayerScores, shapes: Any, rank_step: int) -> list[_RankBlock]:
    if int(rank_step) != rank_step or rank_step < 1:
        raise ValueError(f"rank_step {rank_step}: must be a positive integer")
    if shapes is None:
        raise ValueError("shapes: rank plans need each block's Linear shapes (pass the model or linear_shapes(model))")
    if not isinstance(shapes, (list, tuple)):
        shapes = linear_shapes(shapes)
    if len(shapes) != scores.num_blocks:
        raise ValueError(f"shapes: {len(shapes)} blocks, the scores have {scores.num_blocks}")
    blocks = []
    for k, block in enumerate(shapes):
        dims = tuple((int(m), int(n)) for m, n in block)
        if not dims or any(m < 1 or n < 1 for m, n in dims):
            raise ValueError(f"shapes: block {k} has no Linears or an empty one: {list(dims)}")
        total = sum(m * n for m, n in dims)
        if total != scores.n_params[k]:
            raise ValueError(
                f"shapes: block {k} has {total} weights, the scores {scores.n_params[k]};"
                " hint: the scores were made for another model"
            )
        blocks.append(_RankBlock(dims, int(rank_step)))
    return blocks


class UnitChoice(NamedTuple):
    """What :func:`solve_unit_options` chose.

    Attributes:
        index: the option chosen per block.
        dual: damage saved per kept weight on the last hull segment the one-dual fill bought.
        steps: segments bought plus polishing moves.
        gap_bound: how far the total damage can lie above the optimum (0 when ``exact``).
        exact: the choice is proven optimal (the bounded search finished).
    """

    index: list[int]
    dual: float
    steps: int
    gap_bound: float
    exact: bool


def _hull_segments(kept: np.ndarray, dmg: np.ndarray) -> list[tuple[float, int, int]]:
    """(rate, a, b) per segment of the lower hull from option 0 with damage saved per weight >= 0."""
    hull = lower_hull(kept, dmg)
    out = []
    for a, b in zip(hull[:-1], hull[1:], strict=True):
        rate = (dmg[a] - dmg[b]) / (kept[b] - kept[a])
        if rate < 0:  # convex: every later segment adds damage too
            break
        out.append((float(rate), a, b))
    return out


def _relaxed_value(kept_v, dmg_v, segs, blocks) -> tuple[np.ndarray, np.ndarray]:
    """The convex relaxation's least damage of ``blocks`` as a function of their budget.

    Returns breakpoints ``(budget, damage)``: from every block at option 0, hull segments
    bought whole in order of damage saved per weight (a lower bound for whole options).
    """
    base_cost = sum(float(kept_v[i][0]) for i in blocks)
    base_val = sum(float(dmg_v[i][0]) for i in blocks)
    parts = sorted(((rate, float(kept_v[i][b] - kept_v[i][a])) for i in blocks for rate, a, b in segs[i]),
                   reverse=True)
    widths = np.array([w for _, w in parts])
    rates = np.array([r for r, _ in parts])
    costs = base_cost + np.concatenate([[0.0], np.cumsum(widths)])
    vals = base_val - np.concatenate([[0.0], np.cumsum(rates * widths)])
    return costs, vals


def _lower_bound(curve: tuple[np.ndarray, np.ndarray], budget: np.ndarray) -> np.ndarray:
    costs, vals = curve
    out = np.interp(budget, costs, vals)  # flat past the last segment: nothing more pays
    return np.where(budget >= costs[0] - 1e-9 * max(1.0, abs(costs[0])), out, np.inf)


def _exact_options(kept_v, dmg_v, segs, budget: float, incumbent: float, max_frontier: int):
    """Branch and bound over blocks: Pareto frontiers of (kept, damage), pruned by the relaxation.

    Returns the optimal index per block, or None when a frontier outgrows ``max_frontier``.
    """
    k = len(kept_v)
    rest = [_relaxed_value(kept_v, dmg_v, segs, range(i + 1, k)) if i + 1 < k else None for i in range(k)]
    slack = 1e-9 * max(1.0, abs(incumbent))
    cost, val = np.zeros(1), np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(k):
        c = (cost[:, None] + kept_v[i][None, :]).ravel()
        v = (val[:, None] + dmg_v[i][None, :]).ravel()
        parent, option = np.divmod(np.arange(c.size), kept_v[i].size)
        room = budget - c
        bound = v + (_lower_bound(rest[i], room) if rest[i] is not None else np.where(room >= 0, 0.0, np.inf))
        keep = bound <= incumbent + slack
        c, v, parent, option = c[keep], v[keep], parent[keep], option[keep]
        order = np.lexsort((v, c))  # by kept, then damage
        c, v, parent, option = c[order], v[order], parent[order], option[order]
        # Pareto: keep a point only when it has less damage than every point keeping fewer weights
        best_before = np.concatenate([[np.inf], np.minimum.accumulate(v)[:-1]])
        front = v < best_before
        cost, val = c[front], v[front]
        back.append((parent[front], option[front]))
        if cost.size == 0:
            return None  # only when float noise drops the incumbent itself
        if cost.size > max_frontier:
            return None
    at = int(np.argmin(val))
    index = [0] * k
    for i in range(k - 1, -1, -1):
        parent, option = back[i]
        index[i] = int(option[at])
        at = int(parent[at])
    return index


def solve_unit_options(
    kept: Sequence[Sequence[float]],
    damage: Sequence[Sequence[float]],
    budget: float,
    *,
    max_frontier: int = 200_000,
) -> UnitChoice:
    """Choose one option per block: least total damage with sum of kept <= budget.

    Each block lists its options in order of increasing ``kept`` (its units); option 0 of
    every block must fit together.

    1. The one-dual solve of :mod:`cwca_export.planning.curve_solver` on whole options: every block
       starts at option 0 and the segments of each block's lower convex hull in the
       (kept, damage) plane are bought in order of damage saved per kept weight, a segment
       that does not fit whole going as far as its options allow; moves between two blocks
       then polish what the hull's corners leave.
    2. That choice bounds an exact search: block by block, the Pareto frontier of
       (kept, damage) over the blocks so far, where a partial choice survives only while its
       damage plus the convex relaxation of the remaining blocks (a lower bound) does not
       exceed the polished choice. The relaxation usually leaves a handful of points, so the
       search is exact and fast; if a frontier outgrows ``max_frontier`` the polished choice
       is returned, with ``gap_bound`` = its damage minus the relaxation's (the most it can
       lie above the optimum).

    Example:
        >>> solve_unit_options([[1, 2, 3], [1, 2, 3]], [[4, 1, 0], [4, 2, 1.5]], 4).index
        [1, 1]
    """
    kept_v = [np.asarray(c, dtype=np.float64) for c in kept]
    dmg_v = [np.asarray(d, dtype=np.float64) for d in damage]
    k = len(kept_v)
    if k == 0 or any(c.ndim != 1 or c.size == 0 or c.shape != d.shape for c, d in zip(kept_v, dmg_v, strict=True)):
        raise ValueError("kept, damage: one non-empty list of options per block, of equal lengths")
    if any(np.any(np.diff(c) <= 0) for c in kept_v):
        raise ValueError("kept: each block's options must keep strictly more weights in turn")
    if not all(np.all(np.isfinite(d)) for d in dmg_v):
        raise ValueError("damage: contains NaN or inf")
    at = [0] * k
    room = float(budget) - sum(float(c[0]) for c in kept_v)
    if room < 0:
        raise ValueError("budget: the smallest option of every block does not fit")
    segs = [_hull_segments(kept_v[i], dmg_v[i]) for i in range(k)]
    segments = sorted(((-rate, i, a, b) for i in range(k) for rate, a, b in segs[i]))
    dual, steps = 0.0, 0
    for neg_rate, i, a, b in segments:
        if at[i] != a:  # an earlier segment of this block stopped short
            continue
        fits = int(np.searchsorted(kept_v[i], kept_v[i][a] + room, side="right")) - 1
        stop = min(b, fits)
        if stop <= a:
            continue
        room -= float(kept_v[i][stop] - kept_v[i][a])
        at[i] = stop
        dual, steps = -neg_rate, steps + 1
    at, polish = _polish_options(kept_v, dmg_v, at, room)
    objective = float(sum(d[j] for d, j in zip(dmg_v, at, strict=True)))
    exact = _exact_options(kept_v, dmg_v, segs, float(budget), objective, max_frontier)
    if exact is not None:
        better = float(sum(d[j] for d, j in zip(dmg_v, exact, strict=True)))
        if better < objective:
            at = exact
        return UnitChoice(at, float(dual), steps + polish, 0.0, True)
    relaxed = float(_lower_bound(_relaxed_value(kept_v, dmg_v, segs, range(k)), np.array(float(budget))))
    return UnitChoice(at, float(dual), steps + polish, max(0.0, objective - relaxed), False)


def _polish_options(kept_v, dmg_v, at, room, max_rounds: int = 1000) -> tuple[list[int], int]:
    """Best-improvement moves between two blocks until none lowers the total damage.

    A move lowers block i by any number of options and raises block j as far as the freed
    weights (plus the room left) allow, or raises j to any option and lowers i by the least
    that pays for it; growing one block alone into the room is a move too.
    """
    k = len(at)
    moves = 0
    for _ in range(max_rounds):
        best_gain, best = -1e-12, None
        for j in range(k):
            kj, dj, aj = kept_v[j], dmg_v[j], at[j]
            # j alone, into the room
            up = int(np.searchsorted(kj, kj[aj] + room, side="right")) - 1
            if up > aj:
                ups = np.arange(aj + 1, up + 1)
                gains = dj[ups] - dj[aj]
                t = int(np.argmin(gains))
                if gains[t] < best_gain:
                    best_gain, best = float(gains[t]), (None, 0, j, int(ups[t]))
            for i in range(k):
                if i == j or at[i] == 0:
                    continue
                ki, di, ai = kept_v[i], dmg_v[i], at[i]
                # (a) i down to each lower option, j up as far as that pays for
                lower = np.arange(ai)
                free = room + (ki[ai] - ki[lower])
                ups = np.searchsorted(kj, kj[aj] + free, side="right") - 1
                gains = (di[lower] - di[ai]) + (dj[ups] - dj[aj])
                gains[ups <= aj] = np.inf
                t = int(np.argmin(gains))
                if gains[t] < best_gain:
                    best_gain, best = float(gains[t]), (i, int(lower[t]), j, int(ups[t]))
                # (b) j up to each higher option, i down by the least that pays for it
                if aj + 1 < kj.size:
                    targets = np.arange(aj + 1, kj.size)
                    need = (kj[targets] - kj[aj]) - room  # weights i must free
                    # the highest option of i with ki[ai] - ki[opt] >= need
                    opts = np.searchsorted(ki, ki[ai] - need, side="right") - 1
                    ok = (opts >= 0) & (opts < ai)
                    if ok.any():
                        g = np.where(ok, (di[np.clip(opts, 0, ai)] - di[ai]) + (dj[targets] - dj[aj]), np.inf)
                        t = int(np.argmin(g))
                        if g[t] < best_gain:
                            best_gain, best = float(g[t]), (i, int(opts[t]), j, int(targets[t]))
        if best is None:
            break
        i, new_i, j, new_j = best
        if i is not None:
            room += float(kept_v[i][at[i]] - kept_v[i][new_i])
            at[i] = new_i
        room -= float(kept_v[j][new_j] - kept_v[j][at[j]])
        at[j] = new_j
        moves += 1
    return at, moves


def _bound_json(value: float | Sequence[float]) -> float | list[float]:
    return float(value) if np.ndim(value) == 0 else [float(v) for v in value]


def _unit_options(
    blocks: list, lo_v: np.ndarray, hi_v: np.ndarray, rank_step: int, curve: Any, n_params: Sequence[int]
) -> tuple[list[tuple[int, int]], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Each block's unit range, its whole units, the weights each keeps and the modelled damage of each."""
    ranges = [b.unit_range(lo_v[i], hi_v[i]) for i, b in enumerate(blocks)]
    for i, (u_lo, u_hi) in enumerate(ranges):
        if u_hi < u_lo:
            raise ValueError(
                f"block {i}: lo {lo_v[i]:g} / hi {hi_v[i]:g} leave no whole units at rank_step {rank_step}"
            )
    units = [np.arange(u_lo, u_hi + 1) for u_lo, u_hi in ranges]
    kept = [np.array([b.kept(e) for e in u], dtype=np.float64) for b, u in zip(blocks, units, strict=True)]
    modelled = []
    for i, (b, u) in enumerate(zip(blocks, units, strict=True)):
        d = curve(i, b.removed(u))
        d[kept[i] >= n_params[i]] = 0.0  # a block left dense is not damaged
        modelled.append(d)
    return ranges, units, kept, modelled


def plan_ranks_from_damage(
    scores: LayerScores,
    budget_fraction: float,
    *,
    shapes: Any,
    rank_step: int = 8,
    form: CurveForm = "piecewise",
    lo: float | Sequence[float] = 0.0,
    hi: float | Sequence[float] = 0.95,
    lo_blocks: Mapping[int, float] | None = None,
    hi_blocks: Mapping[int, float] | None = None,
) -> Plan:
    """Per-block ranks for ``lowrank`` / ``asvd`` at the least total measured damage.

    The curves (``damage`` scores with ``pruner=lowrank`` or ``asvd``) give D_k(p), the loss
    increase of factorising block k alone with a fraction p of each Linear's rank removed.
    ``compress`` gives every Linear of block k one rank r_k = e_k * rank_step (plan units
    e_k), and keeps dense any Linear that rank would not shrink. So block k at units e keeps

        kept_k(e) = sum_l min(r (m_l + n_l), m_l n_l),  r = e * rank_step,

    and the program is

        minimise sum_k D_k(p_k(e_k))  s.t.  sum_k kept_k(e_k) <= budget_fraction * sum_k n_k,

    with p_k(e) = max(0, 1 - e * rank_step / R_k), R_k = max_l min(m_l, n_l), integer units
    and D_k = 0 where the whole block stays dense. The budget is the fraction of the blocks'
    Linear weights kept (embeddings, norms and lm_head are not counted); it is never
    exceeded. Solved over whole units by :func:`solve_unit_options`: the one-dual fill of
    each block's lower convex hull of (kept, damage), polished, then proven optimal by a
    search bounded with the convex relaxation (``parameters["exact"]``; otherwise
    ``parameters["gap_bound"]`` bounds the distance to the optimum of the modelled damage).

    Approximations (the curve has one coordinate, compress one rank per block): a Linear with
    min(m, n) < R_k (GQA's k / v projections) was probed at rank (1 - p) min(m, n), and
    compress gives it the block's rank r or leaves it dense, which is never worse; a Linear
    left dense is still counted as damaged at p. Measured curves are therefore upper bounds
    where blocks are partly dense.

    Args:
        scores: from the ``damage`` estimator with ``pruner=lowrank`` or ``asvd``.
        budget_fraction: fraction of the blocks' weights kept, in (0, 1].
        shapes: the model (or a checkpoint folder) or ``linear_shapes(model)``: the
            ``(out, in)`` of every Linear per block (the scores do not record them).
        rank_step: rank of one plan unit (recorded in the plan; compress reads it there).
        form: ``"piecewise"`` (convex envelope of the probes) or ``"power"`` (a p^b fit).
        lo, hi, lo_blocks, hi_blocks: bounds on each block's rank-removal fraction p (hi 0.95:
            at least 5% of R_k kept); the plan's own lo / hi are in units.

    Example:
        >>> s = LayerScores("damage", zeta2=[0.1, 1.0], n_params=[4096, 4096],
        ...     settings={"pruner": "lowrank"},
        ...     stats={"damage@0.5": [0.1, 1.0], "damage@1": [0.4, 4.0]})
        >>> plan = plan_ranks_from_damage(s, 0.5, shapes=[[(64, 64)], [(64, 64)]], rank_step=4)
        >>> plan.x, plan.parameters["kept_params"]
        ([1.0, 7.0], 4096)
    """
    pruner = _rank_pruner(scores)
    points, damage = damage_curves(scores)
    blocks = _rank_blocks(scores, shapes, rank_step)
    k = scores.num_blocks
    lo_v = per_block_vector("lo", lo, k, lo_blocks)
    hi_v = per_block_vector("hi", hi, k, hi_blocks)
    if np.any(lo_v < 0) or np.any(hi_v > 1) or np.any(lo_v > hi_v):
        raise ValueError("lo, hi: need 0 <= lo <= hi <= 1 (fractions of each Linear's rank removed)")
    fraction = float(budget_fraction)
    if not (np.isfinite(fraction) and 0 < fraction <= 1):
        raise ValueError(f"budget_fraction {budget_fraction!r}: the fraction of block weights kept, in (0, 1]")
    curve = curve_function(points, damage, form=form)
    ranges, units, kept, modelled = _unit_options(blocks, lo_v, hi_v, rank_step, curve, scores.n_params)
    total = float(sum(scores.n_params))
    budget = fraction * total
    least = float(sum(c[0] for c in kept))
    if least > budget:
        raise ValueError(
            f"budget_fraction {fraction:g} is not reachable: with hi {float(hi_v.max()):g} (at most that"
            f" fraction of each block's rank removed) and rank_step {rank_step} the blocks keep at least"
            f" {least / total:.6g} of their weights; hint: raise the budget fraction or hi"
        )
    index, dual, steps, gap, exact = solve_unit_options(kept, modelled, budget)
    x = np.array([float(u[j]) for u, j in zip(units, index, strict=True)])
    kept_total = int(sum(c[j] for c, j in zip(kept, index, strict=True)))
    objective = float(sum(d[j] for d, j in zip(modelled, index, strict=True)))
    result = solver.SolverResult(x, dual, objective, steps, gap)
    cost_v = np.array([rank_step * sum(m + n for m, n in b.shapes) for b in blocks], dtype=np.float64)
    params = {
        "rule": "damage",
        "exact": exact,
        "gap_bound": gap,
        "budget_fraction": fraction,
        "rank_step": int(rank_step),
        "form": form,
        "pruner": pruner,
        "points": points.tolist(),
        "p_lo": float(lo_v.min()),
        "p_hi": float(hi_v.max()),
        "kept_params": kept_total,
        "kept_fraction": kept_total / total,
        "made_by": {
            "rule": "damage", "form": form, "lo": _bound_json(lo), "hi": _bound_json(hi),
            "lo_blocks": {str(i): float(v) for i, v in (lo_blocks or {}).items()},
            "hi_blocks": {str(i): float(v) for i, v in (hi_blocks or {}).items()},
            "scores": scores_snapshot(scores),
        },
    }
    lo_units = np.array([r[0] for r in ranges], dtype=np.float64)
    hi_units = np.array([r[1] for r in ranges], dtype=np.float64)
    return make_plan("allocate", scores, scores.qualities(), result, lo_units, hi_units, cost_v, params)


def plan_ranks_uniform(
    scores: LayerScores,
    budget_fraction: float,
    *,
    shapes: Any,
    rank_step: int = 8,
    lo: float = 0.0,
    hi: float = 0.95,
) -> Plan:
    """The uniform baseline: one rank-removal fraction p for every block, the least that fits.

    Each block gets e_k = clip(floor((1 - p) R_k / rank_step)) units, p chosen as small as the
    budget of :func:`plan_ranks_from_damage` allows (kept weights <= budget_fraction * sum n_k).
    Needs no damage curves (any scores give the blocks).

    Example:
        >>> s = LayerScores("gradnorm", zeta2=[1.0, 1.0], n_params=[4096, 4096])
        >>> plan_ranks_uniform(s, 0.5, shapes=[[(64, 64)], [(64, 64)]], rank_step=4).x
        [4.0, 4.0]
    """
    blocks = _rank_blocks(scores, shapes, rank_step)
    fraction = float(budget_fraction)
    if not (np.isfinite(fraction) and 0 < fraction <= 1):
        raise ValueError(f"budget_fraction {budget_fraction!r}: the fraction of block weights kept, in (0, 1]")
    ranges = [b.unit_range(lo, hi) for b in blocks]
    total = float(sum(scores.n_params))
    budget = fraction * total

    def units_at(keep: float) -> list[int]:  # keep = 1 - p
        return [int(np.clip(np.floor(keep * b.full_rank / b.rank_step + 1e-9), r[0], r[1]))
                for b, r in zip(blocks, ranges, strict=True)]

    def spent(e: list[int]) -> int:
        return sum(b.kept(u) for b, u in zip(blocks, e, strict=True))

    # every value of keep where some block's units change
    keeps = sorted({u * b.rank_step / b.full_rank for b, r in zip(blocks, ranges, strict=True)
                    for u in range(r[0], r[1] + 1)})
    best = units_at(0.0)
    if spent(best) > budget:
        raise ValueError(
            f"budget_fraction {fraction:g} is not reachable: with hi {hi:g} the blocks keep at least"
            f" {spent(best) / total:.6g} of their weights"
        )
    low, high = 0, len(keeps) - 1  # spent is non-decreasing in keep: bisect the last that fits
    while low <= high:
        mid = (low + high) // 2
        e = units_at(keeps[mid])
        if spent(e) <= budget:
            best, low = e, mid + 1
        else:
            high = mid - 1
    kept_total = spent(best)
    x = np.array(best, dtype=np.float64)
    result = solver.SolverResult(x, 0.0, 0.0, 0)
    cost_v = np.array([rank_step * sum(m + n for m, n in b.shapes) for b in blocks], dtype=np.float64)
    params = {
        "rule": "uniform",
        "budget_fraction": fraction,
        "rank_step": int(rank_step),
        "kept_params": kept_total,
        "kept_fraction": kept_total / total,
        "made_by": {"rule": "uniform", "lo": float(lo), "hi": float(hi), "scores": scores_snapshot(scores)},
    }
    return make_plan(
        "allocate", scores, scores.qualities(), result,
        np.array([r[0] for r in ranges], dtype=np.float64), np.array([r[1] for r in ranges], dtype=np.float64),
        cost_v, params,
    )
