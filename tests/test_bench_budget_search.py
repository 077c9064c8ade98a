"""benchmarks/bench_budget_search.py's structure knob: the search's plan and its uniform baseline
are plans of the same structure, and the uniform one gives every block the same fraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import load_benchmark, sample_text, tiny_model, tiny_tokenizer


def load_bench():
    return load_benchmark("bench_budget_search")


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
        assert sum(kept_weights(s, r) for s, r in zip(shapes, ranks, strict=True)) <= 0.7 * total
    assert plans["uniform"].parameters["rule"] == "uniform"
    assert plans["search"].parameters["rule"] != "uniform"
    assert len(set(plans["uniform"].x)) == 1  # identical blocks: one rank for all


def test_width_heads_exports_each_blocks_own_kv_heads_through_the_onnx_backend(tmp_path):
    """The backend the width-heads structure names exports blocks with different KV-head counts
    (Optimum refuses them): the graph's cache inputs carry each block's own count."""
    import sys

    import onnx
    from cwca_export.backends import get_backend

    import cwca_export

    sys.path.insert(0, str(Path(__file__).parent))
    from compress_plans import make_plan

    bench = load_bench()
    method, options, _, backend = bench.STRUCTURES["width-heads"]
    assert options == {"heads": True} and backend == "onnx"
    dense = tiny_model("llama")  # 2 blocks, 4 query / 2 KV heads
    model = cwca_export.compress(dense, make_plan(dense, "prune", [0.6, 0.0]), method=method,
                                 importance="magnitude", **options)
    (tmp_path / "out").mkdir()
    get_backend(backend).export(model, None, tmp_path / "out")
    graph = onnx.load(tmp_path / "out" / "model.onnx").graph
    heads = {i.name: i.type.tensor_type.shape.dim[1].dim_value for i in graph.input if i.name.startswith("past")}
    assert heads == {"past_key_values.0.key": 1, "past_key_values.0.value": 1,
                     "past_key_values.1.key": 2, "past_key_values.1.value": 2}


def test_damage_points_added_to_cached_scores_equal_one_run_at_all_points(tmp_path):
    """bench_budget_search --points: probes a cached scores file lacks are measured and merged;
    the merged curves equal those of one scoring run at every point."""
    from cwca_export.data import calibration_data
    from cwca_export.planning.plan import damage_curves
    from cwca_export.scoring import score

    bench = load_bench()
    model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    calib = calibration_data([sample_text()], tiny_tokenizer(), num_samples=4, seq_len=32, seed=0)
    path = tmp_path / "damage-lowrank.json"
    bench.damage_scores(path, model, calib, "lowrank", "0.2,0.4")
    merged = bench.damage_scores(path, model, calib, "lowrank", "0.2,0.4,0.875")
    once = score(model, calib, method="damage", options={"pruner": "lowrank", "points": "0.2,0.4,0.875", "at": 0.4},
                 progress=False)
    points, damage = damage_curves(merged)
    ref_points, ref_damage = damage_curves(once)
    assert points.tolist() == ref_points.tolist() == [0.2, 0.4, 0.875]
    np.testing.assert_allclose(damage, ref_damage, rtol=1e-6, atol=1e-9)
    assert bench.damage_scores(path, model, calib, "lowrank", "0.875") is not None  # nothing missing: no probe
