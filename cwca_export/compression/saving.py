"""Save a compressed model as a Hugging Face folder and rebuild it from that folder.

The per-block shapes live in ``config.json`` under ``cwca_compression``::

    "cwca_compression": {
      "schema_version": 1,
      "blocks": [                                   # one entry per decoder block, in order
        {"index": 0, "name": "model.layers.0",
         "intermediate_size": 48,                   # MLP channels (absent: unknown layout)
         "num_attention_heads": 4,                  # query heads  (absent: unknown layout)
         "num_key_value_heads": 2,                  # KV heads
         "factorised": {"self_attn.q_proj": 16}},   # Linear (relative path) -> rank
        ...
      ],
      "steps": [{"method": "width", "options": {...}, "plan": {...}, "blocks": [...], ...}]
    }

``blocks`` is read back from the model's modules at save time, so it describes the tensors
whatever produced them; ``steps`` is the history of :func:`cwca_export.compress` calls with
their per-block reports. A factorised Linear is ``Sequential(Linear(in, r), Linear(r, out))``
(weights ``<path>.0.weight`` and ``<path>.1.weight``/``bias`` in the safetensors files).
Plain ``from_pretrained`` cannot read such a folder (its shapes differ from the config's);
:func:`load_compressed` builds the dense skeleton without allocating weights, narrows and
factorises it to the recorded shapes, then loads the tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cwca_export.blocks import find_blocks, is_linear_like
from cwca_export.compression import lowrank, width

COMPRESSION_KEY = "cwca_compression"
SCHEMA_VERSION = 1


def _is_factorised(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Sequential)
        and len(module) == 2
        and all(is_linear_like(m) for m in module)
    )


def describe_structure(model: nn.Module) -> list[dict[str, Any]]:
    """Per-block shapes read from the model's modules (the ``blocks`` list of the schema)."""
    rows = []
    for block in find_blocks(model):
        module = block.module
        row: dict[str, Any] = {"index": block.index, "name": block.name}
        # a layout we cannot narrow is never narrowed: nothing to record for it
        with contextlib.suppress(width.LayoutError):
            row["intermediate_size"] = width.mlp_layout(module, block.name).width(module)
        with contextlib.suppress(width.LayoutError):
            attention = width.attention_layout(module)
            row["num_attention_heads"], row["num_key_value_heads"] = attention.heads(module)
        row["factorised"] = {
            name: m[0].out_features
            for name, m in module.named_modules()
            if name and _is_factorised(m)
        }
        rows.append(row)
    return rows


def compression_record(model: nn.Module) -> dict[str, Any]:
    """The model's ``cwca_compression`` entry with ``blocks`` refreshed from its modules."""
    previous = getattr(model.config, COMPRESSION_KEY, None) or {}
    return {
        "schema_version": SCHEMA_VERSION,
        "blocks": describe_structure(model),
        "steps": list(previous.get("steps", [])),
    }


def record_step(model: nn.Module, step: dict[str, Any]) -> None:
    """Append one compression step to ``model.config.cwca_compression``, in place."""
    record = compression_record(model)
    record["steps"].append(step)
    setattr(model.config, COMPRESSION_KEY, record)


def save_compressed(
    model: nn.Module, out_dir: str | os.PathLike, *, tokenizer: Any = None, overwrite: bool = False
) -> Path:
    """Write ``model`` (and ``tokenizer``) as a safetensors folder, atomically.

    The folder is built beside ``out_dir`` and renamed into place when complete, so
    ``out_dir`` is never half-written.

    Example:
        >>> save_compressed(model, "out/llama-width")  # doctest: +SKIP
    """
    from cwca_export.atomic import Staging

    setattr(model.config, COMPRESSION_KEY, compression_record(model))
    with Staging(out_dir, overwrite=overwrite) as staging:
        folder = staging.new_folder()
        model.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        return staging.commit(folder)


