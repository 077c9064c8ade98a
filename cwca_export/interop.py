"""Plans written in other libraries' formats: peft LoRA configs and llm-compressor recipes.

An allocation plan gives block k a number of capacity units e_k; as LoRA ranks for recovery
fine-tuning that is r_k = e_k * rank_step on every Linear of the block, which peft reads from
``LoraConfig.rank_pattern`` (and ``alpha_pattern``, kept at alpha = ratio * r so every block's
update has the same scale alpha / r). A pruning plan's per-block sparsity rho_k is what
llm-compressor's ``SparseGPTModifier`` / ``WandaPruningModifier`` take as a ``sparsity`` list,
one entry per target layer, when the targets are the decoder blocks.

A recipe file ends with a comment stamping the sha256 of the lines above it
(:func:`recipe_file_intact`), so a rerun replaces it only while it is exactly as written.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from cwca_export.jsonio import trailing_stamp, write_bytes_atomic
from cwca_export.planning.plan import Plan

LLMCOMPRESSOR_MODIFIERS = ("SparseGPTModifier", "WandaPruningModifier")


def block_linear_names(model_path: str | os.PathLike) -> list[list[str]]:
    """Full module names of every block's Linear-like layers, from a folder's config alone.

    The model is built on the meta device, so no weights are read.

    Example:
        >>> import tempfile
        >>> from transformers import LlamaConfig
        >>> config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     config.save_pretrained(folder)
        ...     names = block_linear_names(folder)
        >>> names[1][:2]
        ['model.layers.1.self_attn.q_proj', 'model.layers.1.self_attn.k_proj']
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cwca_export.blocks import find_blocks

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a local model folder (no config.json); hint: --model MODEL_DIR")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [list(block.linears) for block in find_blocks(model)]


def lora_ranks(plan: Plan, rank_step: int) -> list[int]:
    """Per-block LoRA rank r_k = e_k * rank_step of an allocation plan.

    Example:
        >>> p = Plan("allocate", x=[3.0, 0.0], q=[1.0, 1.0], n_params=[10, 10], lo=[0, 0],
        ...          hi=[8, 8], block_names=["model.layers.0", "model.layers.1"], cost=[1.0, 1.0])
        >>> lora_ranks(p, 4)
        [12, 0]
    """
    if plan.program != "allocate":
        raise ValueError("a LoRA config comes from an allocation plan; hint: --program allocate")
    if rank_step < 1:
        raise ValueError(f"rank step {rank_step}: must be >= 1; hint: --rank-step 8")
    ranks = []
    for name, units in zip(plan.block_names, plan.x, strict=True):
        if units < 0 or not float(units).is_integer():
            raise ValueError(
                f"{name}: {units:g} units is not a whole rank count; hint: plan with --integer"
            )
        ranks.append(int(units) * rank_step)
    return ranks


def lora_config_kwargs(
    plan: Plan, linear_names: list[list[str]], *, rank_step: int, alpha_ratio: float = 2.0
) -> dict[str, Any]:
    """``LoraConfig`` arguments giving every Linear of block k rank r_k (blocks with 0: none).

    ``target_modules`` lists the adapted Linears by full name; ``rank_pattern`` and
    ``alpha_pattern`` have one regex key per block (``model\\.layers\\.3\\..*``) that peft matches
    against module names; ``r`` / ``lora_alpha`` are the largest block's, for the record.
    """
    if len(linear_names) != plan.num_blocks:
        raise ValueError(
            f"the plan has {plan.num_blocks} blocks, the model {len(linear_names)};"
            " hint: --model the folder the scores were made from"
        )
    ranks = lora_ranks(plan, rank_step)
    if not any(ranks):
        budget = plan.parameters.get("budget")
        if budget is not None and min(plan.cost or [1.0]) > budget:
            raise ValueError("the plan gives every block 0 units: no LoRA modules; hint: raise --budget")
        # the budget was slack: no block's first unit gains more than it costs (docs/design.md 2.3)
        raise ValueError(
            "the plan gives every block 0 units, within its budget: at these qualities no unit gains"
            " more than it costs; hint: --lo 1 (units every block keeps) or a larger --gamma"
        )
    targets, rank_pattern, alpha_pattern = [], {}, {}
    for name, rank, linears in zip(plan.block_names, ranks, linear_names, strict=True):
        if rank == 0:
            continue
        targets.extend(linears)
        key = re.escape(name) + r"\..*"
        rank_pattern[key] = rank
        alpha_pattern[key] = alpha_ratio * rank
    top = max(ranks)
    return {
        "r": top,
        "lora_alpha": alpha_ratio * top,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "task_type": "CAUSAL_LM",
    }


