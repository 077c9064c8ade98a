"""ONNX Runtime sessions over a decoder artifact: providers, input feeds, KV cache, greedy decoding.

NumPy and onnxruntime only, so the measurement subprocess starts fast. Every backend writes
``model.onnx`` with the decoder I/O contract documented in :mod:`cwca_export.backends`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cwca_export.ort import require_onnxruntime

# --ep name -> ONNX Runtime providers, in priority order (CPU kept as fallback for CUDA graphs
# whose few shape ops ORT assigns to the CPU on purpose)
PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
}
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
# ONNX Runtime's session config entry that keeps kernels from copying constant weights into their own
# layout: external data then stays the artifact's mapped file pages (docs/memory.md, "Weights as file pages")
NO_PREPACKING = ("session.disable_prepacking", "1")


def casts_float16_per_run(path: str | Path, ep: str, prepack: bool) -> bool:
    """Whether a session without prepacking on the CPU provider keeps a float16 graph's weights
    float16, casting each as a node reads it, instead of holding a float32 copy of them all.

    The CPU provider has few float16 kernels: it inserts casts, and its graph optimisations fold
    the casts of weights into float32 initialisers at creation, a float32 copy of the weights as
    the session's own memory (550M: 2,137 MiB). With the optimisations off the casts run per
    forward; without the memory arena each float32 weight is freed after its node, and
    priority-based execution order runs each cast just before its reader (the default order
    ran them early: 1,266 MiB). Measured at 550M, one 16-token forward: own peak 293 MiB against
    2,325 MiB, forward 0.6-1.3 s against 0.4 s (docs/memory.md, "Float16 a tensor at a time").
    """
    return not prepack and ep == "cpu" and float16_weights(path)


def float16_weights(path: str | Path) -> bool:
    """Whether the graph at ``path`` stores float16 initialisers (read from its header alone)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)


def session_options(path: str | Path, ep: str = "cpu", *, threads: int = 0, prepack: bool = True) -> Any:
    """The ``SessionOptions`` every session on an artifact gets (:func:`make_session`, and a runtime
    loader such as Optimum's ``ORTModelForCausalLM``); arguments as :func:`make_session`'s."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise
    if not prepack:
        options.add_session_config_entry(*NO_PREPACKING)
    if casts_float16_per_run(path, ep, prepack):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_cpu_mem_arena = False
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return options


def make_session(path: str | Path, ep: str = "cpu", *, threads: int = 0, prepack: bool = True) -> Any:
    """An ``InferenceSession`` on execution provider ``ep``; refuses a silent CPU fallback.

    Args:
        path: the ``.onnx`` file (its external data, if any, lies next to it).
        ep: ``"cpu"`` or ``"cuda"``.
        threads: intra-op threads; 0 lets ONNX Runtime choose (one per physical core).
        prepack: let kernels copy constant weights into their own layout at creation (ONNX
            Runtime's default). False (``--low-memory``) computes from the initialisers as
            loaded: external data stays a read-only map of the artifact's file (page cache the
            kernel can evict, not memory of the process's own), at some prefill speed
            (docs/memory.md, "Weights as file pages"); for float16 weights on the CPU
            provider see :func:`casts_float16_per_run`.
    """
    ort = require_onnxruntime()
    if ep not in PROVIDERS:
        raise ValueError(f"execution provider {ep!r}: choose one of {sorted(PROVIDERS)}")
    wanted = PROVIDERS[ep]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        raise ValueError(
            f"--ep {ep} needs {wanted[0]}, but this onnxruntime offers {', '.join(available)};"
            " hint: pip install 'cwca-export[gpu]' on a CUDA machine, or use --ep cpu"
        )
    options = session_options(path, ep, threads=threads, prepack=prepack)
    session = ort.InferenceSession(str(path), options, providers=list(wanted))
    if session.get_providers()[0] != wanted[0]:
        raise ValueError(f"{path}: ONNX Runtime did not put the model on {wanted[0]}")
    return session


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Positions that skip left padding, as transformers' ``generate`` computes them."""
    pos = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 1, pos).astype(np.int64)


