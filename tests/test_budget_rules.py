"""Budgets keep how a plan was made, and refuse what ONNX Runtime cannot turn into savings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import save_tiny_model, tiny_model

import cwca_export
from cwca_export.blocks import find_blocks, model_fingerprint
from cwca_export.cli import cli
from cwca_export.planning.plan import Plan, plan_by_rule, plan_from_damage
from cwca_export.scores import LayerScores

WORKLOAD = ["--prompt-len", "8", "--context", "24", "--runs", "3", "--warmup", "1"]


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt"])
def test_a_budget_with_unstructured_sparsity_is_one_clear_error(tmp_path, method):
    model_dir = save_tiny_model("llama", tmp_path / "m")
    scores = LayerScores("gradnorm", zeta2=[1.0, 2.0], n_params=[b.n_params for b in find_blocks(tiny_model())])
    plan_by_rule(scores, 0.5, rule="cwca").save(tmp_path / "plan.json")
    r = CliRunner().invoke(cli, ["export", str(model_dir), "--plan", str(tmp_path / "plan.json"), "--method", method,
                                 "--max-disk", "1MB", "--out", str(tmp_path / "a")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    line = r.output.strip().splitlines()[-1]
    assert "dense" in line and "--method width" in line and "lowrank" in line and f"--method {method}" in line
    assert not (tmp_path / "a").exists()


def test_sparse_export_without_a_budget_says_the_effect_is_disk_only(tmp_path):
    model = tiny_model("llama")
    scores = LayerScores("gradnorm", zeta2=[1.0, 2.0], n_params=[b.n_params for b in find_blocks(model)])
    plan = plan_by_rule(scores, 0.5, rule="cwca")
    art = cwca_export.export(model, plan, tmp_path / "a", backend="onnx", method="magnitude",
                             budget=cwca_export.Budget(prompt_len=8, context=24), runs=3, warmup=1)
    (row,) = [r for r in art.manifest["savings"] if r["kind"] == "unstructured sparsity"]
    assert row["effect"] == "disk-only" and not (row["memory"] or row["latency"] or row["disk"])
    assert row["amount"] == pytest.approx(0.5, abs=0.05)


def _rank_scores(model):
    """Damage curves for ``model``'s blocks, carrying its fingerprint as scored ones do (export checks it)."""
    blocks = find_blocks(model)
    return LayerScores("damage", zeta2=[1.0, 3.0], n_params=[b.n_params for b in blocks],
                       block_names=[b.name for b in blocks], settings={"pruner": "lowrank"},
                       model={"fingerprint": model_fingerprint(model)},
                       stats={"damage@0.25": [0.01, 0.2], "damage@0.5": [0.05, 0.6], "damage@0.75": [0.2, 1.5],
                              "damage@1": [0.9, 4.0]})


def test_rank_plan_through_export_max_disk_moves_its_kept_fraction(tmp_path):
    """A rank plan from damage (no unit budget) through the CLI budget search: each level is the
    plan re-solved on its curves at a kept fraction, so the shipped plan equals that solve."""
    from cwca_export.planning.rank_plans import plan_ranks_from_damage

    overrides = {"hidden_size": 64, "intermediate_size": 256}
    model_dir = save_tiny_model("llama", tmp_path / "m", **overrides)
    model = tiny_model("llama", **overrides)
    scores = _rank_scores(model)
    plan = plan_ranks_from_damage(scores, 0.9, shapes=model, rank_step=4)
    plan.save(tmp_path / "ranks.json")
    dense_bytes = 4 * sum(p.numel() for p in model.parameters())
    r = CliRunner().invoke(cli, ["export", str(model_dir), "--backend", "onnx", "--plan", str(tmp_path / "ranks.json"),
                                 "--method", "lowrank", "--max-disk", str(int(0.6 * dense_bytes)),
                                 "--formats", "fp32", "--levels", "3", "--out", str(tmp_path / "a"), *WORKLOAD])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "a" / "cwca_manifest.json").read_text())
    search = manifest["budget"]["search"]
    assert search["knob"] == "kept fraction"
    chosen = search["chosen"]
    assert chosen["t"] > 0 and chosen["target"] < 0.9
    shipped = Plan.from_dict(manifest["plan"])
    expected = plan_ranks_from_damage(scores, chosen["target"], shapes=model, rank_step=4)
    assert shipped.x == expected.x and shipped.parameters["rule"] == "damage"
    assert manifest["disk_bytes"] <= int(0.6 * dense_bytes)


