"""Moving a plan to another global target by the rule that made it (docs/design.md 3.5).

A budget search, ``cwca-export plan`` and recipes change how much a plan compresses; what
must not change is *how* it distributes that amount. Each plan records its rule and what the
rule read (``parameters["made_by"]``: the rule's arguments and a snapshot of the scores), so:

- ``damage`` pruning plans are re-solved on their measured curves, with their bounds and band;
- ``band`` plans (OWL / LayerIF) keep their half-width and bounds;
- ``cwca`` plans re-solve the MDL program with the same eta, kappa, psi and bounds;
- ``uniform`` plans stay uniform;
- refined plans are re-solved from the rule their refinement started from; the measured
  refinement is not redone here (``parameters["refine_with"]`` names its method and forwards,
  for ``cwca-export refine`` to run again at the new target);
- rank plans move their kept fraction (``budget_fraction``) on their curves; allocation plans
  of the MDL program move their unit budget.

A plan that does not record its rule (written by hand or by an older version) is re-solved
with the program its parameters name, or refused when that would change its rule.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cwca_export.planning import solver
from cwca_export.planning.plan import Plan, plan_by_rule, scores_from_snapshot


def target_of(plan: Plan) -> tuple[str, float]:
    """``(name, value)`` of the global quantity the plan meets: sparsity, kept fraction or budget."""
    p = plan.parameters
    if plan.program == "prune":
        return "sparsity", float(p.get("sparsity", plan.global_sparsity))
    if "budget_fraction" in p:
        return "kept_fraction", float(p["budget_fraction"])
    if "budget" in p:
        return "budget", float(p["budget"])
    raise ValueError(
        "the allocation plan records neither a budget nor a kept fraction; hint: re-run"
        " `cwca-export plan --program allocate --budget N` or `--budget-fraction F`"
    )


def _blocks(made: dict[str, Any], key: str) -> dict[int, float]:
    return {int(i): float(v) for i, v in (made.get(key) or {}).items()}


def _rule(plan: Plan) -> str:
    made = plan.parameters.get("made_by") or {}
    return made.get("rule") or plan.parameters.get("rule") or "cwca"


def rescale_plan(plan: Plan, target: float, *, shapes: Any = None) -> Plan:
    """``plan`` re-made at ``target`` (a sparsity, kept fraction or unit budget: see
    :func:`target_of`) by its own rule. ``shapes`` (the model, or its Linear shapes) is needed
    for rank plans from measured damage.

    Example:
        >>> from cwca_export.scores import LayerScores
        >>> s = LayerScores("damage", zeta2=[0.1, 1.0], n_params=[100, 100],
        ...     stats={"damage@0.5": [0.1, 1.0], "damage@1": [0.4, 4.0]})
        >>> p = plan_by_rule(s, 0.5, rule="damage", hi=0.9)
        >>> [round(v, 3) for v in rescale_plan(p, 0.3).x]
        [0.6, 0.0]
    """
    kind, _ = target_of(plan)
    made = plan.parameters.get("made_by") or {}
    rule = _rule(plan)
    refinement = plan.parameters.get("refinement")
    if kind == "sparsity":
        new = _rescale_pruning(plan, float(target), rule, made)
    elif kind == "kept_fraction":
        new = _rescale_ranks(plan, float(target), rule, made, shapes)
    else:
        new = _rescale_allocation(plan, float(target))
    previous = {"target": target_of(plan)[1], "rule": rule, "refined": refinement is not None}
    new.parameters = {k: v for k, v in new.parameters.items() if k != "refinement"}
    new.parameters["rescaled_from"] = previous
    if refinement is not None:
        new.parameters["refine_with"] = {"method": refinement.get("method"), "forwards": refinement.get("forwards")}
    return new


def _rescale_pruning(plan: Plan, sparsity: float, rule: str, made: dict[str, Any]) -> Plan:
    k = plan.num_blocks
    if rule == "uniform":
        lo, hi = float(made.get("lo", min(plan.lo))), float(made.get("hi", max(plan.hi)))
        if not lo <= sparsity <= hi:
            raise ValueError(f"sparsity {sparsity:g} is outside the uniform plan's bounds [{lo:g}, {hi:g}]")
        return dataclasses.replace(plan, x=[sparsity] * k, parameters={**plan.parameters, "sparsity": sparsity})
    if made.get("scores"):
        scores = scores_from_snapshot(plan)
        return plan_by_rule(
            scores, sparsity, rule=rule, band=made.get("band"), lo=made.get("lo", 0.0), hi=made.get("hi", 0.95),
            lo_blocks=_blocks(made, "lo_blocks"), hi_blocks=_blocks(made, "hi_blocks"),
            form=made.get("form", "piecewise"), **(made.get("program") or {}),
        )
    if rule != "cwca":
        scores_from_snapshot(plan)  # raises: a damage or band plan cannot be re-solved without its scores
    kw = plan.parameters
    result = solver.solve_pruning(
        plan.q, plan.n_params, sparsity, eta=kw.get("eta", 2.0), kappa=kw.get("kappa", 1.0),
        lo=plan.lo, hi=plan.hi, psi=kw.get("psi", "quadratic"),
    )
    return _replace_solution(plan, result, {**kw, "sparsity": sparsity})


def _rescale_ranks(plan: Plan, fraction: float, rule: str, made: dict[str, Any], shapes: Any) -> Plan:
    from cwca_export.planning.rank_plans import plan_ranks_from_damage, plan_ranks_uniform

    if shapes is None:
        raise ValueError("a rank plan is re-solved on the model's Linear shapes; pass the model as shapes=")
    scores = scores_from_snapshot(plan)
    step = int(plan.parameters["rank_step"])
    if rule == "uniform":
        return plan_ranks_uniform(scores, fraction, shapes=shapes, rank_step=step, lo=made.get("lo", 0.0),
                                  hi=made.get("hi", 0.95))
    return plan_ranks_from_damage(
        scores, fraction, shapes=shapes, rank_step=step, form=made.get("form", "piecewise"),
        lo=made.get("lo", 0.0), hi=made.get("hi", 0.95),
        lo_blocks=_blocks(made, "lo_blocks"), hi_blocks=_blocks(made, "hi_blocks"),
    )


def _rescale_allocation(plan: Plan, budget: float) -> Plan:
    kw = plan.parameters
    result = solver.solve_allocation(
        plan.q, plan.cost, budget, gamma=kw.get("gamma", 0.9), beta=kw.get("beta", 2.0),
        alpha=kw.get("alpha", 0.5), lo=plan.lo, hi=plan.hi, integer=kw.get("integer", True),
    )
    return _replace_solution(plan, result, {**kw, "budget": budget})


def _replace_solution(plan: Plan, result: Any, params: dict[str, Any]) -> Plan:
    return dataclasses.replace(
        plan, x=[float(v) for v in result.x], parameters=params, dual=result.dual,
        objective=result.objective, iterations=result.iterations,
    )


def target_range(plan: Plan, shapes: Any = None) -> tuple[float, float]:
    """``(least, most)`` compression the plan's bounds allow, as targets of :func:`target_of`:
    sparsity from 0 to the upper bounds' weighted mean; kept fraction from 1 down to the least the
    lower unit bounds keep; unit budget from the plan's own down to the lower bounds' cost."""
    kind, value = target_of(plan)
    n = np.asarray(plan.n_params, dtype=np.float64)
    if kind == "sparsity":
        made = plan.parameters.get("made_by") or {}
        hi = np.array(np.broadcast_to(np.asarray(made.get("hi", plan.hi), dtype=np.float64), (plan.num_blocks,)))
        for i, v in _blocks(made, "hi_blocks").items():
            hi[i] = v
        return 0.0, float(n @ hi / n.sum())
    if kind == "kept_fraction":
        from cwca_export.planning.rank_plans import kept_parameters, linear_shapes

        if shapes is None:
            raise ValueError("a rank plan's range needs the model's Linear shapes; pass shapes=")
        per_block = shapes if isinstance(shapes, list) else linear_shapes(shapes)
        step = int(plan.parameters["rank_step"])
        least = sum(kept_parameters(b, int(u) * step) for b, u in zip(per_block, plan.lo, strict=True))
        return 1.0, float(least / n.sum())
    return value, float(np.asarray(plan.cost) @ np.asarray(plan.lo))
