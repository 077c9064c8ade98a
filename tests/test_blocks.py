"""Block discovery and loading on a tiny model of every supported family."""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, save_tiny_model, tiny_model
from torch import nn

from cwca_export.blocks import BlockDiscoveryError, find_blocks, is_conv1d, weight_out_in
from cwca_export.loading import load_model

# Linear layers per block as transformers 4.57 lays them out (relative to the block).
EXPECTED = {
    "llama": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "phi3": {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"},
}
EXPECTED["mistral"] = EXPECTED["qwen2"] = EXPECTED["gemma"] = EXPECTED["llama"]
BLOCK_LIST = {"gpt2": "transformer.h"}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_maps_its_blocks_and_linears(family):
    model = tiny_model(family, num_hidden_layers=3)
    blocks = find_blocks(model)
    prefix = BLOCK_LIST.get(family, "model.layers")
    assert [b.name for b in blocks] == [f"{prefix}.{i}" for i in range(3)]
    for block in blocks:
        assert {n.removeprefix(block.name + ".") for n in block.linears} == EXPECTED[family]
        # n_k counts exactly the weights of those layers, nothing else of the block
        assert block.n_params == sum(
            p.numel() for n, p in block.module.named_parameters() if n.removesuffix(".weight") in EXPECTED[family]
        )


def test_gpt2_conv1d_weights_are_seen_out_by_in():
    block = find_blocks(tiny_model("gpt2"))[0]
    c_fc = block.linears["transformer.h.0.mlp.c_fc"]
    assert is_conv1d(c_fc) and tuple(c_fc.weight.shape) == (32, 128)
    x = torch.randn(5, 32)
    assert torch.allclose(c_fc(x), x @ weight_out_in(c_fc).t() + c_fc.bias)


def test_generic_rule_and_clear_error():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList([Layer() for _ in range(3)])

    assert [b.name for b in find_blocks(Net())] == ["stages.0", "stages.1", "stages.2"]
    with pytest.raises(BlockDiscoveryError, match="Sequential: found no ModuleList of decoder blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_load_model_from_a_folder_in_the_requested_dtype(tmp_path):
    path = save_tiny_model("qwen2", tmp_path / "m")
    model, tokenizer = load_model(path, dtype="bfloat16", gradient_checkpointing=True)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.is_gradient_checkpointing and not model.training
    assert tokenizer("hello world")["input_ids"]
    reference = tiny_model("qwen2")
    assert torch.equal(
        model.model.layers[0].mlp.up_proj.weight, reference.model.layers[0].mlp.up_proj.weight.bfloat16()
    )
    with pytest.raises(FileNotFoundError, match="not a local model folder"):
        load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        load_model(path, dtype="int8")