def test_damage_plan_in_a_budget_search_is_re_solved_on_its_curves(tmp_path):
    from cwca_export.budget import Budget
    from cwca_export.exporter.search import PlanKnob

    model = tiny_model("llama", num_hidden_layers=3)
    blocks = find_blocks(model)
    scores = LayerScores("damage", zeta2=[1.0, 3.0, 2.0], n_params=[b.n_params for b in blocks],
                         block_names=[b.name for b in blocks], settings={"pruner": "width"},
                         stats={"damage@0.3": [0.01, 0.3, 0.05], "damage@0.6": [0.05, 0.9, 0.2],
                                "damage@0.9": [0.3, 3.0, 0.9]})
    plan = plan_by_rule(scores, 0.5, rule="damage", hi=0.9, band=0.3)
    knob = PlanKnob(model, Plan.from_dict(plan.to_dict()), "width", {"multiple": 1, "importance": "magnitude"})
    _, plan_t = knob.make(0.5)
    target = knob.target(0.5)
    reference = plan_from_damage(scores, target, lo=max(0.0, target - 0.3), hi=min(0.9, target + 0.3))
    np.testing.assert_allclose(plan_t.x, reference.x, atol=1e-9)
    assert Budget(max_disk=10).has_limits


def test_fisher_estimate_prices_the_precision_program_and_the_winner_is_still_measured(tmp_path):
    import torch

    model = tiny_model("llama", hidden_size=64, intermediate_size=256)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    dense = 4 * sum(p.numel() for p in model.parameters())
    art = cwca_export.export(model, None, tmp_path / "a", backend="onnx", calibration=ids,
                             budget=cwca_export.Budget(max_disk=int(0.5 * dense), prompt_len=8, context=24),
                             precision_estimate="fisher", runs=3, warmup=1)
    search = art.manifest["budget"]["search"]
    assert search["precision_damage"]["estimator"] == "fisher"
    assert art.disk_bytes <= int(0.5 * dense) and search["chosen"]["calib_loss"] is not None
    assert art.manifest["postprocess"]["precision"]["groups"] == search["chosen"]["formats"]


def test_plan_knob_holds_one_compressed_copy_at_a_time():
    """The search's memory: the model plus one compressed copy, whatever levels it visits."""
    import gc
    import weakref

    from cwca_export.exporter.search import PlanKnob

    model = tiny_model("llama", num_hidden_layers=2)
    blocks = find_blocks(model)
    scores = LayerScores("gradnorm", zeta2=[1.0, 2.0], n_params=[b.n_params for b in blocks],
                         block_names=[b.name for b in blocks])
    plan = Plan.from_dict(plan_by_rule(scores, 0.3, rule="band", band=0.0).to_dict())
    knob = PlanKnob(model, plan, "width", {"multiple": 1, "importance": "magnitude"})
    alive = []
    for t in (0.25, 0.5, 0.75, 0.5):
        made, _ = knob.make(t)
        alive.append(weakref.ref(made))
        del made
    gc.collect()
    assert sum(r() is not None for r in alive) == 1
    width = [m.mlp.down_proj.in_features for m in knob.make(0.5)[0].model.layers]
    assert width == [m.mlp.down_proj.in_features for m in knob.make(0.5)[0].model.layers]  # same level: reused
    knob.forget()
    gc.collect()
    assert all(r() is None for r in alive)