@dataclass
class DecoderSession:
    """A session with the decoder contract: logits out, KV cache in and out when present."""

    session: Any

    def __post_init__(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "input_ids" not in inputs or "logits" not in [o.name for o in self.session.get_outputs()]:
            raise ValueError("model.onnx does not follow the decoder contract (input_ids -> logits)")
        past = sorted(
            (int(m.group(1)), m.group(2) == "value", name)
            for name in inputs
            if (m := _PAST.match(name))
        )
        self.past_names = [name for _, _, name in past]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.uses_position_ids = "position_ids" in inputs
        self.uses_attention_mask = "attention_mask" in inputs
        # (kv_heads, head_dim) per cache tensor, in past_names order: blocks compressed with
        # heads=True keep different KV head counts, so no one layer speaks for the others
        self.past_shapes: list[tuple[int, int]] = []
        if self.past_names:
            first = inputs[self.past_names[0]]
            self.past_dtype = np.float16 if "float16" in first.type else np.float32
            for name in self.past_names:
                _, heads, _, head_dim = inputs[name].shape
                if not (isinstance(heads, int) and isinstance(head_dim, int)):
                    raise ValueError(
                        f"model.onnx: {name} has shape {inputs[name].shape}; the decoder contract"
                        " needs fixed KV heads and head_dim (B, kv_heads, past, head_dim)"
                    )
                self.past_shapes.append((int(heads), int(head_dim)))
            # the first layer's numbers, for callers that predate per-layer shapes
            self.kv_heads, self.head_dim = self.past_shapes[0]

    @property
    def has_past(self) -> bool:
        """True when the graph takes and returns a KV cache."""
        return bool(self.past_names)

    def kv_cache_bytes(self, batch: int, length: int) -> int:
        """Bytes of the keys and values for ``batch`` sequences of ``length`` tokens."""
        if not self.has_past:
            return 0
        itemsize = np.dtype(self.past_dtype).itemsize
        return sum(batch * heads * length * head_dim * itemsize for heads, head_dim in self.past_shapes)

    def empty_past(self, batch: int, length: int = 0) -> list[np.ndarray]:
        """A zero KV cache of ``length`` tokens (length 0 for a prefill)."""
        return [
            np.zeros((batch, heads, length, head_dim), dtype=self.past_dtype)
            for heads, head_dim in self.past_shapes
        ]

    def feed(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray] | None
    ) -> dict[str, np.ndarray]:
        """Inputs for one call: ``input_ids`` (B, S), mask (B, past + S), optional cache."""
        feed = {"input_ids": input_ids.astype(np.int64)}
        if self.uses_attention_mask:
            feed["attention_mask"] = attention_mask.astype(np.int64)
        if self.uses_position_ids:
            feed["position_ids"] = position_ids(attention_mask)[:, -input_ids.shape[1] :]
        if self.has_past:
            past = past if past is not None else self.empty_past(input_ids.shape[0])
            feed.update(zip(self.past_names, past, strict=True))
        return feed

    def run(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits (B, S, V) as float32 and the new KV cache (empty list without one)."""
        names = ["logits", *self.present_names]
        out = self.session.run(names, self.feed(input_ids, attention_mask, past))
        return out[0].astype(np.float32), out[1:]

    def greedy(self, input_ids: np.ndarray, attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
        """Greedy continuation (B, P + new_tokens), reusing the KV cache when the graph has one."""
        tokens, mask = input_ids, attention_mask
        logits, past = self.run(tokens, mask)
        for step in range(new_tokens):
            nxt = logits[:, -1].argmax(-1)[:, None]  # (B, 1)
            tokens = np.concatenate([tokens, nxt], axis=1)
            mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
            if step == new_tokens - 1:
                break
            if self.has_past:
                logits, past = self.run(nxt, mask, past)
            else:
                logits, _ = self.run(tokens, mask)
        return tokens