def is_compressed_folder(path: str | os.PathLike) -> bool:
    """True when ``path/config.json`` carries a ``cwca_compression`` entry."""
    config = Path(path) / "config.json"
    return config.is_file() and COMPRESSION_KEY in json.loads(config.read_text(encoding="utf-8"))


def apply_structure(model: nn.Module, blocks: list[dict[str, Any]]) -> None:
    """Narrow and factorise a dense model's blocks to the recorded shapes, in place.

    Weights kept are the first channels / heads; the caller loads the real tensors after.
    """
    found = find_blocks(model)
    if len(found) != len(blocks):
        raise ValueError(
            f"{COMPRESSION_KEY}: records {len(blocks)} blocks, the model has {len(found)}"
        )
    for block, row in zip(found, blocks, strict=True):
        module = block.module
        if "intermediate_size" in row:
            mlp = width.mlp_layout(module, block.name)
            if mlp.width(module) != row["intermediate_size"]:
                mlp.narrow(module, torch.arange(row["intermediate_size"]))
        if "num_key_value_heads" in row:
            attn = width.attention_layout(module, block.name)
            n_q, n_kv = attn.heads(module)
            if (n_q, n_kv) != (row["num_attention_heads"], row["num_key_value_heads"]):
                if attn.refuse:
                    raise width.LayoutError(f"{block.name}: {attn.refuse}")
                attn.narrow(module, torch.arange(row["num_key_value_heads"]))
        for rel, rank in row.get("factorised", {}).items():
            linear = module.get_submodule(rel)
            out_features, in_features = width.features(linear)
            new = lowrank.make_factorised(
                in_features,
                out_features,
                int(rank),
                bias=linear.bias is not None,
                dtype=linear.weight.dtype,
                device=linear.weight.device,
            )
            parent_path, _, child = rel.rpartition(".")
            setattr(module.get_submodule(parent_path) if parent_path else module, child, new)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors (or index) to load")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(path / shard))
    return state


def load_compressed(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed` (or ``save_pretrained`` after compress).

    Args:
        path: the folder (``config.json`` with ``cwca_compression`` + safetensors).
        dtype: convert the weights to this dtype; None keeps the saved dtype.
        device: where the model goes.
        trust_remote_code: allow the folder's own modelling code.

    Returns:
        The causal LM in eval mode, with the saved per-block shapes and weights.

    Example:
        >>> model = load_compressed("out/llama-width")  # doctest: +SKIP
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from cwca_export.dtypes import resolve_dtype

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model folder (no config.json)")
    config = AutoConfig.from_pretrained(
        path, trust_remote_code=trust_remote_code, local_files_only=True
    )
    record = getattr(config, COMPRESSION_KEY, None)
    if not isinstance(record, dict):
        raise ValueError(
            f"{path}: config.json has no {COMPRESSION_KEY!r} entry; hint: a dense checkpoint"
            " loads with cwca_export.loading.load_model or from_pretrained"
        )
    if record.get("schema_version", 0) > SCHEMA_VERSION:
        raise ValueError(
            f"{path}: {COMPRESSION_KEY} schema_version {record['schema_version']} is newer than"
            f" this cwca-export supports ({SCHEMA_VERSION}); hint: pip install -U cwca-export"
        )
    with init_empty_weights():  # parameters on the meta device: nothing is allocated or initialised
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    apply_structure(model, record["blocks"])
    state = _read_state_dict(path)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"{path}: weights not in the rebuilt model: {result.unexpected_keys[:5]}")
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"{path}: the safetensors files lack {missing[:5]}")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    if dtype is not None:
        target = resolve_dtype(dtype)
        # converted only when a parameter differs: buffers the model built itself (the rotary inv_freq
        # table, float32) stay as from_pretrained keeps them when the folder already holds ``dtype``
        if any(p.is_floating_point() and p.dtype != target for p in model.parameters()):
            model.to(dtype=target)
        model.config.dtype = target  # what from_pretrained records for the dtype it loaded in
    model.to(device=device)
    return model.eval()
