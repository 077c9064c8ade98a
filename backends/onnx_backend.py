"""The ``onnx`` backend: plain ``torch.onnx.export`` of the forward, KV cache optional.

No Optimum: a small wrapper module gives the model a flat tensor signature (mask, positions,
one tensor per cached key and value) and builds the 4D attention mask itself, so
transformers' vmap-based mask helpers and lazily initialised cache layers never meet the
TorchScript tracer. That also makes architectures Optimum refuses or breaks (Phi-3 with
grouped KV heads, Mixtral) exportable. Load the result with ``onnxruntime.InferenceSession``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from cwca_export.backends import register_backend
from cwca_export.backends.side_files import save_side_files

DEFAULT_OPSET = 18


def _kv_layout(config: Any) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the model's KV cache, from the config alone."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim


def _kv_shapes(model: Any) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) of every layer's KV cache, read from its block's attention modules.

    Width compression with ``heads=True`` leaves blocks with different head counts, so the
    config's model-wide numbers describe the cache only of an unpruned model; a block whose
    attention layout is unknown falls back to them.
    """
    from cwca_export.blocks import find_blocks
    from cwca_export.compression.width import LayoutError, attention_layout

    layers, kv_heads, head_dim = _kv_layout(model.config)
    shapes = [(kv_heads, head_dim)] * layers
    try:
        blocks = find_blocks(model)
    except ValueError:  # no recognisable decoder blocks: trust the config
        return shapes
    if len(blocks) != layers:
        return shapes
    for block in blocks:
        try:
            layout = attention_layout(block.module, block.name)
            _, kv = layout.heads(block.module)
            shapes[block.index] = (int(kv), layout.head_dim(block.module))
        except (LayoutError, AttributeError):
            continue
    return shapes


def _wrapper(model: Any, num_layers: int, with_past: bool):
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    config = model.config
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None

    class _FlatDecoder(torch.nn.Module):
        """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def _mask(self, attention_mask, query_len: int, dtype):
            total = attention_mask.shape[1]  # past + S
            q = torch.arange(query_len)[None, None, :, None] + (total - query_len)  # (1, 1, S, 1)
            k = torch.arange(total)[None, None, None, :]  # (1, 1, 1, T)
            allowed = (k <= q) & attention_mask[:, None, None, :].bool()  # (B, 1, S, T)
            if window is not None:
                allowed = allowed & (k > q - window)
            return torch.where(allowed, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)

        def forward(self, input_ids, attention_mask, position_ids, *past):
            mask = self._mask(attention_mask, input_ids.shape[1], self.model.dtype)
            if not with_past:
                out = self.model(
                    input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
                )
                return out.logits
            cache = DynamicCache()
            for i in range(num_layers):
                # a filled layer: update() then only concatenates, which traces cleanly
                layer = DynamicLayer()
                layer.keys, layer.values = past[2 * i], past[2 * i + 1]
                layer.dtype, layer.device, layer.is_initialized = past[2 * i].dtype, past[2 * i].device, True
                cache.layers.append(layer)
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return _FlatDecoder().eval()


@register_backend("onnx")
class OnnxBackend:
    """``torch.onnx.export`` (TorchScript tracer) of the forward; logits, KV cache optional."""

    # the export reads no weight values after tracing: low-memory export may trace it with
    # placeholder weights and write the initialisers itself (cwca_export.exporter.placeholders)
    traces_without_weights = True

    def export(
        self,
        model: Any,
        tokenizer: Any,
        out_dir: Path,
        *,
        opset: int | None = None,
        with_past: bool = True,
    ) -> list[Path]:
        """Export ``model`` into ``out_dir/model.onnx`` plus config and tokenizer files.

        Args:
            model: a transformers causal LM whose forward accepts a 4D additive mask.
            tokenizer: saved next to the graph when given.
            out_dir: an empty folder.
            opset: ONNX opset (default 18).
            with_past: export the KV cache inputs and outputs (fast decoding); without it the
                graph maps a whole sequence to logits.
        """
        import torch

        shapes = _kv_shapes(model)  # per layer: blocks may keep different KV heads
        layers = len(shapes)
        batch, past_len, seq = 2, 3, 4  # tracing sizes; every axis below is dynamic
        ids = torch.ones(batch, seq, dtype=torch.long)
        mask = torch.ones(batch, past_len + seq, dtype=torch.long)
        pos = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
        past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        present_names = [n.replace("past_key_values.", "present.") for n in past_names]
        dynamic = {
            "input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"},
        }
        if with_past:
            param = next(model.parameters())
            past = [
                torch.zeros(batch, kv_heads, past_len, head_dim, dtype=param.dtype, device=param.device)
                for kv_heads, head_dim in shapes
                for _ in ("key", "value")
            ]
            dynamic |= {n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names}
            dynamic |= {n: {0: "batch_size", 2: "total_sequence_length"} for n in present_names}
        else:
            past, past_names, present_names = [], [], []
            mask = mask[:, past_len:]
            pos = pos - past_len
        path = out_dir / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings on every shape read
            torch.onnx.export(
                _wrapper(model, layers, with_past),
                (ids, mask, pos, *past),
                str(path),
                input_names=["input_ids", "attention_mask", "position_ids", *past_names],
                output_names=["logits", *present_names],
                dynamic_axes=dynamic,
                opset_version=opset or DEFAULT_OPSET,
                dynamo=False,  # the TorchScript exporter: no onnxscript dependency
            )
        save_side_files(model, tokenizer, out_dir)
        return sorted(out_dir.iterdir())
