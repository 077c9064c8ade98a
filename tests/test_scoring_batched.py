"""Per-sequence estimators at batch size > 1 against a per-sequence autograd loop.

fisher, gradnorm, obd and layerif need each sequence's own gradient; with batches the pass
splits them from one forward/backward (s_b^T a_b per Linear). The references here run one
sequence per ``torch.autograd.grad`` call and never touch the scoring code.
"""

from __future__ import annotations

import pytest
import torch
from helpers import sample_text, tiny_model, tiny_tokenizer

from cwca_export.blocks import find_blocks
from cwca_export.data import calibration_data
from cwca_export.scoring import score


def loop_grads(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per block, (N, n_k) float64: each sequence's gradient from its own backward."""
    blocks = find_blocks(model)
    weights = [[m.weight for m in b.linears.values()] for b in blocks]
    flat = [w for ws in weights for w in ws]
    rows: list[list[torch.Tensor]] = [[] for _ in blocks]
    for seq in ids:
        loss = model(input_ids=seq[None], labels=seq[None]).loss
        grads = iter(torch.autograd.grad(loss, flat))
        for k, ws in enumerate(weights):
            rows[k].append(torch.cat([next(grads).reshape(-1) for _ in ws]).double())
    return [torch.stack(r) for r in rows]


def calib(num_samples, seq_len, held_out=0):
    return calibration_data([sample_text()], tiny_tokenizer(), num_samples=num_samples, seq_len=seq_len,
                            held_out=held_out)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fisher_gradnorm_obd_in_batches_equal_the_per_sequence_loop(family, checkpointing):
    model = tiny_model(family)
    data = calib(7, 24)  # batches of 3: 3 + 3 + 1, the last one short
    grads = loop_grads(model, data.input_ids)
    kw = {"progress": False, "batch_size": 3, "gradient_checkpointing": checkpointing}
    fisher = score(model, data, method="fisher", **kw)
    gradnorm = score(model, data, method="gradnorm", **kw)
    obd = score(model, data, method="obd", **kw)
    assert fisher.settings["batch_size"] == 3
    for k, (gk, block) in enumerate(zip(grads, find_blocks(model), strict=True)):
        g, f = gk.mean(0), (gk * gk).mean(0)
        lam = 0.1 * f.mean()
        theta = torch.cat([m.weight.detach().reshape(-1) for m in block.linears.values()]).double()
        n = gk.shape[0]
        assert fisher.zeta2[k] == pytest.approx(float((g * g / (f + lam)).sum()), rel=1e-4)
        assert fisher.stats["fisher_trace"][k] == pytest.approx(float(f.sum()), rel=1e-4)
        # the noise floor is the part that only per-sequence squares get right
        floor = float(((f - g * g) / ((n - 1) * (f + lam))).sum())
        assert fisher.stats["noise_floor"][k] == pytest.approx(floor, rel=1e-4)
        assert gradnorm.zeta2[k] == pytest.approx(float(g @ g), rel=1e-4)
        assert obd.zeta2[k] == pytest.approx(float((f * theta * theta).sum()), rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_scores_equal_batch_size_one(family):
    model = tiny_model(family)
    data = calib(5, 16, held_out=2)
    for method in ("fisher", "obd", "layerif"):
        one = score(model, data, method=method, progress=False, batch_size=1)
        many = score(model, data, method=method, progress=False, batch_size=4)
        assert many.zeta2 == pytest.approx(one.zeta2, rel=1e-4, abs=1e-12), method
        for key, values in one.stats.items():
            assert many.stats[key] == pytest.approx(values, rel=1e-4, abs=1e-9), (method, key)


def test_layerif_in_batches_equals_the_explicit_datainf_inverse():
    model = tiny_model("llama", hidden_size=4, intermediate_size=8, num_attention_heads=2,
                       num_key_value_heads=1, num_hidden_layers=1).double()
    data = calib(5, 16, held_out=2)
    train = loop_grads(model, data.input_ids)[0]  # (N, n_k)
    v = loop_grads(model, data.held_out)[0].mean(0)
    n, p = train.shape
    lam = 0.1 * float((train * train).mean())
    eye = torch.eye(p, dtype=torch.float64)
    inverse = sum(torch.linalg.inv(gi[:, None] * gi[None, :] + lam * eye) for gi in train) / n
    reference = float(train.mean(0) @ inverse @ v)
    result = score(model, data, method="layerif", progress=False, batch_size=2)
    assert result.stats["layerif_influence"][0] == pytest.approx(reference, rel=1e-6)


def test_mixture_of_experts_falls_back_to_batch_size_one():
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    data = calib(4, 16)
    one = score(model, data, method="obd", progress=False, batch_size=1)
    with pytest.warns(UserWarning, match="mixture-of-experts.*batch size 1"):
        many = score(model, data, method="obd", progress=False, batch_size=2)
    assert many.settings["batch_size"] == 1 and many.zeta2 == pytest.approx(one.zeta2, rel=1e-6)


def test_exact_with_batches_equals_batch_size_one():
    model = tiny_model("llama", hidden_size=4, intermediate_size=8, num_attention_heads=2,
                       num_key_value_heads=1, num_hidden_layers=1).double()
    data = calib(5, 16)
    options = {"cg_max_iter": 20}
    one = score(model, data, method="exact", options=options, progress=False, batch_size=1)
    many = score(model, data, method="exact", options=options, progress=False, batch_size=3)
    assert many.zeta2 == pytest.approx(one.zeta2, rel=1e-6)
