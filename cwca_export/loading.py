"""Load a causal LM for scoring: a local checkpoint folder or a model already in memory.

Loading is local only (``local_files_only=True``): the scorer runs where models are packaged,
often without network, and a Hub id that silently downloads gigabytes is not what a CI job
wants. Offload goes through accelerate's ``device_map`` / ``max_memory``, as
``from_pretrained`` implements it.

Every folder passes :func:`check_model_folder` first, the one gate of what the tool accepts:
no folder code without ``--trust-remote-code``, no pickle weights without ``--allow-pickle``,
only causal LMs, intact ``config.json`` and safetensors headers, and lengths within the
model's positions. Its errors are one line naming the file and the flag that fixes it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cwca_export.dtypes import resolve_dtype

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# config keys that give the longest sequence a model's position embeddings cover, by family
POSITION_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "n_ctx",
    "seq_length",
)


class ModelFolderError(ValueError):
    """A model folder the tool refuses; the message names the file and the flag that fixes it."""


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; truncated, non-UTF-8 or non-object files fail with one line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ModelFolderError(
            f"{path}: not UTF-8 text (byte {exc.start}); the file is damaged"
        ) from None
    except json.JSONDecodeError as exc:
        raise ModelFolderError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); the file is truncated or damaged"
        ) from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a local model folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: not a local model folder (it does not exist; the tool never fetches from the Hub)"
        )
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"{path}: not a local model folder (no config.json); pass a folder written by"
            " save_pretrained (the tool never fetches from the Hub)"
        )
    return read_json_object(config)


def stored_dtype(path: str | os.PathLike, *, allow_pickle: bool = False) -> str:
    """The one float dtype every floating tensor of a folder's safetensors files is stored in
    (``"bfloat16"``, ``"float16"`` or ``"float32"``), read from the files' headers.

    ``"float32"`` for mixed storage (bfloat16 matrices beside float32 norms; stored rotary
    ``inv_freq`` tables aside), any other float width, or pickle weights: loading those in a
    half dtype would round what the files hold.
    config.json's ``dtype`` / ``torch_dtype`` is not consulted: it is a claim (often copied from
    the upstream model) that the weights need not match."""
    from safetensors import safe_open

    files = weight_files(path, allow_pickle=allow_pickle)
    stored: set[str] = set()
    for file in files:
        if file.suffix != ".safetensors":
            return "float32"
        with safe_open(str(file), framework="pt") as handle:  # the header only: nothing is read
            # rotary tables older conversions stored (float32): transformers recomputes them, never reads them
            names = [name for name in handle.keys() if not name.endswith(".inv_freq")]  # noqa: SIM118 (not a dict)
            stored.update(handle.get_slice(name).get_dtype() for name in names)
    floats = {code for code in stored if code.startswith(("F", "BF"))}
    return {frozenset({"BF16"}): "bfloat16", frozenset({"F16"}): "float16"}.get(frozenset(floats), "float32")


def is_compressed_folder(path: str | os.PathLike) -> bool:
    """True for a folder written after ``cwca_export.compress`` (its config records the shapes)."""
    config = Path(path) / "config.json"
    return config.is_file() and "cwca_compression" in read_json_object(config)


def remote_code_files(path: str | os.PathLike) -> list[str]:
    """The files of ``path`` that ask transformers to import the folder's own Python code."""
    path = Path(path)
    asking = []
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
        file = path / name
        if file.is_file() and read_json_object(file).get("auto_map"):
            asking.append(name)
    return asking


def check_remote_code(path: str | os.PathLike, trust_remote_code: bool) -> None:
    """Refuse a folder that ships its own modelling or tokenizer code unless it is trusted."""
    asking = remote_code_files(path)
    if asking and not trust_remote_code:
        raise ModelFolderError(
            f"{Path(path) / asking[0]}: the folder ships its own Python code (auto_map) and"
            " nothing runs it unless you allow it; hint: pass --trust-remote-code if you trust it"
        )


