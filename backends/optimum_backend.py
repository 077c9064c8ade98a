"""The ``optimum`` backend: Optimum's ONNX exporter with KV cache (``text-generation-with-past``).

The folder it writes loads with ``optimum.onnxruntime.ORTModelForCausalLM`` (under ``export
--low-memory`` from the ``onnx`` backend's trace: :meth:`OptimumBackend.weightless_export`). Models the
exporter refuses (no built-in OnnxConfig: Mixtral, Starcoder2) or exports into an artifact
that breaks in ONNX Runtime (Phi-3 with grouped KV heads, docs/design.md 3.3) raise
:class:`UnsupportedModelError` naming ``--backend onnx`` instead of producing a bad artifact.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from cwca_export.backends import UnsupportedModelError, register_backend
from cwca_export.backends.side_files import save_side_files

_TASK = "text-generation-with-past"
_HINT = "hint: use --backend onnx (plain torch.onnx export with KV cache)"


def _known_broken(config: Any) -> str | None:
    """Why Optimum's artifact for this config would fail in ONNX Runtime, if it is a known case."""
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if config.model_type == "phi3" and kv_heads != heads:
        return (
            f"Optimum's Phi-3 export with grouped KV heads ({heads} query, {kv_heads} KV) fails"
            " in ONNX Runtime once past key values are fed"
        )
    return None


def _per_block_heads(config: Any, blocks: Sequence[Any] = ()) -> str | None:
    """Why the model's blocks do not match the config's head counts, if they do not.

    Optimum sizes every layer's KV cache (and the attention reshapes) from the config's
    model-wide head counts, so blocks pruned to their own head counts (width compression with
    ``heads=True``) cannot export through it. Read from the recorded ``cwca_compression`` blocks
    of ``config`` and from the modules of ``blocks`` (layouts the record does not cover).
    """
    from cwca_export.compression.width import LayoutError, attention_layout

    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    rows = [
        (row.get("name", f"block {i}"), row.get("num_attention_heads"), row.get("num_key_value_heads"))
        for i, row in enumerate((getattr(config, "cwca_compression", None) or {}).get("blocks", []))
    ]
    for block in blocks:
        try:
            q, kv = attention_layout(block.module, block.name).heads(block.module)
        except (LayoutError, AttributeError):
            continue
        rows.append((block.name, q, kv))
    for name, q, kv in rows:
        if (kv is not None and kv_heads is not None and kv != kv_heads) or (
            q is not None and heads is not None and q != heads
        ):
            return (
                f"{name} keeps {kv} of {kv_heads} KV heads ({q} of {heads} query heads): Optimum's"
                " export sizes every layer's KV cache from the config, so blocks with their own head"
                " counts (width compression with heads=True) cannot go through it"
            )
    return None


def _without_onnx_config(config: Any) -> str | None:
    """Why Optimum cannot take this model type, if it has no ONNX config for it (Mixtral, Starcoder2)."""
    import optimum.exporters.onnx.model_configs  # noqa: F401 - registers Optimum's ONNX configs
    from optimum.exporters.tasks import TasksManager

    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(config.model_type, exporter="onnx",
                                                                library_name="transformers")
    except KeyError:
        tasks = {}
    if _TASK not in tasks:
        return f"Optimum has no ONNX config for model type {config.model_type!r}"
    return None


@register_backend("optimum")
class OptimumBackend:
    """Optimum ``onnx_export_from_model``; verified again through ``ORTModelForCausalLM``."""

    def config_refusal(self, config: Any) -> str | None:
        """Why this backend would not give a correct artifact for a model of ``config`` (with the
        hint), if it would not: asked before the model loads."""
        reason = _known_broken(config) or _without_onnx_config(config) or _per_block_heads(config)
        return f"{reason}; {_HINT}" if reason else None

    def refusal(self, model: Any) -> str | None:
        """Why this backend would not give a correct artifact for ``model`` (with the hint), if it would not."""
        from cwca_export.blocks import find_blocks

        try:
            blocks = find_blocks(model)
        except ValueError:
            blocks = []
        reason = _per_block_heads(model.config, blocks)
        return self.config_refusal(model.config) or (f"{reason}; {_HINT}" if reason else None)

    def export(
        self, model: Any, tokenizer: Any, out_dir: Path, *, opset: int | None = None
    ) -> list[Path]:
        """Export ``model`` (in memory, any per-block widths) into ``out_dir``.

        Args:
            model: a transformers causal LM.
            tokenizer: saved next to the graph when given.
            out_dir: an empty folder.
            opset: ONNX opset; Optimum's default for the architecture when None.
        """
        reason = self.refusal(model)
        if reason:
            raise UnsupportedModelError(reason)
        from optimum.exporters.onnx import onnx_export_from_model

        chatter = logging.getLogger("optimum")  # e.g. "Found different candidate ONNX initializers" for tied heads
        level = chatter.level
        if not logging.getLogger("cwca_export").isEnabledFor(logging.DEBUG):
            chatter.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings on every shape read
            try:
                onnx_export_from_model(
                    model, out_dir, task=_TASK, opset=opset, do_validation=False, device="cpu"
                )
            finally:
                chatter.setLevel(level)
        save_side_files(model, tokenizer, out_dir)
        return sorted(out_dir.iterdir())

    def weightless_export(
        self, model: Any, tokenizer: Any, out_dir: Path, *, opset: int | None = None
    ) -> list[Path]:
        """``export --low-memory``: the same folder for ``ORTModelForCausalLM``, from a trace alone.

        Optimum's exporter loads the whole graph back with its weights after tracing, to save
        them into one external data file: a float32 copy of the model (``export_pytorch``). Here
        the graph is the ``onnx`` backend's trace, which reads no weights: it has the inputs and
        outputs of Optimum's ``text-generation-with-past`` graph (``input_ids``,
        ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value`` -> ``logits``,
        ``present.{i}.key/value``), and the artifact is verified through ``ORTModelForCausalLM``
        like any other of this backend. Models whose blocks keep their own head counts stay
        refused, as are the model types Optimum refuses or breaks: ``ORTModelForCausalLM`` sizes
        the first step's empty cache from the config as Optimum's config for the type reads it
        (tried: Phi-3 with grouped KV heads and Mixtral fail there with this graph too).
        """
        from cwca_export.backends import get_backend

        reason = self.refusal(model)
        if reason:
            raise UnsupportedModelError(reason)
        return get_backend("onnx").export(model, tokenizer, out_dir, opset=opset, with_past=True)

    def generate(
        self, out_dir: Path, input_ids: np.ndarray, attention_mask: np.ndarray, new_tokens: int, ep: str,
        *, prepack: bool = True,
    ) -> np.ndarray:
        """Greedy tokens from ``ORTModelForCausalLM.generate`` on the artifact in ``out_dir``
        (``prepack=False``: its session computes from the mapped weights, as under ``--low-memory``)."""
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        from cwca_export.exporter.session import PROVIDERS, session_options

        options = session_options(out_dir / "model.onnx", ep, prepack=prepack)
        ort_model = ORTModelForCausalLM.from_pretrained(
            out_dir, provider=PROVIDERS[ep][0], use_io_binding=False, local_files_only=True, session_options=options,
            trust_remote_code=False,  # the artifact folder is the tool's own output: no code runs
        )
        out = ort_model.generate(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention_mask),
            do_sample=False,
            max_new_tokens=new_tokens,
        )
        return out.numpy()
