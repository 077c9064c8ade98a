"""Plans in other libraries' formats: a peft LoraConfig from an allocation plan, loaded and
trained by peft itself; an llm-compressor sparsity recipe from a pruning plan."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import sample_text, save_tiny_model, tiny_model, tiny_tokenizer

from cwca_export.cli import cli
from cwca_export.planning.plan import Plan
from cwca_export.scores import LayerScores


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def llama_dir(tmp_path):
    return save_tiny_model("llama", tmp_path / "llama", num_hidden_layers=3)


def _scores(tmp_path, zeta2):
    s = LayerScores("gradnorm", zeta2=zeta2, n_params=[9216] * len(zeta2),
                    block_names=[f"model.layers.{i}" for i in range(len(zeta2))])
    return s.save(tmp_path / "scores.json")


def test_peft_config_loads_with_planned_ranks_and_trains(tmp_path, llama_dir):
    peft = pytest.importorskip("peft", reason="the peft extra is not installed: pip install '.[peft]'")
    scores = _scores(tmp_path, [3.0, 1.0, 0.001])
    out = tmp_path / "lora"
    r = _invoke("plan", scores, "--program", "allocate", "--budget", 4, "--gamma", 20, "--beta", 1,
                "--hi", 3, "--model", llama_dir, "--peft-config", out, "--rank-step", 4,
                "--out", tmp_path / "ranks.json")
    assert r.exit_code == 0, r.output
    units = Plan.load(tmp_path / "ranks.json").x
    assert units[2] == 0 and units[0] > units[1] > 0  # the ranking the scores ask for
    planned = {i: int(u) * 4 for i, u in enumerate(units)}

    config = peft.LoraConfig.from_pretrained(out)
    model = peft.get_peft_model(tiny_model("llama", num_hidden_layers=3), config)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            block = int(re.search(r"layers\.(\d+)\.", name).group(1))
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            assert a.shape[0] == b.shape[1] == planned[block], name
            assert module.scaling["default"] == pytest.approx(2.0)  # alpha = 2 r in every block
            found.setdefault(block, set()).add(name.rsplit(".", 1)[-1])
    linears = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert found == {0: linears, 1: linears}  # block 2 got no units: no adapters

    ids = tiny_tokenizer()(sample_text()[:400], return_tensors="pt")["input_ids"]
    model.train()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    optimiser.step()
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).loss < loss


def test_peft_config_refuses_a_prune_plan_and_a_folder_with_weights(tmp_path, llama_dir):
    scores = _scores(tmp_path, [3.0, 1.0, 0.5])
    r = _invoke("plan", scores, "--sparsity", 0.5, "--peft-config", tmp_path / "lora")
    assert r.exit_code == 2 and "--program allocate" in r.output
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    r = _invoke("plan", scores, "--program", "allocate", "--budget", 4, "--gamma", 20, "--model", llama_dir,
                "--peft-config", adapter, "--out", tmp_path / "ranks.json")
    assert r.exit_code == 1 and "--peft-config NEW_DIR" in r.output
    assert not (adapter / "adapter_config.json").exists() and not (tmp_path / "ranks.json").exists()


def test_llmcompressor_recipe_carries_the_per_block_sparsity(tmp_path):
    """llm-compressor does not install beside the pinned stack (transformers 4.57, numpy 2.4):
    the recipe is checked against the modifier's documented schema (SparsityModifierBase:
    sparsity float | list, one entry per target layer; mask_structure "N:M"; targets; ignore)."""
    scores = _scores(tmp_path, [5.0, 1.0, 2.0])
    recipe_path = tmp_path / "sparsity.yaml"
    r = _invoke("plan", scores, "--sparsity", 0.5, "--llmcompressor-recipe", recipe_path,
                "--llmcompressor-modifier", "WandaPruningModifier", "--out", tmp_path / "plan.json")
    assert r.exit_code == 0, r.output
    plan = Plan.load(tmp_path / "plan.json")
    recipe = yaml.safe_load(recipe_path.read_text())
    (stage,) = recipe.values()
    (group,) = stage.values()
    assert list(recipe) == ["sparsity_stage"] and list(stage) == ["sparsity_modifiers"]
    args = group["WandaPruningModifier"]
    assert set(args) == {"sparsity", "mask_structure", "targets", "ignore"}
    assert args["sparsity"] == pytest.approx(plan.x, abs=1e-6)
    assert args["mask_structure"] == "0:0"
    # the targets are exactly the plan's blocks (llm-compressor's "re:" prefix, re.match)
    names = [n for n, _ in tiny_model("llama", num_hidden_layers=3).named_modules()]
    (target,) = args["targets"]
    assert target.startswith("re:")
    matched = [n for n in names if re.match(target[3:], n)]
    assert matched == plan.block_names
    assert [n for n in names if re.match(args["ignore"][0][3:], n)] == ["lm_head"]


def test_llmcompressor_recipe_refuses_an_allocation_plan(tmp_path):
    scores = _scores(tmp_path, [3.0, 1.0])
    r = _invoke("plan", scores, "--program", "allocate", "--budget", 4, "--llmcompressor-recipe",
                tmp_path / "r.yaml")
    assert r.exit_code == 2 and "--program prune" in r.output


def test_adapter_config_is_peft_json(tmp_path, llama_dir):
    pytest.importorskip("peft", reason="the peft extra is not installed: pip install '.[peft]'")
    scores = _scores(tmp_path, [3.0, 1.0, 0.001])
    out = tmp_path / "lora"
    _invoke("plan", scores, "--program", "allocate", "--budget", 4, "--gamma", 20, "--beta", 1, "--hi", 3,
            "--model", llama_dir, "--peft-config", out, "--rank-step", 2, "--out", tmp_path / "r.json")
    data = json.loads((out / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert data["rank_pattern"] == {r"model\.layers\.0\..*": 6, r"model\.layers\.1\..*": 2}
