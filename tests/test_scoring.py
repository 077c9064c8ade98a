"""score(): the registry, settings, determinism, dtypes, batching and checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import sample_text, tiny_model, tiny_tokenizer

from cwca_export.data import calibration_data
from cwca_export.scoring import ESTIMATORS, Estimate, register_estimator, score


def data(n=4, seq_len=24, held_out=0):
    return calibration_data([sample_text()], tiny_tokenizer(), num_samples=n, seq_len=seq_len, held_out=held_out)


def test_registry_holds_every_design_estimator_and_refuses_duplicates():
    assert set(ESTIMATORS) >= {"fisher", "kfac", "exact", "gradnorm", "obd", "layerif", "owl", "uniform"}
    with pytest.raises(ValueError, match="already registered"):
        register_estimator("fisher", summary="again")(lambda run: Estimate([1.0]))
    with pytest.raises(ValueError, match="lower-case"):
        register_estimator("Fisher-2", summary="bad name")


@pytest.mark.parametrize("method", sorted(ESTIMATORS))
def test_every_method_scores_every_block_with_provenance(method):
    model = tiny_model("mistral")
    result = score(model, [sample_text()], tokenizer=tiny_tokenizer(), method=method, num_samples=4,
                   seq_len=24, progress=False, options={"cg_max_iter": 3} if method == "exact" else None)
    assert result.method == method and result.num_blocks == 2 and result.samples == 4
    assert all(math.isfinite(z) and z >= 0 for z in result.zeta2)
    assert result.model["architecture"] == "MistralForCausalLM" and result.model["fingerprint"].startswith("sha256:")
    assert result.settings["seq_len"] == 24 and result.versions["torch"] == torch.__version__
    assert result.data_hash == data(held_out=result.settings["held_out"]).data_hash
    assert len(result.stats["zeta2_noise_ratio"]) == 2
    if method != "uniform":
        assert result.tokens >= 4 * 24


def test_bad_settings_are_errors_that_say_what_to_do():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown scoring method 'fishr'; choose one of"):
        score(model, data(), method="fishr")
    with pytest.raises(ValueError, match=r"has no options \['cg_tol'\]"):
        score(model, data(), method="fisher", options={"cg_tol": 1})
    with pytest.raises(ValueError, match="batch_size 0: must be >= 1"):
        score(model, data(), method="fisher", batch_size=0)
    with pytest.raises(ValueError, match="needs a held-out split"):
        score(model, data(), method="layerif")
    with pytest.raises(ValueError, match="damping_mode"):
        score(model, data(), damping_mode="percent")


def test_same_inputs_and_seed_give_byte_identical_scores(tmp_path):
    model = tiny_model("qwen2")
    runs = [
        score(model, [sample_text()], tokenizer=tiny_tokenizer(), num_samples=4, seq_len=24, seed=7,
              progress=False, record_wall_time=False).save(tmp_path / f"s{i}.json")
        for i in range(2)
    ]
    assert runs[0].read_bytes() == runs[1].read_bytes()
    other = score(model, [sample_text()], tokenizer=tiny_tokenizer(), num_samples=4, seq_len=24, seed=8,
                  progress=False, record_wall_time=False).save(tmp_path / "other.json")
    assert other.read_bytes() != runs[0].read_bytes()


def test_bf16_model_keeps_fp32_accumulators_and_agrees_with_fp32():
    calib = data()
    fp32 = score(tiny_model("llama"), calib, method="gradnorm", progress=False)
    bf16 = score(tiny_model("llama").to(torch.bfloat16), calib, method="gradnorm", progress=False)
    assert bf16.model["dtype"] == "bfloat16"
    for a, b in zip(fp32.zeta2, bf16.zeta2, strict=True):
        assert b == pytest.approx(a, rel=0.1)  # bf16 forward noise, not fp32 accumulation loss


def test_kfac_batches_and_checkpointing_change_nothing():
    calib = data()
    one = score(tiny_model("llama"), calib, method="kfac", progress=False)
    batched = score(tiny_model("llama"), calib, method="kfac", batch_size=2, progress=False)
    model = tiny_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = score(model, calib, method="kfac", progress=False, gradient_checkpointing=True)
    for other in (batched, checkpointed):
        assert other.zeta2 == pytest.approx(one.zeta2, rel=1e-4)
        assert other.stats["kfac_trace"] == pytest.approx(one.stats["kfac_trace"], rel=1e-4)


def test_fisher_with_gradient_checkpointing_equals_without():
    calib = data()
    plain = score(tiny_model("gemma"), calib, progress=False)
    checkpointed = score(tiny_model("gemma"), calib, progress=False, gradient_checkpointing=True)
    assert checkpointed.settings["gradient_checkpointing"] is True
    assert checkpointed.zeta2 == pytest.approx(plain.zeta2, rel=1e-5)
