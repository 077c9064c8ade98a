"""`Plan`: the per-block decision (pruning ratio rho_k or capacity units e_k) and how it was made.

NumPy only: plans are solved and re-solved from scores.json without touching a model.
`Plan.check(model)` imports the torch side lazily.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cwca_export.jsonio import check_versioned, read_versioned, warn_unknown, write_json_atomic
from cwca_export.planning import solver
from cwca_export.planning.curve_solver import CurveForm, solve_pruning_curves
from cwca_export.scores import DEFAULT_Q_FLOOR_TAU, LayerScores
from cwca_export.versions import library_versions

PLAN_SCHEMA_VERSION = 1
Program = Literal["prune", "allocate"]
_VALUE_NAME = {"prune": "rho", "allocate": "units"}


class PlanMismatchError(ValueError):
    """A plan that does not fit the model it is applied to."""


@dataclass
class Plan:
    """A solved per-block plan.

    Attributes:
        program: ``"prune"`` (x = rho_k, the fraction of block k's weights to remove) or
            ``"allocate"`` (x = e_k, capacity units: rank steps, experts, LoRA rank units).
        x: the per-block solution.
        q: the qualities the solver saw (floored, docs/design.md 2.1).
        n_params: prunable weights n_k per block, as scored (checked against the model).
        lo, hi: the per-block bounds used.
        cost: per-unit cost c_k (allocation only).
        block_names: module path of each block.
        parameters: program settings (target / budget, eta, kappa, psi, gamma, ...).
        dual, objective, iterations: the solver's result.
        scores: provenance of the scores (method, data hash, samples).
        model: provenance of the model (fingerprint, name_or_path, architecture).
        versions: library versions that wrote the plan.
    """

    program: Program
    x: list[float]
    q: list[float]
    n_params: list[int]
    lo: list[float]
    hi: list[float]
    block_names: list[str]
    cost: list[float] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dual: float = 0.0
    objective: float = 0.0
    iterations: int = 0
    scores: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    schema_version: int = PLAN_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.program not in _VALUE_NAME:
            raise ValueError(f"program: expected 'prune' or 'allocate', got {self.program!r}")
        k = len(self.x)
        for name in ("q", "n_params", "lo", "hi", "block_names"):
            if len(getattr(self, name)) != k:
                raise ValueError(f"Plan: {name} has {len(getattr(self, name))} entries, x has {k}")
        if self.cost is not None and len(self.cost) != k:
            raise ValueError(f"Plan: cost has {len(self.cost)} entries, x has {k}")

    @property
    def num_blocks(self) -> int:
        return len(self.x)

    @property
    def global_sparsity(self) -> float:
        """sum n_k rho_k / sum n_k (pruning plans)."""
        if self.program != "prune":
            raise ValueError("global_sparsity: only pruning plans have one")
        n = np.asarray(self.n_params, dtype=np.float64)
        return float(n @ np.asarray(self.x) / n.sum())

    # ---------------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        value = _VALUE_NAME[self.program]
        blocks = []
        for i in range(self.num_blocks):
            row = {
                "index": i,
                "name": self.block_names[i],
                "n_params": self.n_params[i],
                "q": self.q[i],
                value: self.x[i],
                "lo": self.lo[i],
                "hi": _json_float(self.hi[i]),
            }
            if self.cost is not None:
                row["cost"] = self.cost[i]
            blocks.append(row)
        return {
            "_type": "Plan",
            "schema_version": self.schema_version,
            "program": self.program,
            "parameters": self.parameters,
            "solver": {"dual": self.dual, "objective": self.objective, "iterations": self.iterations},
            "blocks": blocks,
            "scores": self.scores,
            "model": self.model,
            "versions": self.versions,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "input") -> Plan:
        data = check_versioned(data, "Plan", PLAN_SCHEMA_VERSION, source=source)
        known = {"_type", "schema_version", "program", "parameters", "solver", "blocks"}
        known |= {"scores", "model", "versions"}
        warn_unknown(data, known, "Plan")
        program = data.get("program")
        if program not in _VALUE_NAME:
            raise ValueError(f"{source}: program must be 'prune' or 'allocate', got {program!r}")
        value = _VALUE_NAME[program]
        try:
            rows = sorted(data["blocks"], key=lambda r: r["index"])
            columns = {
                key: [row[key] for row in rows]
                for key in ("name", "n_params", "q", value, "lo", "hi")
            }
            cost = [row["cost"] for row in rows] if program == "allocate" else None
            sol = data.get("solver", {})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{source}: plan blocks are incomplete (missing {exc})") from None
        if not rows:
            raise ValueError(f"{source}: plan has no blocks")
        try:
            return cls._from_columns(data, program, value, columns, cost, sol)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: plan values are damaged ({exc})") from None

    @classmethod
    def _from_columns(cls, data, program, value, columns, cost, sol) -> Plan:
        return cls(
            program=program,
            x=[float(v) for v in columns[value]],
            q=[float(v) for v in columns["q"]],
            n_params=[int(v) for v in columns["n_params"]],
            lo=[float(v) for v in columns["lo"]],
            hi=[float(v) for v in columns["hi"]],
            block_names=list(columns["name"]),
            cost=None if cost is None else [float(v) for v in cost],
            parameters=dict(data.get("parameters", {})),
            dual=float(sol.get("dual", 0.0)),
            objective=float(sol.get("objective", 0.0)),
            iterations=int(sol.get("iterations", 0)),
            scores=dict(data.get("scores", {})),
            model=dict(data.get("model", {})),
            versions=dict(data.get("versions", {})),
            schema_version=data["schema_version"],
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write plan.json atomically."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read plan.json; a plan whose values leave their own bounds is refused."""
        plan = cls.from_dict(read_versioned(path, "Plan", PLAN_SCHEMA_VERSION), source=str(path))
        plan.check_bounds(str(path))
        return plan

    # ---------------------------------------------------------------- fit to a model

    def check(self, model: Any, *, fingerprint: bool = True, require_fingerprint: bool = False) -> None:
        """Raise PlanMismatchError unless this plan was made for ``model``'s blocks.

        Compares the block count, each block's prunable weights n_k and, when both sides
        have one and ``fingerprint`` is set, the model fingerprint. ``require_fingerprint``
        also refuses a plan that carries none (the CLI's default: a plan file of unknown
        origin is applied only with ``--no-fingerprint``).
        """
        from cwca_export.blocks import find_blocks, model_fingerprint

        blocks = find_blocks(model)
        if len(blocks) != self.num_blocks:
            raise PlanMismatchError(
                f"plan has {self.num_blocks} blocks but the model has {len(blocks)};"
                " hint: re-run `cwca-export score` on this model, then `cwca-export plan`"
            )
        for block, n_plan in zip(blocks, self.n_params, strict=True):
            if block.n_params != n_plan:
                raise PlanMismatchError(
                    f"{block.name}: plan expects {n_plan} prunable weights, the model has"
                    f" {block.n_params}; hint: the plan was made for another model: re-run"
                    " `cwca-export score` on this one"
                )
        expected = self.model.get("fingerprint")
        if fingerprint and expected:
            actual = model_fingerprint(model)
            made_in = self.model.get("dtype")
            loaded = str(next(model.parameters()).dtype).removeprefix("torch.")
            if actual != expected and made_in and made_in != loaded:
                raise PlanMismatchError(
                    f"model fingerprint {actual} differs from the plan's {expected}: the plan was made on"
                    f" {made_in} weights and the model is loaded as {loaded}; hint: pass --dtype {made_in},"
                    " or --no-fingerprint to apply anyway"
                )
            if actual != expected:
                raise PlanMismatchError(
                    f"model fingerprint {actual} differs from the plan's {expected}: same shapes,"
                    " other weights; hint: re-score this model, or pass --no-fingerprint to apply anyway"
                )
        elif require_fingerprint and not expected:
            raise PlanMismatchError(
                "the plan carries no model fingerprint, so nothing shows it was made for this model;"
                " hint: make it with `cwca-export plan` from scores of this model, or pass --no-fingerprint"
            )

    def check_bounds(self, source: str = "plan") -> None:
        """Raise ValueError unless every value lies within its own bounds (lo <= x <= hi).

        A plan file is data the user can edit: a value outside its recorded bounds, a
        non-finite value or a pruning ratio outside [0, 1) is refused before any model loads.
        """
        tol = 1e-6
        for i in range(self.num_blocks):
            x, lo, hi = self.x[i], self.lo[i], self.hi[i]
            name = f"{source}: block {i} ({self.block_names[i]})"
            if not (np.isfinite(x) and np.isfinite(lo)) or np.isnan(hi):
                raise ValueError(f"{name}: non-finite value or bound (x {x}, lo {lo}, hi {hi}); the plan is damaged")
            if lo > hi:
                raise ValueError(f"{name}: lo {lo} > hi {hi}; hint: re-make the plan with `cwca-export plan --lo/--hi`")
            if not lo - tol <= x <= hi + tol:
                raise ValueError(
                    f"{name}: {_VALUE_NAME[self.program]} {x} is outside its own bounds [{lo}, {hi}];"
                    " hint: re-make the plan with `cwca-export plan --lo/--hi` instead of editing it"
                )
            if self.program == "prune" and not 0.0 <= x < 1.0:
                raise ValueError(f"{name}: rho {x} is not in [0, 1); hint: re-make it with `cwca-export plan --hi`")
            if self.program == "allocate" and x < 0:
                raise ValueError(f"{name}: units {x} < 0; hint: re-make it with `cwca-export plan --lo`")
            if self.n_params[i] <= 0:
                raise ValueError(f"{name}: n_params {self.n_params[i]} must be > 0; the plan is damaged")


def _json_float(v: float) -> float | str:
    return "inf" if v == np.inf else v


def per_block_vector(
    name: str, value: float | Sequence[float], k: int, overrides: Mapping[int, float] | None
) -> np.ndarray:
    """``value`` broadcast to one entry per block, with ``overrides`` (block index -> value) applied."""
    arr = np.array(np.broadcast_to(np.asarray(value, dtype=np.float64), (k,)))
    for index, v in (overrides or {}).items():
        if not -k <= index < k:
            raise ValueError(
                f"{name}: block {index} does not exist (the model has {k} blocks, counted from 0); hint: fix --bounds"
            )
        arr[index] = v
    return arr


def plan_pruning(
    scores: LayerScores,
    sparsity: float,
    *,
    eta: float = 2.0,
    kappa: float = 1.0,
    lo: float | Sequence[float] = 0.0,
    hi: float | Sequence[float] = 0.95,
    lo_blocks: Mapping[int, float] | None = None,
    hi_blocks: Mapping[int, float] | None = None,
    psi: solver.Psi = "quadratic",
    tau: float = DEFAULT_Q_FLOOR_TAU,
) -> Plan:
    """Solve the pruning program (docs/design.md 2.2) for a global sparsity.

    Args:
        scores: per-block scores; their floored qualities drive the plan.
        sparsity: global fraction of the blocks' prunable weights to remove.
        eta, kappa, psi: the program's cost eta q^kappa psi(rho).
        lo, hi: bounds on every block's rho; ``lo_blocks`` / ``hi_blocks`` override single
            blocks (e.g. ``hi_blocks={0: 0.3}`` protects the first block).
        tau: the quality floor of docs/design.md 2.1.

    Example:
        >>> s = LayerScores("gradnorm", zeta2=[3.0, 1.0, 1.0], n_params=[100, 100, 100])
        >>> [round(r, 3) for r in plan_pruning(s, 0.5).x]
        [0.214, 0.643, 0.643]
    """
    q = scores.qualities(tau)
    k = scores.num_blocks
    lo_v = per_block_vector("lo", lo, k, lo_blocks)
    hi_v = per_block_vector("hi", hi, k, hi_blocks)
    result = solver.solve_pruning(q, scores.n_params, sparsity, eta=eta, kappa=kappa, lo=lo_v, hi=hi_v, psi=psi)
    params = {"sparsity": sparsity, "rule": "cwca", "eta": eta, "kappa": kappa, "psi": psi, "tau": tau}
    return make_plan("prune", scores, q, result, lo_v, hi_v, None, params)


def plan_allocation(
    scores: LayerScores,
    budget: float,
    *,
    cost: float | Sequence[float] = 1.0,
    gamma: float = 0.9,
    beta: float = 2.0,
    alpha: float | Sequence[float] = 0.5,
    lo: float | Sequence[float] = 0.0,
    hi: float | Sequence[float] = np.inf,
    lo_blocks: Mapping[int, float] | None = None,
    hi_blocks: Mapping[int, float] | None = None,
    integer: bool = True,
    tau: float = DEFAULT_Q_FLOOR_TAU,
) -> Plan:
    """Solve the capacity allocation program (docs/design.md 2.3) for a total budget.

    Args:
        scores: per-block scores; their floored qualities drive the plan.
        budget: total cost, sum_k cost_k e_k <= budget.
        cost: cost of one unit per block (1 = count units; pass e.g. rank-step parameters).
        gamma, beta, alpha: value gamma q^beta log(1 + e) - alpha e per block.
        lo, hi, lo_blocks, hi_blocks: bounds on units, as in :func:`plan_pruning`.
        integer: whole units (ranks, experts); the default.
        tau: the quality floor of docs/design.md 2.1.

    Example:
        >>> s = LayerScores("gradnorm", zeta2=[3.0, 1.0], n_params=[100, 100])
        >>> plan_allocation(s, 4, gamma=20, beta=1).x
        [3.0, 1.0]
    """
    q = scores.qualities(tau)
    k = scores.num_blocks
    lo_v = per_block_vector("lo", lo, k, lo_blocks)
    hi_v = per_block_vector("hi", hi, k, hi_blocks)
    cost_v = per_block_vector("cost", cost, k, None)
    result = solver.solve_allocation(
        q, cost_v, budget, gamma=gamma, beta=beta, alpha=alpha, lo=lo_v, hi=hi_v, integer=integer
    )
    alpha_out = alpha if np.ndim(alpha) == 0 else [float(a) for a in alpha]
    params = {
        "budget": budget,
        "gamma": gamma,
        "beta": beta,
        "alpha": alpha_out,
        "integer": integer,
        "tau": tau,
        "gap_bound": result.gap_bound,
    }
    return make_plan("allocate", scores, q, result, lo_v, hi_v, cost_v, params)


DAMAGE_PREFIX = "damage@"  # the stats key of a measured damage curve's probe: damage@0.5


def has_damage_curves(scores: LayerScores) -> bool:
    """Whether the scores hold measured damage curves (the ``damage`` estimator's stats)."""
    return any(name.startswith(DAMAGE_PREFIX) for name in scores.stats)


def damage_pruner(scores: LayerScores) -> str | None:
    """The compression method the damage curves were measured with (None if not recorded)."""
    settings = scores.settings
    return settings.get("pruner") or settings.get("options", {}).get("pruner")


def damage_curves(scores: LayerScores) -> tuple[np.ndarray, np.ndarray]:
    """The measured damage curves a ``damage`` scores file holds: ``(points, damage[K, P])``.

    Raises:
        ValueError: the scores hold no ``damage@RATIO`` statistics (another estimator).
    """
    found = sorted(
        (float(name.removeprefix(DAMAGE_PREFIX)), name) for name in scores.stats if name.startswith(DAMAGE_PREFIX)
    )
    if not found:
        raise ValueError(
            f"scores from method {scores.method!r} hold no measured damage curves;"
            " hint: cwca-export score MODEL --data FILE --estimator damage"
        )
    points = np.array([p for p, _ in found])
    damage = np.array([scores.stats[name] for _, name in found], dtype=np.float64).T
    return points, damage


def plan_from_damage(
    scores: LayerScores,
    sparsity: float,
    *,
    form: CurveForm = "piecewise",
    lo: float | Sequence[float] = 0.0,
    hi: float | Sequence[float] = 0.95,
    lo_blocks: Mapping[int, float] | None = None,
    hi_blocks: Mapping[int, float] | None = None,
) -> Plan:
    """Minimise the total measured single-block damage at a global sparsity (one dual).

    Each block keeps its own measured curve (see :mod:`cwca_export.planning.curve_solver`) instead of
    the common psi of :func:`plan_pruning`.

    Args:
        scores: written by the ``damage`` estimator (``damage@RATIO`` statistics per block).
        sparsity: global fraction of the blocks' prunable weights to remove.
        form: ``"piecewise"`` (convex envelope of the probes) or ``"power"`` (a rho^b fit).
        lo, hi, lo_blocks, hi_blocks: bounds, as in :func:`plan_pruning`.

    Example:
        >>> s = LayerScores("damage", zeta2=[0.1, 1.0], n_params=[100, 100],
        ...     stats={"damage@0.5": [0.1, 1.0], "damage@1": [0.4, 4.0]})
        >>> plan_from_damage(s, 0.5, hi=0.75).x
        [0.75, 0.25]
    """
    points, damage = damage_curves(scores)
    k = scores.num_blocks
    lo_v = per_block_vector("lo", lo, k, lo_blocks)
    hi_v = per_block_vector("hi", hi, k, hi_blocks)
    result = solve_pruning_curves(points, damage, scores.n_params, sparsity, lo=lo_v, hi=hi_v, form=form)
    params = {"sparsity": sparsity, "rule": "damage", "form": form, "points": points.tolist()}
    return make_plan("prune", scores, scores.qualities(), result, lo_v, hi_v, None, params)


def plan_band(
    scores: LayerScores,
    sparsity: float,
    *,
    width: float,
    lo: float = 0.0,
    hi: float = 1.0,
    lo_blocks: Mapping[int, float] | None = None,
    hi_blocks: Mapping[int, float] | None = None,
) -> Plan:
    """The heuristics' linear map: scores min-max scaled into ratios in [S - width, S + width].

    The highest-scoring block gets S - width, the lowest S + width, then one offset (found by
    bisection, so clipping to [lo, hi] keeps the target) makes the weighted mean exactly S.
    ``lo_blocks`` / ``hi_blocks`` override single blocks' bounds, as in :func:`plan_pruning`:
    a capped block is clipped and the others absorb the difference.
    OWL (``owl`` scores, width = lambda = 0.08) and LayerIF (``layerif`` scores, its min-max
    map with epsilon = width) are this rule.

    Example:
        >>> s = LayerScores("owl", zeta2=[3.0, 2.0, 1.0], n_params=[10, 10, 10])
        >>> [round(r, 3) for r in plan_band(s, 0.5, width=0.08).x]
        [0.42, 0.5, 0.58]
    """
    if not (np.isfinite(width) and width >= 0):
        raise ValueError(f"width: the band half-width must be a finite number >= 0, got {width!r}")
    if not 0 <= lo <= sparsity <= hi <= 1:
        raise ValueError(f"sparsity {sparsity:g}: needs lo <= sparsity <= hi within [0, 1] (lo {lo:g}, hi {hi:g})")
    z = np.asarray(scores.zeta2, dtype=np.float64)
    n = np.asarray(scores.n_params, dtype=np.float64)
    k = z.size
    lo_v = per_block_vector("lo", lo, k, lo_blocks)
    hi_v = per_block_vector("hi", hi, k, hi_blocks)
    if np.any(lo_v > hi_v) or not (n @ lo_v <= sparsity * n.sum() <= n @ hi_v):
        raise ValueError(
            f"sparsity {sparsity:g}: the per-block bounds allow only"
            f" [{n @ lo_v / n.sum():.4g}, {n @ hi_v / n.sum():.4g}]; hint: loosen --bounds, --lo or --hi"
        )
    span = z.max() - z.min()
    unit = (z - z.min()) / span if span > 0 else np.full(z.size, 0.5)
    raw = sparsity + width * (1.0 - 2.0 * unit)
    need = sparsity * n.sum()

    def excess(offset: float) -> float:
        return float(n @ np.clip(raw + offset, lo_v, hi_v) - need)

    a, b = -1.0 - width, 1.0 + width  # excess(a) <= 0 <= excess(b)
    for _ in range(200):
        m = 0.5 * (a + b)
        if excess(m) < 0:
            a = m
        else:
            b = m
    rho = np.clip(raw + 0.5 * (a + b), lo_v, hi_v)
    result = solver.SolverResult(rho, 0.5 * (a + b), 0.0, 200)  # a rule, not a program: no objective
    params = {"sparsity": sparsity, "rule": "band", "width": width}
    return make_plan("prune", scores, scores.qualities(), result, lo_v, hi_v, None, params)


def plan_by_rule(
    scores: LayerScores,
    sparsity: float,
    *,
    rule: str = "auto",
    band: float | None = None,
    lo: float = 0.0,
    hi: float = 0.95,
    lo_blocks: Mapping[int, float] | None = None,
    hi_blocks: Mapping[int, float] | None = None,
    form: CurveForm = "piecewise",
    **program: Any,
) -> Plan:
    """A pruning plan by rule name, as ``cwca-export plan`` and recipes choose it.

    Args:
        rule: ``cwca`` (:func:`plan_pruning`), ``damage`` (:func:`plan_from_damage`), ``band``
            (:func:`plan_band` with half-width ``band``), or ``auto``: damage when the
            scores hold measured curves, else cwca.
        band: for cwca and damage, keeps every block within [S - band, S + band].
        lo, hi, lo_blocks, hi_blocks: bounds; form: the damage curves' model.
        **program: the MDL program's settings for cwca (``eta``, ``kappa``, ``psi``, ``tau``).

    Example:
        >>> s = LayerScores("gradnorm", zeta2=[3.0, 1.0, 1.0], n_params=[100, 100, 100])
        >>> [round(r, 3) for r in plan_by_rule(s, 0.5, band=0.1).x]
        [0.4, 0.55, 0.55]
    """
    if rule == "auto":
        rule = "damage" if has_damage_curves(scores) else "cwca"
    made = {
        "rule": rule, "band": band, "lo": lo, "hi": hi, "form": form,
        "lo_blocks": {str(i): float(v) for i, v in (lo_blocks or {}).items()},
        "hi_blocks": {str(i): float(v) for i, v in (hi_blocks or {}).items()},
        "program": dict(program),
    }
    if rule == "band":
        if band is None:
            raise ValueError("rule band needs a half-width; hint: --band 0.08 (OWL) or 0.3 (LayerIF)")
        plan = plan_band(scores, sparsity, width=band, lo=lo, hi=hi, lo_blocks=lo_blocks, hi_blocks=hi_blocks)
    elif rule in ("damage", "cwca"):
        if band is not None:
            lo, hi = max(lo, sparsity - band), min(hi, sparsity + band)
        bounds = dict(lo=lo, hi=hi, lo_blocks=lo_blocks, hi_blocks=hi_blocks)
        if rule == "damage":
            plan = plan_from_damage(scores, sparsity, form=form, **bounds)
        else:
            plan = plan_pruning(scores, sparsity, **program, **bounds)
    else:
        raise ValueError(f"rule {rule!r}: choose auto, cwca, damage or band")
    plan.parameters["made_by"] = {**made, "scores": scores_snapshot(scores)}
    return plan


def scores_snapshot(scores: LayerScores) -> dict[str, Any]:
    """What a rule reads from its scores, kept in the plan so it can be re-solved at another
    target without the scores file (docs/design.md 3.5): gains, damage curves, the pruner."""
    return {
        "method": scores.method,
        "zeta2": [float(v) for v in scores.zeta2],
        "stats": {k: [float(v) for v in vals] for k, vals in scores.stats.items() if k.startswith(DAMAGE_PREFIX)},
        "settings": {k: scores.settings[k] for k in ("pruner", "options") if k in scores.settings},
    }


def scores_from_snapshot(plan: Plan) -> LayerScores:
    """The :class:`LayerScores` a plan was made from, rebuilt from its snapshot."""
    made = plan.parameters.get("made_by") or {}
    snap = made.get("scores")
    if not snap:
        raise ValueError(
            "the plan does not record the scores it was made from (made before this version, or by"
            " hand); hint: re-run `cwca-export plan SCORES ...` to write a plan that can be re-solved"
        )
    return LayerScores(
        snap["method"], zeta2=list(snap["zeta2"]), n_params=list(plan.n_params),
        block_names=list(plan.block_names), stats=dict(snap["stats"]), settings=dict(snap["settings"]),
        model=dict(plan.model),
    )


def make_plan(program, scores, q, result, lo_v, hi_v, cost_v, params) -> Plan:
    """A `Plan` from a solver result and the per-block vectors it was solved with."""
    return Plan(
        program=program,
        x=[float(v) for v in result.x],
        q=[float(v) for v in q],
        n_params=list(scores.n_params),
        lo=[float(v) for v in lo_v],
        hi=[float(v) for v in hi_v],
        block_names=list(scores.block_names),
        cost=None if cost_v is None else [float(v) for v in cost_v],
        parameters=params,
        dual=result.dual,
        objective=result.objective,
        iterations=result.iterations,
        scores={
            "method": scores.method,
            "data_hash": scores.data_hash,
            "samples": scores.samples,
            "tokens": scores.tokens,
        },
        model=dict(scores.model),
        versions=library_versions(),
    )


# ---------------------------------------------------------------- rank plans from measured damage

RankShapes = Sequence[Sequence[tuple[int, int]]]
