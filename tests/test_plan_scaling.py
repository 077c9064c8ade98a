"""Plans move to a new target by the rule that made them; references are the rules called
afresh on the original scores."""

from __future__ import annotations

import numpy as np
import pytest

from cwca_export.planning.plan import Plan, plan_band, plan_by_rule, plan_from_damage, plan_pruning
from cwca_export.planning.plan_scaling import rescale_plan, target_of, target_range
from cwca_export.scores import LayerScores

N = [100, 200, 100, 300]
CURVES = {"damage@0.3": [0.01, 0.2, 0.05, 0.02], "damage@0.6": [0.05, 0.9, 0.3, 0.1],
          "damage@0.9": [0.3, 3.0, 1.5, 0.5]}


def _scores(method="damage"):
    return LayerScores(method, zeta2=[0.5, 3.0, 1.0, 0.7], n_params=N, block_names=[f"b.{i}" for i in range(4)],
                       stats=CURVES if method == "damage" else {}, settings={"pruner": "wanda"})


def test_damage_plan_is_re_solved_on_its_curves_with_its_bounds_and_band():
    s = _scores()
    plan = plan_by_rule(s, 0.6, rule="damage", band=0.2, hi=0.9, hi_blocks={1: 0.5})
    plan = Plan.from_dict(plan.to_dict())  # through JSON, as a budget search reads it
    moved = rescale_plan(plan, 0.4)
    reference = plan_from_damage(s, 0.4, lo=0.2, hi=0.6, hi_blocks={1: 0.5})  # band 0.2 around 0.4
    np.testing.assert_allclose(moved.x, reference.x, atol=1e-9)
    assert target_of(moved) == ("sparsity", 0.4) and moved.parameters["rescaled_from"]["rule"] == "damage"


def test_a_damage_plan_without_its_curves_is_refused_not_re_solved_by_another_rule():
    plan = plan_from_damage(_scores(), 0.5)  # made directly, records no scores snapshot
    with pytest.raises(ValueError, match="does not record the scores"):
        rescale_plan(plan, 0.3)


def test_band_plan_keeps_its_width_and_bounds():
    s = _scores("owl")
    plan = plan_by_rule(s, 0.5, rule="band", band=0.08, lo=0.1, hi=0.9, hi_blocks={0: 0.3})
    assert plan.x[0] <= 0.3 + 1e-12  # per-block bounds hold for the band rule
    moved = rescale_plan(Plan.from_dict(plan.to_dict()), 0.7)
    reference = plan_band(s, 0.7, width=0.08, lo=0.1, hi=0.9, hi_blocks={0: 0.3})
    np.testing.assert_allclose(moved.x, reference.x, atol=1e-9)
    assert moved.parameters["width"] == 0.08


def test_cwca_plan_keeps_its_program_settings():
    s = _scores("fisher")
    plan = plan_by_rule(s, 0.5, rule="cwca", kappa=0.5, psi="log", hi=0.8)
    moved = rescale_plan(Plan.from_dict(plan.to_dict()), 0.3)
    reference = plan_pruning(s, 0.3, kappa=0.5, psi="log", hi=0.8)
    np.testing.assert_allclose(moved.x, reference.x, atol=1e-9)


def test_refined_plan_restarts_from_its_rule_and_asks_to_be_refined_again():
    s = _scores()
    start = plan_by_rule(s, 0.5, rule="damage", hi=0.9)
    refined = Plan.from_dict({**start.to_dict(), "parameters": {
        **start.parameters, "refinement": {"method": "wanda", "forwards": 20, "start": "damage"}}})
    refined.x = [0.7, 0.2, 0.5, 0.6]  # what measured exchanges left
    moved = rescale_plan(refined, 0.3)
    np.testing.assert_allclose(moved.x, plan_from_damage(s, 0.3, hi=0.9).x, atol=1e-9)
    assert moved.parameters["refine_with"] == {"method": "wanda", "forwards": 20}
    assert "refinement" not in moved.parameters


def test_uniform_plans_stay_uniform_and_ranges_follow_bounds():
    s = _scores()
    from cwca_export.planning.refine import candidate_plans

    uniform = candidate_plans(s, 0.5, hi=0.8)["uniform"]
    assert rescale_plan(uniform, 0.25).x == [0.25] * 4
    plan = plan_by_rule(s, 0.5, rule="damage", hi=0.9, hi_blocks={1: 0.5})
    least, most = target_range(plan)
    assert least == 0.0 and most == pytest.approx((100 * 0.9 + 200 * 0.5 + 100 * 0.9 + 300 * 0.9) / 700)


def test_rank_plan_from_damage_moves_its_kept_fraction():
    from cwca_export.planning.rank_plans import plan_ranks_from_damage

    shapes = [[(64, 64)], [(64, 64)]]
    s = LayerScores("damage", zeta2=[0.1, 1.0], n_params=[4096, 4096], settings={"pruner": "lowrank"},
                    stats={"damage@0.5": [0.1, 1.0], "damage@1": [0.4, 4.0]})
    plan = plan_ranks_from_damage(s, 0.5, shapes=shapes, rank_step=4)
    moved = rescale_plan(Plan.from_dict(plan.to_dict()), 0.8, shapes=shapes)
    assert moved.x == plan_ranks_from_damage(s, 0.8, shapes=shapes, rank_step=4).x
    assert target_of(moved) == ("kept_fraction", 0.8)
    with pytest.raises(ValueError, match="shapes"):
        rescale_plan(plan, 0.8)
