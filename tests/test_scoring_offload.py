"""accelerate placement: resident device maps and offloaded weights score like one device.

A ``max_memory`` cap below the model's size makes accelerate offload blocks to disk (their
weights stay on ``meta`` and are streamed in for each forward); the taps rebuild those
weights' gradients from the layers' inputs and output gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import sample_text, save_tiny_model

from cwca_export.loading import load_model
from cwca_export.scoring import score

OFFLOAD = dict(device_map="auto", max_memory={"cpu": "200KiB"})
KWARGS = dict(num_samples=4, seq_len=16, progress=False)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return str(save_tiny_model("llama", tmp_path_factory.mktemp("offload") / "llama", num_hidden_layers=4))


def _text():
    return [sample_text() * 4]


def _assert_same(placed, reference):
    np.testing.assert_allclose(placed.zeta2, reference.zeta2, rtol=1e-4)
    assert set(placed.stats) == set(reference.stats)
    for name, values in reference.stats.items():
        np.testing.assert_allclose(placed.stats[name], values, rtol=1e-4, atol=1e-12, err_msg=name)


def test_the_cap_offloads_most_blocks_to_disk(llama_dir):
    net, _ = load_model(llama_dir, **OFFLOAD)
    placement = net.hf_device_map
    assert [placement[f"model.layers.{i}"] for i in range(2, 4)] == ["disk", "disk"]
    assert net.model.layers[3].mlp.up_proj.weight.device.type == "meta"


def test_device_map_with_resident_weights_matches(llama_dir):
    reference = score(llama_dir, _text(), method="gradnorm", **KWARGS)
    placed = score(llama_dir, _text(), method="gradnorm", device_map="auto", max_memory={"cpu": "1GiB"}, **KWARGS)
    np.testing.assert_allclose(placed.zeta2, reference.zeta2, rtol=1e-5)


@pytest.mark.parametrize("method", ["fisher", "gradnorm", "obd", "kfac", "layerif", "owl"])
@pytest.mark.filterwarnings("ignore:weights are offloaded but gradient checkpointing is off")
def test_offloaded_weights_score_like_resident_ones(llama_dir, method):
    reference = score(llama_dir, _text(), method=method, **KWARGS)
    offloaded = score(llama_dir, _text(), method=method, **OFFLOAD, **KWARGS)
    _assert_same(offloaded, reference)
    assert all(z > 0 for z in offloaded.zeta2[2:]) or method == "layerif"


@pytest.mark.parametrize("method", ["fisher", "kfac"])
def test_offloaded_weights_with_gradient_checkpointing(llama_dir, method):
    reference = score(llama_dir, _text(), method=method, **KWARGS)
    offloaded = score(llama_dir, _text(), method=method, gradient_checkpointing=True, **OFFLOAD, **KWARGS)
    _assert_same(offloaded, reference)


def test_offloaded_gpt2_conv1d_weights(tmp_path):
    model_dir = str(save_tiny_model("gpt2", tmp_path / "gpt2", num_hidden_layers=4))
    assert load_model(model_dir, **OFFLOAD)[0].hf_device_map["transformer.h.3"] == "disk"
    reference = score(model_dir, _text(), method="fisher", **KWARGS)
    with pytest.warns(UserWarning, match="gradient checkpointing is off"):  # offload without it: warned
        offloaded = score(model_dir, _text(), method="fisher", **OFFLOAD, **KWARGS)
    _assert_same(offloaded, reference)


@pytest.mark.parametrize(
    ("method", "reason"), [("exact", "Hessian-vector products"), ("damage", "deep-copies")]
)
def test_methods_that_need_resident_weights_refuse_offload(llama_dir, method, reason):
    with pytest.raises(ValueError, match=f"cannot score offloaded weights.*{reason}.*raise max_memory") as err:
        score(llama_dir, _text(), method=method, **OFFLOAD, **KWARGS)
    assert "\n" not in str(err.value)
