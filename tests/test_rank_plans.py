"""Rank plans from measured low-rank damage: the kept-weight budget, the exact solve, whole-plan losses, refinement."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from compress_plans import make_plan
from helpers import tiny_model
from torch import nn

from cwca_export.blocks import find_blocks
from cwca_export.compression import compress
from cwca_export.planning.curve_solver import curve_value
from cwca_export.planning.plan_probe import RankPlanLoss
from cwca_export.planning.rank_plans import (
    kept_parameters,
    linear_shapes,
    plan_ranks_from_damage,
    plan_ranks_uniform,
    solve_unit_options,
)
from cwca_export.planning.refine import refine_ranks, refine_unit_exchange
from cwca_export.scores import LayerScores

POINTS = [0.25, 0.5, 0.75, 0.9]


def _reference_loss(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def _block_weights(model) -> list[int]:
    """Weights of every nn.Linear inside each block (factor pairs included), counted afresh."""
    return [
        sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear)) for layer in model.model.layers
    ]


def _curves(n_params, damage, *, pruner="lowrank", names=None) -> LayerScores:
    damage = np.asarray(damage, dtype=np.float64)
    return LayerScores(
        "damage", zeta2=list(damage[:, 1]), n_params=list(n_params), block_names=names or [],
        settings={"pruner": pruner, "points": POINTS},
        stats={f"damage@{p:g}": list(damage[:, j]) for j, p in enumerate(POINTS)},
    )


def _tiny_scores(model, seed=0) -> LayerScores:
    blocks = find_blocks(model)
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.2, 2.0, len(blocks))
    b = rng.uniform(1.5, 4.0, len(blocks))
    damage = a[:, None] * np.asarray(POINTS)[None, :] ** b[:, None]
    return _curves([blk.n_params for blk in blocks], damage, names=[blk.name for blk in blocks])


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_hidden_layers=3).eval()  # GQA: k / v are (16, 32)


@pytest.fixture(scope="module")
def ids(model):
    return torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- the budget


@pytest.mark.parametrize("units", [[1, 2, 3], [4, 5, 6], [2, 6, 1]])
def test_kept_parameters_count_what_compress_keeps(model, units):
    shapes = linear_shapes(model)
    work = compress(copy.deepcopy(model), make_plan(model, "allocate", units, rank_step=4), method="lowrank")
    assert _block_weights(work) == [kept_parameters(s, u * 4) for s, u in zip(shapes, units, strict=True)]
    assert _block_weights(model) == [b.n_params for b in find_blocks(model)]


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7, 0.9])
def test_the_kept_weight_budget_holds_on_the_compressed_model(model, fraction):
    scores = _tiny_scores(model)
    plan = plan_ranks_from_damage(scores, fraction, shapes=model, rank_step=4)
    budget = fraction * sum(scores.n_params)
    assert plan.program == "allocate" and plan.parameters["rank_step"] == 4
    assert plan.parameters["rule"] == "damage" and plan.parameters["exact"] is True
    assert all(float(x).is_integer() and lo <= x <= hi for x, lo, hi in zip(plan.x, plan.lo, plan.hi, strict=True))
    work = compress(copy.deepcopy(model), plan, method="lowrank")  # rank_step read from the plan
    kept = sum(_block_weights(work))
    assert kept <= budget and kept == plan.parameters["kept_params"]
    # damage falls with every unit, so no block could take one more unit within the budget
    shapes = linear_shapes(model)
    for shape, x, hi in zip(shapes, plan.x, plan.hi, strict=True):
        if x < hi:
            assert kept - kept_parameters(shape, int(x) * 4) + kept_parameters(shape, int(x + 1) * 4) > budget


def test_shapes_from_a_folder_read_no_weights(model, tmp_path):
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    assert linear_shapes(tmp_path / "m") == linear_shapes(model)
    assert linear_shapes(model)[0] == [(32, 32), (16, 32), (16, 32), (32, 32), (64, 32), (64, 32), (32, 64)]


# ---------------------------------------------------------------- the solve against brute force

SHAPES = {
    "same": [[(32, 32), (64, 32), (32, 64)]] * 3,
    "mixed": [[(32, 32), (16, 32), (16, 32), (64, 32)], [(48, 48), (24, 48)], [(32, 32), (96, 32), (32, 96)]],
}


def _brute_force(shapes, points, damage, fraction, step, form, lo_units, hi_units):
    n = [sum(m * k for m, k in s) for s in shapes]
    full = [max(min(m, k) for m, k in s) for s in shapes]
    best = np.inf
    for combo in itertools.product(*(range(int(a), int(b) + 1) for a, b in zip(lo_units, hi_units, strict=True))):
        kept = [kept_parameters(s, e * step) for s, e in zip(shapes, combo, strict=True)]
        if sum(kept) > fraction * sum(n):
            continue
        p = np.array([max(0.0, 1 - e * step / r) for e, r in zip(combo, full, strict=True)])
        d = curve_value(p, points, damage, form=form)
        best = min(best, sum(0.0 if kk >= nn else v for v, kk, nn in zip(d, kept, n, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_solution_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    checked = 0
    for case in range(12):
        key = ("same", "mixed")[case % 2]
        shapes = SHAPES[key][: 2 + case % 2]
        k = len(shapes)
        if case % 3 == 2:  # rising but not convex, as measured curves can be
            damage = np.sort(rng.uniform(0, 2, (k, len(POINTS))), axis=1)
        else:
            damage = rng.uniform(0.1, 3, k)[:, None] * np.asarray(POINTS)[None, :] ** rng.uniform(1.2, 5, k)[:, None]
        step = int(rng.choice([2, 4]))
        form = "power" if case % 5 == 4 else "piecewise"
        fraction = float(rng.uniform(0.2, 0.9))
        scores = _curves([sum(m * n for m, n in s) for s in shapes], damage)
        plan = plan_ranks_from_damage(scores, fraction, shapes=shapes, rank_step=step, form=form)
        expected = _brute_force(shapes, POINTS, damage, fraction, step, form, plan.lo, plan.hi)
        assert plan.objective == pytest.approx(expected, abs=1e-12), (seed, case)
        kept = sum(kept_parameters(s, int(e) * step) for s, e in zip(shapes, plan.x, strict=True))
        assert kept == plan.parameters["kept_params"] <= fraction * sum(scores.n_params)
        assert plan.parameters["exact"] and plan.dual >= 0
        checked += 1
    assert checked == 12


def test_equal_costs_and_convex_curves_fill_the_cheapest_damage_first():
    # two identical square blocks: block 1 is 10x as sensitive, so it keeps more rank
    scores = _curves([4096, 4096], [[0.05, 0.1, 0.25, 0.4], [0.5, 1.0, 2.5, 4.0]])
    plan = plan_ranks_from_damage(scores, 0.5, shapes=[[(64, 64)], [(64, 64)]], rank_step=4)
    assert plan.x[1] > plan.x[0] and plan.parameters["kept_params"] == 4096
    uniform = plan_ranks_uniform(scores, 0.5, shapes=[[(64, 64)], [(64, 64)]], rank_step=4)
    assert uniform.x == [4.0, 4.0] and uniform.parameters["kept_params"] == 4096


def test_a_large_problem_falls_back_with_a_gap_bound():
    rng = np.random.default_rng(3)
    kept = [np.arange(1, 40) * c for c in rng.integers(5, 9, 6)]
    damage = [np.sort(rng.uniform(0, 1, 39))[::-1] for _ in range(6)]
    exact = solve_unit_options(kept, damage, 600)
    capped = solve_unit_options(kept, damage, 600, max_frontier=1)
    assert exact.exact and exact.gap_bound == 0
    value = lambda index: sum(d[j] for d, j in zip(damage, index, strict=True))  # noqa: E731
    assert not capped.exact and value(capped.index) - capped.gap_bound <= value(exact.index) + 1e-12
    assert value(exact.index) <= value(capped.index) + 1e-12
    assert sum(c[j] for c, j in zip(kept, capped.index, strict=True)) <= 600


def test_refusals_say_what_to_do(model):
    blocks = find_blocks(model)
    n = [b.n_params for b in blocks]
    damage = np.tile(POINTS, (3, 1))
    with pytest.raises(ValueError, match="pruner=lowrank"):
        plan_ranks_from_damage(_curves(n, damage, pruner="wanda"), 0.5, shapes=model)
    with pytest.raises(ValueError, match="not reachable.*at least 0.222222"):
        plan_ranks_from_damage(_curves(n, damage), 0.05, shapes=model, rank_step=4)
    with pytest.raises(ValueError, match="another model"):
        plan_ranks_from_damage(_curves([n[0] + 1, *n[1:]], damage), 0.5, shapes=model)
    with pytest.raises(ValueError, match="shapes"):
        plan_ranks_from_damage(_curves(n, damage), 0.5, shapes=None)
    with pytest.raises(ValueError, match="budget_fraction"):
        plan_ranks_from_damage(_curves(n, damage), 1.5, shapes=model)
    with pytest.raises(ValueError, match="no measured damage"):
        plan_ranks_from_damage(LayerScores("damage", zeta2=[1.0] * 3, n_params=n, settings={"pruner": "lowrank"}),
                               0.5, shapes=model)


# ---------------------------------------------------------------- whole-plan losses


@pytest.mark.parametrize("method", ["lowrank", "asvd"])
def test_rank_plan_loss_equals_compress_and_a_forward(model, ids, method):
    pristine = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure = RankPlanLoss(model, ids, method=method, rank_step=4, batch_size=2)
    assert measure.dense_loss == pytest.approx(_reference_loss(model, ids), rel=1e-5)
    for units in ([1, 3, 6], [2, 2, 2], [5, 1, 4], [1, 3, 6]):  # 6 units: every Linear stays dense
        work = copy.deepcopy(pristine)
        compress(work, make_plan(work, "allocate", units, rank_step=4), method=method, data=ids,
                 sequential=False, batch_size=2)
        assert measure(units) == pytest.approx(_reference_loss(work, ids), rel=1e-5), units
    assert measure.evaluations == 4
    measure.close()
    assert all(isinstance(m, nn.Linear) for b in find_blocks(model) for m in b.linears.values())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    with pytest.raises(RuntimeError, match="closed"):
        measure([1, 1, 1])


def test_rank_plan_loss_refusals(model, ids):
    with pytest.raises(ValueError, match="pruning plans"):
        RankPlanLoss(model, ids, method="wanda")
    measure = RankPlanLoss(model, ids, method="lowrank", rank_step=4)
    try:
        with pytest.raises(ValueError, match="3 blocks"):
            measure([1, 1])
        with pytest.raises(ValueError, match="whole units"):
            measure([1.5, 1, 1])
        with pytest.raises(ValueError, match="whole units"):
            measure([0, 1, 1])
    finally:
        measure.close()


# ---------------------------------------------------------------- refinement


def test_unit_exchange_keeps_the_budget_and_never_gets_worse():
    cost = np.array([3.0, 5.0, 4.0, 6.0])  # weights per unit differ between blocks
    weight = np.array([1.0, 6.0, 2.0, 0.5])
    calls = []

    def loss(units):
        calls.append(np.array(units))
        units = np.asarray(units)
        return float(np.sum(weight / units) * (1 + 0.1 * np.var(units)))

    kept = lambda k, e: cost[k] * e  # noqa: E731
    budget = float(cost @ np.array([6, 6, 6, 6])) + 2
    r = refine_unit_exchange([6, 6, 6, 6], kept, budget, loss, lo=[1] * 4, hi=[20] * 4, step=2, max_evals=40)
    assert len(calls) == r.evaluations <= 40
    assert r.loss <= r.start_loss and r.loss == pytest.approx(loss(r.x))
    assert r.accepted and r.loss < r.start_loss
    assert float(cost @ r.x) <= budget and all(float(v).is_integer() for v in r.x)
    with pytest.raises(ValueError, match="over the budget"):
        refine_unit_exchange([7, 6, 6, 6], kept, budget, loss, lo=[1] * 4, hi=[20] * 4)


def test_refine_ranks_on_a_tiny_model(model, ids):
    from cwca_export.scoring import score

    before = {k: v.clone() for k, v in model.state_dict().items()}
    pristine = copy.deepcopy(model)
    scores = score(model, ids, method="damage", options={"pruner": "lowrank"}, progress=False,
                   num_samples=4, seq_len=16)
    plan = refine_ranks(model, scores, 0.6, ids, method="lowrank", rank_step=4, max_evals=14)
    record = plan.parameters["refinement"]
    assert record["forwards"] <= 14 and set(record["candidates"]) == {"damage", "uniform"}
    assert record["calib_loss"] <= record["calib_loss_start"] <= min(record["candidates"].values()) + 1e-12
    work = compress(copy.deepcopy(pristine), plan, method="lowrank")
    assert record["calib_loss"] == pytest.approx(_reference_loss(work, ids), rel=1e-5)
    kept = sum(_block_weights(work))
    assert kept == plan.parameters["kept_params"] <= 0.6 * sum(scores.n_params)
    for name, value in model.state_dict().items():  # the model comes back dense
        assert torch.equal(value, before[name]), name
    with pytest.raises(ValueError, match="--max-evals"):
        refine_ranks(model, scores, 0.6, ids, rank_step=4, max_evals=3)


# ---------------------------------------------------------------- command line


def test_cli_plans_ranks_that_compress_applies_within_budget(tmp_path):
    from click.testing import CliRunner
    from helpers import sample_text, save_tiny_model

    import cwca_export
    from cwca_export.cli import cli
    from cwca_export.planning.plan import Plan

    folder = save_tiny_model("llama", tmp_path / "m", num_hidden_layers=3)
    text = tmp_path / "calib.txt"
    text.write_text(sample_text() * 4)
    runner = CliRunner()
    common = ["--data", str(text), "--samples", "4", "--seq-len", "16", "--no-progress"]
    res = runner.invoke(cli, ["score", str(folder), *common, "--estimator", "damage", "--option", "pruner=lowrank",
                              "--out", str(tmp_path / "lr.json")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["plan", str(tmp_path / "lr.json"), "--program", "allocate", "--budget-fraction", "0.6",
                              "--rank-step", "4", "--out", str(tmp_path / "ranks.json")])
    assert res.exit_code == 0, res.output
    assert "rule damage; kept" in res.output and "budget 0.6" in res.output
    plan = Plan.load(tmp_path / "ranks.json")
    assert plan.program == "allocate" and plan.parameters["rank_step"] == 4
    res = runner.invoke(cli, ["compress", str(folder), "--plan", str(tmp_path / "ranks.json"), "--method", "lowrank",
                              "--out", str(tmp_path / "small")])
    assert res.exit_code == 0, res.output
    small = cwca_export.load_compressed(tmp_path / "small")
    assert sum(_block_weights(small)) == plan.parameters["kept_params"] <= 0.6 * sum(plan.n_params)

    # --model names the folder explicitly; --budget keeps the value program (unchanged behaviour)
    res = runner.invoke(cli, ["plan", str(tmp_path / "lr.json"), "--program", "allocate", "--budget-fraction", "0.5",
                              "--model", str(folder), "--rank-step", "4", "--out", str(tmp_path / "r2.json")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["plan", str(tmp_path / "lr.json"), "--program", "allocate", "--budget", "6",
                              "--hi", "4", "--out", str(tmp_path / "cwca.json")])
    assert res.exit_code == 0, res.output
    assert "spent" in res.output and "rule" not in Plan.load(tmp_path / "cwca.json").parameters

    # refusals: pruning curves, an unreachable budget, both budgets, no budget
    res = runner.invoke(cli, ["score", str(folder), *common, "--estimator", "damage", "--option", "pruner=magnitude",
                              "--out", str(tmp_path / "mag.json")])
    assert res.exit_code == 0, res.output
    for args, message in [
        ([str(tmp_path / "mag.json"), "--budget-fraction", "0.6"], "pruner=lowrank"),
        ([str(tmp_path / "lr.json"), "--budget-fraction", "0.01", "--rank-step", "4"], "not reachable"),
        ([str(tmp_path / "lr.json"), "--budget-fraction", "0.5", "--budget", "3"], "give one"),
        ([str(tmp_path / "lr.json")], "needs --budget-fraction"),
        ([str(tmp_path / "lr.json"), "--rule", "band", "--budget", "3"], "pruning rule"),
    ]:
        out = tmp_path / "refused.json"
        res = runner.invoke(cli, ["plan", *args, "--program", "allocate", "--out", str(out)])
        assert res.exit_code != 0 and message in res.output, (args, res.output)
        assert not out.exists()