def test_refined_rank_plan_is_refined_again_at_the_level_the_search_ships(tmp_path):
    """issue 11: refined plans are re-refined. A plan from `refine` through a byte budget: the
    shipped plan is refine_ranks run afresh at the chosen level's kept fraction (same method,
    forwards and calibration), not the closed form it started from, and no worse than that
    closed form on the measured whole-plan loss."""
    import torch

    from cwca_export.planning.plan_probe import RankPlanLoss
    from cwca_export.planning.rank_plans import plan_ranks_from_damage
    from cwca_export.planning.refine import refine_ranks

    model = tiny_model("llama", hidden_size=64, intermediate_size=256, num_hidden_layers=3)
    blocks = find_blocks(model)
    scores = LayerScores("damage", zeta2=[1.0, 3.0, 2.0], n_params=[b.n_params for b in blocks],
                         block_names=[b.name for b in blocks], settings={"pruner": "lowrank"},
                         model={"fingerprint": model_fingerprint(model)},
                         stats={"damage@0.25": [0.01, 0.2, 0.05], "damage@0.5": [0.05, 0.6, 0.2],
                                "damage@0.75": [0.2, 1.5, 0.6], "damage@1": [0.9, 4.0, 2.0]})
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    refined = refine_ranks(model, scores, 0.9, ids, method="lowrank", rank_step=4, max_evals=10, batch_size=8)
    forwards = refined.parameters["refinement"]["forwards"]
    dense = 4 * sum(p.numel() for p in model.parameters())
    art = cwca_export.export(model, Plan.from_dict(refined.to_dict()), tmp_path / "a", backend="onnx",
                             method="lowrank", calibration=ids, formats="fp32", levels=3,
                             budget=cwca_export.Budget(max_disk=int(0.6 * dense), prompt_len=8, context=24),
                             runs=3, warmup=1)
    search = art.manifest["budget"]["search"]
    chosen = search["chosen"]
    assert chosen["t"] > 0 and search["refined_levels"][f"{chosen['t']:g}"] == "refined"
    shipped = Plan.from_dict(art.manifest["plan"])
    assert shipped.parameters["refinement"]["forwards"] <= forwards
    reference = refine_ranks(model, scores, chosen["target"], ids, method="lowrank", rank_step=4,
                             max_evals=forwards, batch_size=8)
    assert shipped.x == reference.x
    closed_form = plan_ranks_from_damage(scores, chosen["target"], shapes=model, rank_step=4)
    measure = RankPlanLoss(model, ids, method="lowrank", rank_step=4, batch_size=8)
    try:
        assert measure(np.array(shipped.x)) <= measure(np.array(closed_form.x)) + 1e-6
    finally:
        measure.close()
    assert art.disk_bytes <= int(0.6 * dense)


def test_per_layer_plans_at_the_cap_are_predicted_within_it(tmp_path):
    """The precision program's byte budget leaves room for the graph bytes each quantized node adds
    (as the prediction counts them), so a plan solved for a cap is predicted within that cap, and
    the one solved for the limit is not discarded as over it (without the room: 770 B over here)."""
    import torch

    from cwca_export.budget import parse_size

    model = tiny_model("llama", hidden_size=64, intermediate_size=256, num_hidden_layers=8)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    dense = 4 * sum(p.numel() for p in model.parameters())
    limit = int(0.35 * dense)
    art = cwca_export.export(model, None, tmp_path / "a", backend="onnx", calibration=ids, rounding="rtn",
                             budget=cwca_export.Budget(max_disk=limit, prompt_len=8, context=24), runs=3, warmup=1)
    search = art.manifest["budget"]["search"]
    assert search["timings"]["node_overhead_bytes"] > 0
    planned = [c for c in search["candidates"] if c["storage"].startswith("planned for")]
    assert planned
    for c in planned:
        cap = parse_size(c["storage"].removeprefix("planned for ").replace(" ", ""))
        assert c["predicted"]["disk_bytes"] <= min(limit, cap + 8), c