def check_causal(
    config: dict[str, Any], source: str | os.PathLike, *, trust_remote_code: bool = False
) -> str:
    """The architecture name, when ``config`` describes a decoder-only causal LM; else refuse.

    Decided by ``architectures`` (one of them must be a class AutoModelForCausalLM builds) or,
    when a config names none, by ``model_type`` (a causal type that is not an encoder family).
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if config.get("auto_map") and trust_remote_code:
        if "AutoModelForCausalLM" not in config["auto_map"]:
            raise ModelFolderError(
                f"{source}: its own code has no AutoModelForCausalLM (auto_map has"
                f" {sorted(config['auto_map'])}); cwca-export handles causal LMs only"
            )
        return archs[0] if archs else str(model_type)
    causal: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update([value] if isinstance(value, str) else value)
    if archs:
        known = [a for a in archs if a in causal]
        if not known:
            raise ModelFolderError(
                f"{source}: {archs[0]} is not a causal language model that transformers"
                " builds with AutoModelForCausalLM (encoder-only, seq2seq and classifier models"
                " get a random LM head); cwca-export handles decoder-only causal LMs"
            )
        return known[0]
    if (
        model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        or config.get("is_encoder_decoder")
    ):
        raise ModelFolderError(
            f"{source}: model_type {model_type!r} (no architectures listed) is not a decoder-only"
            " causal LM; cwca-export handles decoder-only causal LMs"
        )
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def _check_safetensors(file: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except Exception as exc:  # the Rust SafetensorError has no stable Python base class
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFolderError(
            f"{file}: not a readable safetensors file ({detail}); the file is truncated or damaged"
        ) from None


def weight_files(path: str | os.PathLike, *, allow_pickle: bool = False) -> list[Path]:
    """The weight files a load will read: safetensors (headers checked), or pickle when allowed."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFolderError(f"{index}: no weight_map; the index is damaged")
        files = [path / name for name in sorted(set(map(str, weight_map.values())))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFolderError(
                f"{index}: names {missing[0]}, which is not in the folder; the checkpoint is incomplete"
            )
    else:
        files = sorted(path.glob("*.safetensors"))
    if files:
        for file in files:
            _check_safetensors(file)
        return files
    pickles = sorted(f for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
    if pickles and not allow_pickle:
        raise ModelFolderError(
            f"{pickles[0]}: pickle weights can run code when loaded and are refused; hint: convert"
            " them to safetensors, or pass --allow-pickle if you trust the file"
        )
    if not pickles:
        raise ModelFolderError(
            f"{path}: no weights (*.safetensors) in the folder; the tool never builds a model from"
            " its name or config alone"
        )
    return pickles


def max_positions(config: dict[str, Any]) -> tuple[str, int] | None:
    """(key, value) of the longest sequence the config's position embeddings cover, if it says."""
    for key in POSITION_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


def check_lengths(
    config: dict[str, Any], source: str | os.PathLike, lengths: dict[str, int | None]
) -> None:
    """Refuse a length (``{"--seq-len": 512}``) beyond the model's position embeddings."""
    limit = max_positions(config)
    if limit is None:
        return
    key, value = limit
    for flag, length in lengths.items():
        if length is not None and length > value:
            raise ModelFolderError(
                f"{flag} {length} is longer than {source}'s {key} ({value}); hint: set {flag} to {value} or less"
            )


def check_model_folder(
    path: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    weights: bool = True,
    lengths: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """Check that the tool can handle the model folder at ``path``; return its config.

    Args:
        path: a local checkpoint folder.
        trust_remote_code: allow a folder whose config or tokenizer names its own code.
        allow_pickle: accept ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` weights when there are
            no safetensors (loading pickle can run code).
        weights: also require weights (off only where nothing but the config is read, and a
            folder's shapes are all that is wanted).
        lengths: sequence lengths by CLI flag, each checked against the model's positions.

    Raises:
        FileNotFoundError: no folder, or no config.json in it.
        ModelFolderError: anything else; one line naming the file at fault and the fix.
    """
    path = Path(path)
    config = read_config(path)
    check_remote_code(path, trust_remote_code)
    check_causal(config, path / "config.json", trust_remote_code=trust_remote_code)
    if weights:
        weight_files(path, allow_pickle=allow_pickle)
    check_lengths(config, path, lengths or {})
    return config


def load_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool = False) -> Any:
    """The folder's tokenizer, or None when it has none; a damaged one fails with one line."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    check_remote_code(path, trust_remote_code)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (path / name).is_file():
            read_json_object(path / name)
    try:
        return AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except Exception as exc:  # tokenizers raises its own classes with messages that name no file
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFolderError(f"{path}: the tokenizer does not load ({detail})") from None


def load_model(
    path_or_model: str | os.PathLike | nn.Module,
    *,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
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
        allow_pickle: accept pickle weights (``.bin`` ...) when the folder has no safetensors.
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
        from transformers import AutoModelForCausalLM

        path = Path(path_or_model)
        check_model_folder(path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        if is_compressed_folder(path):
            # per-block shapes differ from the config's: from_pretrained cannot rebuild them
            from cwca_export.compression.saving import load_compressed

            if device_map is not None or max_memory is not None:
                raise ValueError(
                    "--device-map / --max-memory: a compressed folder loads on one device; drop them"
                )
            model = load_compressed(path, dtype=dtype, trust_remote_code=trust_remote_code)
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    path,
                    dtype=resolve_dtype(dtype),
                    trust_remote_code=trust_remote_code,
                    use_safetensors=None if allow_pickle else True,
                    device_map=device_map,
                    max_memory=max_memory,
                    local_files_only=True,
                )
            except Exception as exc:  # safetensors' SafetensorError has no importable base to catch
                if max_memory is None or "device disk is invalid" not in str(exc):
                    raise
                caps = " ".join(f"{k}={v}" for k, v in max_memory.items())
                raise ValueError(
                    f"{path}: --device-memory {caps} (bytes) places the whole model on disk, and transformers"
                    " cannot load a model with nothing in memory (safetensors: 'device disk is invalid');"
                    " hint: raise --device-memory to hold at least the input embeddings (vocabulary x hidden x"
                    " bytes per weight) or drop --device-map") from None
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"--gradient-checkpointing: {type(model).__name__} does not support it; drop the flag"
            )
        # Non-reentrant checkpointing lets gradients reach weights when inputs need none.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()  # scoring never wants dropout
    log.debug("loaded %s (%s, %s parameters, dtype %s)", getattr(model, "name_or_path", "") or "a model",
              type(model).__name__, f"{sum(p.numel() for p in model.parameters()):,}", next(model.parameters()).dtype)
    return model, tokenizer
