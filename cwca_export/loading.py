"""Load a causal LM for scoring: a local checkpoint folder or a model already in memory.

Loading is local only (``local_files_only=True``): the scorer runs where models are packaged,
often without network, and a Hub id that silently downloads gigabytes is not what a CI job
wants. Offload goes through accelerate's ``device_map`` / ``max_memory``, as
``from_pretrained`` implements it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map ``"float32" | "bfloat16" | "float16"`` (or a torch dtype) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype}: choose one of {sorted(DTYPES)}")
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}") from None


def is_compressed_folder(path: str | os.PathLike) -> bool:
    """True for a folder written after ``cwca_export.compress`` (its config records the shapes)."""
    import json

    config = Path(path) / "config.json"
    return config.is_file() and "cwca_compression" in json.loads(config.read_text(encoding="utf-8"))


def load_model(
    path_or_model: str | os.PathLike | nn.Module,
    *,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    gradient_checkpointing: bool = False,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local folder, or take a loaded model as is.

    Args:
        path_or_model: a checkpoint folder (``config.json`` + safetensors weights) or a
            ``PreTrainedModel``, returned unchanged apart from gradient checkpointing.
        dtype: weight dtype when loading from a folder.
        trust_remote_code: allow the folder's own modelling code; only when asked.
        device_map: accelerate placement, e.g. ``"auto"`` or ``{"": "cpu"}``, for models
            larger than one device (``max_memory`` caps each device).
        max_memory: per-device memory caps for ``device_map="auto"``, e.g. ``{"cpu": "8GiB"}``.
        gradient_checkpointing: recompute block activations in the backward pass.

    Returns:
        ``(model, tokenizer)``; the tokenizer is None when the folder has none or a model
        object was passed.

    Example:
        >>> model, tokenizer = load_model("models/tiny-llama", dtype="bfloat16")  # doctest: +SKIP
    """
    tokenizer = None
    if isinstance(path_or_model, nn.Module):
        model = path_or_model
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path_or_model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: not a local model folder (no config.json); hint: save the model with"
                " save_pretrained, or download it first: scoring never fetches from the Hub"
            )
        if is_compressed_folder(path):
            # per-block shapes differ from the config's: from_pretrained cannot rebuild them
            from cwca_export.compression.saving import load_compressed

            if device_map is not None or max_memory is not None:
                raise ValueError("device_map / max_memory: a compressed folder loads on one device")
            model = load_compressed(path, dtype=dtype, trust_remote_code=trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=resolve_dtype(dtype),
                trust_remote_code=trust_remote_code,
                device_map=device_map,
                max_memory=max_memory,
                local_files_only=True,
            )
        if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(
                path, trust_remote_code=trust_remote_code, local_files_only=True
            )
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
        # Non-reentrant checkpointing lets gradients reach weights when inputs need none.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()  # scoring never wants dropout
    return model, tokenizer
