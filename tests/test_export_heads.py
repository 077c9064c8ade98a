"""Export of models whose blocks keep different attention head counts (width with heads=True).

The ``onnx`` backend sizes each layer's KV cache from its block's attention modules; the
session, verification and measurement read the cache shape per layer. Optimum sizes every
layer from the config, so it refuses such models and names ``--backend onnx``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cwca_export.backends import UnsupportedModelError
from helpers import tiny_model

import cwca_export
from cwca_export.budget import Budget
from cwca_export.exporter.session import DecoderSession, make_session

FAST = {"budget": Budget(prompt_len=8, context=24), "runs": 2, "warmup": 1}
ZETA2 = [1.0, 4.0, 16.0]  # distinct sensitivities -> distinct per-block rho


def _head_pruned(family: str):
    """A tiny model whose three blocks keep different numbers of KV groups; their (q, kv) heads."""
    model = tiny_model(family, num_attention_heads=8, num_key_value_heads=4, hidden_size=64, num_hidden_layers=3)
    blocks = cwca_export.find_blocks(model)
    scores = cwca_export.LayerScores("gradnorm", zeta2=ZETA2, n_params=[b.n_params for b in blocks])
    plan = cwca_export.plan_pruning(scores, 0.4, hi=0.8)
    cwca_export.compress(model, plan, method="width", heads=True, importance="magnitude", check_fingerprint=False)
    heads = [(r["num_attention_heads"], r["num_key_value_heads"]) for r in model.config.cwca_compression["blocks"]]
    kv = [h[1] for h in heads]
    assert len(set(kv)) > 1, f"the plan should leave blocks with different KV heads, got {heads}"
    assert any(k != model.config.num_key_value_heads for k in kv)
    return model, heads


def _past_inputs(path) -> dict[str, list]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
        for i in graph.input
        if i.name.startswith("past_key_values.")
    }


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_onnx_backend_exports_per_block_kv_heads(tmp_path, family):
    model, heads = _head_pruned(family)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    art = cwca_export.export(model, None, tmp_path / "a", backend="onnx", **FAST)

    # export verified logits (prefill and a decode step through the cache) and greedy tokens
    fp32 = art.manifest["verification"]["fp32"]
    assert fp32["parity"]["passed"] and fp32["parity"]["rel_rms"] <= 1e-4
    assert fp32["generation"]["passed"] and fp32["generation"]["session_equal"]

    # every layer's cache input has its own block's KV heads
    past = _past_inputs(art.model_path)
    assert len(past) == 2 * len(heads)
    for i, (_, kv) in enumerate(heads):
        for which in ("key", "value"):
            shape = past[f"past_key_values.{i}.{which}"]
            assert shape[1] == kv and shape[3] == head_dim, (i, which, shape)

    # the session reads the cache shape per layer; measurement used it at full context
    decoder = DecoderSession(make_session(art.model_path))
    assert decoder.past_shapes == [(kv, head_dim) for _, kv in heads for _ in ("key", "value")]
    assert [p.shape for p in decoder.empty_past(2, 5)] == [(2, kv, 5, head_dim) for _, kv in heads for _ in "kv"]
    measurement = art.manifest["measurement"]
    assert measurement["has_kv_cache"] and measurement["latency_ms"]["decode"]["runs"] == 2
    ctx = FAST["budget"].context
    assert measurement["kv_cache_bytes"] == sum(2 * 1 * kv * ctx * head_dim * 4 for _, kv in heads)
    assert decoder.kv_cache_bytes(1, ctx) == measurement["kv_cache_bytes"]

    # the raw session decodes through the uneven cache like torch does
    ids = np.array([[5, 9, 13, 2, 7]], dtype=np.int64)
    logits, present = decoder.run(ids, np.ones_like(ids))
    assert [p.shape[1] for p in present] == [kv for _, kv in heads for _ in "kv"]


def test_int8_artifact_with_per_block_kv_heads_verifies(tmp_path):
    model, _ = _head_pruned("llama")
    art = cwca_export.export(model, None, tmp_path / "q", backend="onnx", quantize="int8", **FAST)
    assert art.parity["passed"] and art.manifest["postprocess"]["steps"] == ["int8"]


def test_optimum_refuses_per_block_kv_heads_and_names_onnx(tmp_path):
    model, _ = _head_pruned("llama")
    with pytest.raises(UnsupportedModelError, match="--backend onnx"):
        cwca_export.export(model, None, tmp_path / "x", backend="optimum", **FAST)
    assert not (tmp_path / "x").exists()
