"""benchmarks/bench_budget_search.py's structure knob: the search's plan and its uniform baseline
are plans of the same structure, and the uniform one gives every block the same fraction."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.helpers import sample_text, tiny_model, tiny_tokenizer

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_budget_search.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_budget_search", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kept_weights(shapes, rank):
    """Weights a block keeps at rank ``rank``: r (m + n) per Linear it shrinks, m n otherwise."""
    return sum(rank * (m + n) if rank * (m + n) < m * n else m * n for m, n in shapes)


@pytest.mark.parametrize("structure", ["lowrank", "asvd"])
def test_rank_structures_plan_ranks_and_a_uniform_rank_fraction(structure):
    from cwca_export.scoring import score

    bench = load_bench()
    model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    method, options, pruner, backend = bench.STRUCTURES[structure]
    assert (method, options, pruner, backend) == (structure, {}, structure, "optimum")
    scores = score(model, [sample_text()], tokenizer=tiny_tokenizer(), method="damage", num_samples=4, seq_len=32,
                   options={"pruner": pruner, "points": "0.2,0.4,0.6,0.8", "at": 0.4}, progress=False)
    plans = bench.structure_plans(structure, model, scores)
    shapes = [[tuple(m.weight.shape) for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                layer.self_attn.v_proj, layer.self_attn.o_proj,
                                                layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
              for layer in model.model.layers]
    total = sum(m * n for block in shapes for m, n in block)
    for kind in ("search", "uniform"):
        plan = plans[kind]
        step = plan.parameters["rank_step"]
        ranks = [int(round(u)) * step for u in plan.x]
        assert sum(kept_weights(s, r) for s, r in zip(shapes, ranks)) <= 0.7 * total
    assert plans["uniform"].parameters["rule"] == "uniform"
    assert plans["search"].parameters["rule"] != "uniform"
    assert len(set(plans["uniform"].x)) == 1  # identical blocks: one rank for all


def test_width_heads_narrows_kv_groups_and_exports_through_the_onnx_backend():
    bench = load_bench()
    method, options, pruner, backend = bench.STRUCTURES["width-heads"]
    assert (method, options, pruner, backend) == ("width", {"heads": True}, "width", "onnx")
    assert bench.STRUCTURES["width"] == ("width", {}, "width", "optimum")