def write_peft_config(
    plan: Plan,
    out_dir: str | os.PathLike,
    *,
    model_path: str | os.PathLike,
    rank_step: int,
    alpha_ratio: float = 2.0,
) -> Path:
    """Write ``out_dir/adapter_config.json`` with peft's own ``LoraConfig.save_pretrained``.

    The file appears whole or not at all. A folder that already holds adapter weights is
    refused: its config belongs to them.
    """
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError(
            "--peft-config needs peft; hint: pip install -c constraints.txt 'cwca-export[peft]'"
        ) from None
    out = Path(out_dir)
    weights = [p.name for p in out.glob("adapter_model.*")] if out.is_dir() else []
    if weights:
        raise FileExistsError(
            f"{out} holds adapter weights ({weights[0]}); its config belongs to them;"
            " hint: --peft-config NEW_DIR"
        )
    config = LoraConfig(**lora_config_kwargs(plan, block_linear_names(model_path), rank_step=rank_step,
                                             alpha_ratio=alpha_ratio))
    with tempfile.TemporaryDirectory() as scratch:
        config.save_pretrained(scratch)
        data = (Path(scratch) / "adapter_config.json").read_bytes()
    return write_bytes_atomic(out / "adapter_config.json", data)


def llmcompressor_recipe(plan: Plan, *, modifier: str = "SparseGPTModifier", mask_structure: str = "0:0") -> dict:
    """An llm-compressor recipe applying a pruning plan's per-block sparsity, one per block.

    ``targets`` selects exactly the plan's decoder blocks (one anchored regex), so the
    modifier's ``sparsity`` list lines up with them in model order; each block's Linears are
    pruned to that block's rho_k. ``lm_head`` is ignored, as the plan never prunes it.

    Example:
        >>> p = Plan("prune", x=[0.3, 0.7], q=[1.0, 1.0], n_params=[10, 10], lo=[0, 0],
        ...          hi=[1, 1], block_names=["model.layers.0", "model.layers.1"])
        >>> stage = llmcompressor_recipe(p)["sparsity_stage"]["sparsity_modifiers"]
        >>> stage["SparseGPTModifier"]["sparsity"], stage["SparseGPTModifier"]["targets"]
        ([0.3, 0.7], ['re:^model\\\\.layers\\\\.\\\\d+$'])
    """
    if plan.program != "prune":
        raise ValueError("an llm-compressor sparsity recipe comes from a pruning plan; hint: --program prune")
    if modifier not in LLMCOMPRESSOR_MODIFIERS:
        raise ValueError(f"modifier {modifier!r}: choose one of {', '.join(LLMCOMPRESSOR_MODIFIERS)}")
    parents = {name.rpartition(".")[0] for name in plan.block_names}
    if len(parents) != 1 or any(not name.rpartition(".")[2].isdigit() for name in plan.block_names):
        raise ValueError(f"blocks {plan.block_names[:2]}...: not one list of numbered decoder blocks")
    (parent,) = parents
    args = {
        "sparsity": [round(float(x), 6) for x in plan.x],
        "mask_structure": mask_structure,
        "targets": [f"re:^{re.escape(parent)}\\.\\d+$"],
        "ignore": ["re:.*lm_head"],
    }
    return {"sparsity_stage": {"sparsity_modifiers": {modifier: args}}}


def write_llmcompressor_recipe(plan: Plan, path: str | os.PathLike, *, modifier: str = "SparseGPTModifier",
                               mask_structure: str = "0:0") -> Path:
    """Write :func:`llmcompressor_recipe` as YAML, atomically."""
    import yaml

    recipe = llmcompressor_recipe(plan, modifier=modifier, mask_structure=mask_structure)
    header = (
        f"# per-block sparsity from a cwca-export plan (global {plan.global_sparsity:.4f});\n"
        "# apply with llmcompressor.oneshot(model=..., dataset=..., recipe=THIS_FILE)\n"
    )
    body = (header + yaml.safe_dump(recipe, sort_keys=False)).encode("utf-8")
    stamp = b"# cwca-export stamp: sha256 %s\n" % hashlib.sha256(body).hexdigest().encode()
    return write_bytes_atomic(path, body + stamp)


_RECIPE_STAMP = re.compile(rb"# cwca-export stamp: sha256 ([0-9a-f]{64})\n")


def recipe_file_intact(path: str | os.PathLike) -> bool:
    """True when ``path`` is a recipe :func:`write_llmcompressor_recipe` wrote and nobody edited since."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return False
    return trailing_stamp(data, _RECIPE_STAMP) is not None
