"""scores.json and plan.json: round trips, schema checks, the quality floor, Plan.check."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cwca_export.jsonio import SchemaError
from cwca_export.planning.plan import Plan, PlanMismatchError, plan_allocation, plan_pruning
from cwca_export.scores import LayerScores, qualities


def _scores(**kw) -> LayerScores:
    base = dict(
        method="fisher",
        zeta2=[4.0, 1.0, 0.0, 3.0],
        n_params=[100, 200, 100, 50],
        block_names=[f"model.layers.{i}" for i in range(4)],
        stats={"grad_sq_norm": [1.0, 2.0, 3.0, 4.0]},
        samples=8,
        tokens=512,
        settings={"damping": 0.1},
        model={"fingerprint": "sha256:abc", "architecture": "LlamaForCausalLM"},
        data_hash="sha256:def",
    )
    base.update(kw)
    return LayerScores(**base)


def test_quality_floor_follows_design():
    z = np.array([4.0, 1.0, 0.0, 3.0])
    q = qualities(z, tau=0.05)
    raw = z / z.sum()
    floor = 0.05 * np.median(raw[raw > 0])
    np.testing.assert_allclose(q, np.maximum(raw, floor))
    assert q[2] == pytest.approx(floor) and q[2] > 0
    np.testing.assert_allclose(qualities(np.zeros(3)), [1 / 3] * 3)


def test_scores_round_trip(tmp_path):
    s = _scores()
    path = s.save(tmp_path / "scores.json")
    assert LayerScores.load(path) == s
    data = json.loads(path.read_text())
    assert data["_type"] == "LayerScores" and data["schema_version"] == 1
    assert data["q"] == pytest.approx(s.qualities().tolist())


@pytest.mark.parametrize("program", ["prune", "allocate"])
def test_plan_round_trip(tmp_path, program):
    s = _scores()
    if program == "prune":
        plan = plan_pruning(s, 0.5, hi_blocks={0: 0.3})
    else:
        plan = plan_allocation(s, 10, gamma=20, beta=1, hi=6)
    again = Plan.load(plan.save(tmp_path / "plan.json"))
    assert again == plan
    assert again.model["fingerprint"] == "sha256:abc"
    assert again.scores["method"] == "fisher"


def test_plan_is_solved_from_floored_qualities():
    s = _scores()
    plan = plan_pruning(s, 0.5, hi_blocks={0: 0.3})
    assert plan.global_sparsity == pytest.approx(0.5, abs=1e-12)
    assert plan.x[0] <= 0.3
    assert plan.x[2] == pytest.approx(0.95)  # the zero-gain block is pruned hardest
    np.testing.assert_allclose(plan.q, s.qualities())


def test_newer_schema_and_wrong_type_are_refused(tmp_path):
    data = _scores().to_dict()
    data["schema_version"] = 99
    (tmp_path / "new.json").write_text(json.dumps(data))
    with pytest.raises(SchemaError, match="newer"):
        LayerScores.load(tmp_path / "new.json")
    plan_path = plan_pruning(_scores(), 0.5).save(tmp_path / "plan.json")
    with pytest.raises(SchemaError, match="expected LayerScores"):
        LayerScores.load(plan_path)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(SchemaError, match="not valid JSON"):
        Plan.load(tmp_path / "broken.json")


def test_unknown_keys_warn_but_load(tmp_path):
    data = plan_pruning(_scores(), 0.5).to_dict()
    data["future_field"] = {"x": 1}
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="future_field"):
        Plan.load(tmp_path / "plan.json")


def test_invalid_scores_are_rejected():
    with pytest.raises(ValueError, match="n_params has"):
        _scores(n_params=[1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        _scores(zeta2=[1.0, -1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"stats\['grad_sq_norm'\]"):
        _scores(stats={"grad_sq_norm": [1.0]})


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = _scores().save(tmp_path / "scores.json")
    before = path.read_text()
    bad = _scores()
    bad.settings = {"not_json": object()}
    with pytest.raises(TypeError):
        bad.save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]


# ---------------------------------------------------------------- Plan.check on a real model


@pytest.fixture(scope="module")
def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64, max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg)


def _plan_for(model, fingerprint=True) -> Plan:
    from cwca_export.blocks import find_blocks, model_fingerprint

    blocks = find_blocks(model)
    s = LayerScores(
        "gradnorm",
        zeta2=[1.0] * len(blocks),
        n_params=[b.n_params for b in blocks],
        block_names=[b.name for b in blocks],
        model={"fingerprint": model_fingerprint(model)} if fingerprint else {},
    )
    return plan_pruning(s, 0.5)


def test_plan_check_accepts_its_model(tiny_llama):
    _plan_for(tiny_llama).check(tiny_llama)


def test_plan_check_names_what_does_not_fit(tiny_llama):
    import torch

    plan = _plan_for(tiny_llama)
    wrong_count = Plan.from_dict({**plan.to_dict(), "blocks": plan.to_dict()["blocks"][:2]})
    with pytest.raises(PlanMismatchError, match="plan has 2 blocks but the model has 3"):
        wrong_count.check(tiny_llama)
    data = plan.to_dict()
    data["blocks"][1]["n_params"] += 1
    with pytest.raises(PlanMismatchError, match="model.layers.1"):
        Plan.from_dict(data).check(tiny_llama)
    # same shapes, other weights: the fingerprint catches it
    import copy

    other = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(2)
    with pytest.raises(PlanMismatchError, match="fingerprint"):
        plan.check(other)
    plan.check(other, fingerprint=False)
