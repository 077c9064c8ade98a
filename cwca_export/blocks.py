"""Decoder-block discovery: which modules are "block k" and which of their layers are prunable.

A block is one entry of the model's ModuleList of decoder layers; its prunable parameters are
the weights of its Linear-like children (``nn.Linear`` and GPT-2's ``Conv1D``). Fused layouts
(Phi-3 ``qkv_proj`` / ``gate_up_proj``) are single Linears here. Embeddings, norms and
``lm_head`` are never part of a block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class BlockDiscoveryError(ValueError):
    """The model's decoder blocks or their Linear layers could not be mapped."""


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2 stores W transposed)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an ``(out, in)`` view, whatever layout the module stores.

    ``nn.Linear`` stores ``(out, in)``; GPT-2's ``Conv1D`` stores ``(in, out)`` and computes
    ``x @ W``. Curvature code (K-FAC's ``G dW A``) needs one convention.
    """
    return module.weight.t() if is_conv1d(module) else module.weight


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2 family), whose weight is stored ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


@dataclass(frozen=True)
class Block:
    """One decoder block: its module path, the module, and its Linear-like layers by path."""

    index: int
    name: str
    module: nn.Module
    linears: dict[str, nn.Module]

    @property
    def n_params(self) -> int:
        """Prunable weights n_k: the weight entries of the block's Linear-like layers."""
        return sum(m.weight.numel() for m in self.linears.values())


_KNOWN_BLOCK_LISTS = (
    "model.layers",  # Llama, Mistral, Qwen2, Phi-3, Gemma
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",  # GPT-NeoX, Pythia
)


def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    modules = dict(model.named_modules())
    for path in _KNOWN_BLOCK_LISTS:
        found = modules.get(path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return path, found
    # Generic rule: the longest ModuleList of identical block classes that hold Linears.
    candidates = [
        (path, mod)
        for path, mod in modules.items()
        if isinstance(mod, nn.ModuleList)
        and len(mod) > 0
        and len({type(child) for child in mod}) == 1
        and any(is_linear_like(m) for m in mod[0].modules())
    ]
    if not candidates:
        raise BlockDiscoveryError(
            f"{type(model).__name__}: found no ModuleList of decoder blocks with Linear layers;"
            " hint: cwca-export supports Llama, Mistral, Qwen2, GPT-2, Phi-3 and Gemma layouts"
        )
    return max(candidates, key=lambda item: len(item[1]))


def find_blocks(model: nn.Module) -> list[Block]:
    """Map a causal LM's decoder blocks and their Linear-like layers.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
        >>> [b.name for b in find_blocks(LlamaForCausalLM(cfg))]
        ['model.layers.0', 'model.layers.1']
    """
    path, blocks = _block_list(model)
    result = []
    for i, block in enumerate(blocks):
        linears = {
            f"{path}.{i}.{name}": mod for name, mod in block.named_modules() if is_linear_like(mod)
        }
        if not linears:
            raise BlockDiscoveryError(f"{path}.{i}: block has no Linear-like layers to score")
        result.append(Block(index=i, name=f"{path}.{i}", module=block, linears=linears))
    return result


def block_param_counts(model: nn.Module) -> list[int]:
    """n_k for every block, in block order."""
    return [b.n_params for b in find_blocks(model)]


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """A stable hash of a model's structure and a strided sample of its weights.

    It reads at most 16 values per tensor, so it is cheap on a 7B model, yet two checkpoints
    of one architecture (or a pruned copy) get different fingerprints.
    """
    import hashlib

    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if tensor.numel() and tensor.device.type != "meta":
            flat = tensor.reshape(-1)
            step = max(1, flat.numel() // 16)
            sample = flat[::step][:16].detach().to("cpu", torch.float64)
            digest.update(sample.numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:32]
