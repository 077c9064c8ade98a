"""PlanLoss against compressing a fresh copy with the public compress() and a full forward."""

from __future__ import annotations

import copy

import pytest
import torch
from compress_plans import make_plan
from helpers import tiny_model

from cwca_export.compression import compress
from cwca_export.planning.plan_probe import PlanLoss


def _reference_loss(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_plan_loss_equals_compressing_a_copy(method):
    model = tiny_model("llama", num_hidden_layers=3).eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure = PlanLoss(model, ids, method=method, batch_size=2)
    assert measure.dense_loss == pytest.approx(_reference_loss(model, ids), rel=1e-5)
    for rho in ([0.5, 0.2, 0.7], [0.3, 0.2, 0.0], [0.5, 0.2, 0.7]):  # revisits hit the cache
        dense = _dense_copy(model, before)
        expected = compress(dense, make_plan(dense, "prune", rho), method=method, data=ids, sequential=False)
        assert measure(rho) == pytest.approx(_reference_loss(expected, ids), rel=1e-5)
    assert measure.evaluations == 3
    measure.close()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def _dense_copy(model, state):
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(state)
    return fresh


def test_plan_loss_refuses_allocation_methods_and_wrong_lengths():
    model = tiny_model("llama", num_hidden_layers=2).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    with pytest.raises(ValueError, match="allocation"):
        PlanLoss(model, ids, method="lowrank")
    measure = PlanLoss(model, ids, method="magnitude")
    with pytest.raises(ValueError, match="2 blocks"):
        measure([0.5])


def test_refine_plan_on_a_tiny_model_beats_its_start_and_is_reproducible_by_compress():
    from cwca_export.planning.refine import refine_plan
    from cwca_export.scoring import score

    model = tiny_model("llama", num_hidden_layers=3).eval()
    ids = torch.randint(0, model.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    damage = score(model, ids, method="damage", options={"pruner": "magnitude"}, progress=False,
                   num_samples=6, seq_len=16)
    plan = refine_plan(model, damage, 0.5, ids, method="magnitude", max_evals=20)
    record = plan.parameters["refinement"]
    assert plan.global_sparsity == pytest.approx(0.5)
    assert record["forwards"] <= 20
    assert record["calib_loss"] <= min(record["candidates"].values()) + 1e-12
    assert record["candidates"]["uniform"] >= record["calib_loss"]
    dense = _dense_copy(model, before)
    pruned = compress(dense, plan, method="magnitude", data=ids, sequential=False)
    assert record["calib_loss"] == pytest.approx(_reference_loss(pruned, ids), rel=1e-5)
    for name, value in model.state_dict().items():  # the model comes back dense
        assert torch.equal(value, before[name]), name


def test_refine_cli_writes_a_plan_that_compress_accepts(tmp_path):
    from click.testing import CliRunner
    from helpers import sample_text, save_tiny_model

    from cwca_export.cli import cli
    from cwca_export.planning.plan import Plan

    model_dir = save_tiny_model("llama", tmp_path / "m", num_hidden_layers=3)
    text = tmp_path / "calib.txt"
    text.write_text(sample_text() * 4)
    runner = CliRunner()
    common = ["--data", str(text), "--samples", "4", "--seq-len", "16"]
    res = runner.invoke(cli, ["score", str(model_dir), *common, "--estimator", "damage", "--option", "pruner=magnitude",
                              "--out", str(tmp_path / "damage.json"), "--no-progress"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["refine", str(model_dir), "--scores", str(tmp_path / "damage.json"), "--sparsity", "0.5",
                              "--method", "magnitude", *common, "--max-evals", "12", "--out", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    assert "forwards" in res.output
    plan = Plan.load(tmp_path / "p.json")
    assert plan.global_sparsity == pytest.approx(0.5) and plan.parameters["refinement"]["forwards"] <= 12
    # a probe cache too small for one block: every miss prunes again, the plan is the same
    res = runner.invoke(cli, ["refine", str(model_dir), "--scores", str(tmp_path / "damage.json"), "--sparsity", "0.5",
                              "--method", "magnitude", *common, "--max-evals", "12", "--probe-cache", "1KiB",
                              "--out", str(tmp_path / "p1.json")])
    assert res.exit_code == 0, res.output
    small = Plan.load(tmp_path / "p1.json")
    assert small.x == plan.x
    assert small.parameters["refinement"]["calib_loss"] == plan.parameters["refinement"]["calib_loss"]
    res = runner.invoke(cli, ["refine", str(model_dir), "--scores", str(tmp_path / "damage.json"), "--sparsity", "0.5",
                              "--method", "magnitude", *common, "--probe-cache", "lots",
                              "--out", str(tmp_path / "b.json")])
    assert res.exit_code == 2 and "--probe-cache" in res.output and not (tmp_path / "b.json").exists()
    res = runner.invoke(cli, ["compress", str(model_dir), "--plan", str(tmp_path / "p.json"), "--method", "magnitude",
                              "--out", str(tmp_path / "small")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["refine", str(model_dir), "--scores", str(tmp_path / "damage.json"), "--sparsity", "0.5",
                              "--method", "magnitude", *common, "--max-evals", "3", "--out", str(tmp_path / "q.json")])
    assert res.exit_code == 1 and "--max-evals" in res.output and not (tmp_path / "q.json").exists()


def test_refine_cli_plans_ranks_and_refuses_mixed_knobs(tmp_path):
    from click.testing import CliRunner
    from helpers import sample_text, save_tiny_model

    from cwca_export.cli import cli
    from cwca_export.planning.plan import Plan

    model_dir = save_tiny_model("llama", tmp_path / "m", num_hidden_layers=3)
    text = tmp_path / "calib.txt"
    text.write_text(sample_text() * 4)
    runner = CliRunner()
    common = ["--data", str(text), "--samples", "4", "--seq-len", "16"]
    res = runner.invoke(cli, ["score", str(model_dir), *common, "--estimator", "damage", "--option", "pruner=lowrank",
                              "--out", str(tmp_path / "lr.json"), "--no-progress"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["refine", str(model_dir), "--scores", str(tmp_path / "lr.json"), "--method", "lowrank",
                              "--budget-fraction", "0.6", "--rank-step", "2", *common, "--max-evals", "10",
                              "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    plan = Plan.load(tmp_path / "r.json")
    assert plan.program == "allocate" and plan.parameters["kept_fraction"] <= 0.6
    res = runner.invoke(cli, ["refine", str(model_dir), "--scores", str(tmp_path / "lr.json"), "--method", "lowrank",
                              "--sparsity", "0.5", *common, "--out", str(tmp_path / "bad.json")])
    assert res.exit_code == 2 and "--budget-fraction" in res.output and not (tmp_path / "bad.json").exists()
    res = runner.invoke(cli, ["refine", str(model_dir), "--scores", str(tmp_path / "lr.json"), "--method", "lowrank",
                              "--budget-fraction", "0.6", "--probe-cache", "1GiB", *common,
                              "--out", str(tmp_path / "c.json")])
    assert res.exit_code == 2 and "--probe-cache" in res.output and not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_plan_loss_with_a_tiny_cache_gives_the_same_losses(method):
    model = tiny_model("llama", num_hidden_layers=3).eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    plans = [[0.5, 0.2, 0.7], [0.3, 0.2, 0.0], [0.5, 0.6, 0.7], [0.3, 0.2, 0.7], [0.5, 0.2, 0.7], [0.4, 0.4, 0.4]]
    capped = PlanLoss(model, ids, method=method, batch_size=2, max_cached=2)
    losses = []
    for rho in plans:
        losses.append(capped(rho))
        assert capped.cached <= 2
    misses = capped.cache_misses
    capped.close()
    uncapped = PlanLoss(model, ids, method=method, batch_size=2, max_cached=10_000)
    assert [uncapped(rho) for rho in plans] == losses  # exactly: a miss prunes the block again
    # the uncapped cache prunes each (block, ratio) once: 8 distinct nonzero pairs; the cap forced more
    assert uncapped.cache_misses == 8 and uncapped.cached == 8 and misses > 8
    uncapped.close()


def test_plan_loss_cache_budget_sets_the_cap():
    model = tiny_model("llama", num_hidden_layers=2).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    from cwca_export.blocks import find_blocks

    block = max(sum(m.weight.numel() * 4 for m in b.linears.values()) for b in find_blocks(model))
    assert PlanLoss(model, ids, method="magnitude", cache_bytes=3 * block + 1).max_cached == 3
    assert PlanLoss(model, ids, method="magnitude", cache_bytes=1).max_cached == 1
