"""Checks an artifact against the torch model it came from: logits and greedy tokens.

The reference is the torch model itself (transformers' own forward and ``generate``), never
the exporter's wrapper. Tolerances are on the relative RMS error of the logits,
rms(ort - torch) / rms(torch), over non-padded positions, per artifact dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cwca_export.exporter.session import DecoderSession, position_ids

# relative RMS logit error accepted per artifact dtype: fp32 is exact up to kernel
# reassociation; fp16 and weight quantization change the numbers by design (measured on
# tiny random models: fp16 ~0.5%, int8 ~3%, int4 ~8%), so these catch broken graphs, not noise
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "int8": 0.12, "int4": 0.3, "mixed": 1e-3, "mixed-dynamic": 2e-2}
# ONNX Runtime's CUDA provider runs float32 MatMul / Gemm in TF32 by default (provider option
# use_tf32=1), as a deployment will. TF32 keeps float16's 10-bit mantissa in the products, so it
# gets float16's tolerance: measured on an H100 at 1.6e-4 (the demo model), 3.5e-4 (a tiny random
# llama) and 1.2e-3 (a random 146M-parameter llama), against ~2.5e-7 on the CPU
TF32_TOLERANCE = TOLERANCES["fp16"]
# "mixed" (a per-layer precision plan) is compared with torch computing with the same
# de-quantized weights (cwca_export.planning.precision.quantized_weights), so only kernel round-off
# remains. Plans with dynamic int8 groups ("mixed-dynamic") quantize activations with one range
# per call: ONNX Runtime's decode step sees one token where the torch reference sees the whole
# sequence, so the ranges (and logits) differ by a little more than round-off.


class VerificationError(ValueError):
    """The artifact does not reproduce the torch model; nothing was written to the output."""


def sample_inputs(vocab_size: int, *, batch: int = 2, length: int = 12, pad: int = 3, seed: int = 0):
    """Deterministic token ids (B, T) and a mask whose last row is left-padded by ``pad``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab_size, size=(batch, length), dtype=np.int64)
    mask = np.ones_like(ids)
    if batch > 1 and pad:
        mask[-1, :pad] = 0
        ids[-1, :pad] = 0
    return ids, mask


@torch.no_grad()
def torch_logits(model: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The torch model's logits (B, T, V) in float32 for the same positions ORT sees."""
    device = next(model.parameters()).device
    out = model(
        input_ids=torch.from_numpy(ids).to(device),
        attention_mask=torch.from_numpy(mask).to(device),
        position_ids=torch.from_numpy(position_ids(mask)).to(device),
        use_cache=False,
    )
    return out.logits.float().cpu().numpy()


def _compare(ort: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    diff = ort - ref
    return {
        "rel_rms": float(np.sqrt(np.mean(diff**2)) / max(np.sqrt(np.mean(ref**2)), 1e-30)),
        "max_abs": float(np.abs(diff).max()),
        "top1_agreement": float(np.mean(ort.argmax(-1) == ref.argmax(-1))),
    }


@dataclass(frozen=True)
class TorchReference:
    """What verification compares an artifact with, computed from the torch model before any
    ONNX Runtime session opens (so the model's weights can be freed first, and the post-processed
    graph is checked against the same numbers as the fp32 one).

    Attributes:
        ids, mask: the sample inputs (B, T).
        prefill: torch's logits (B, T, V) for them, float32.
        next_ids: (B, 1) torch's greedy choice after them, fed to both sides for the decode step.
        decode: torch's logits (B, V) for that step.
        greedy: ``new_tokens`` greedy tokens by full recomputation (:func:`torch_greedy`), or None.
        generate: transformers' ``generate`` tokens (:func:`hf_generate`) for a runtime loader, or None.
        new_tokens: how many tokens ``greedy`` and ``generate`` continue by.
    """

    ids: np.ndarray
    mask: np.ndarray
    prefill: np.ndarray
    next_ids: np.ndarray
    decode: np.ndarray
    greedy: np.ndarray | None = None
    generate: np.ndarray | None = None
    new_tokens: int = 0


def torch_reference(model: Any, ids: np.ndarray, mask: np.ndarray, new_tokens: int = 0, *,
                    generate: bool = False) -> TorchReference:
    """Everything :func:`check_parity`, :func:`check_generation` and (with ``generate``)
    :func:`check_runtime_generation` read of the torch model, in one place."""
    prefill = torch_logits(model, ids, mask)
    nxt = prefill[:, -1].argmax(-1)[:, None]  # (B, 1): torch's choice feeds both sides
    full_ids = np.concatenate([ids, nxt], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
    decode = torch_logits(model, full_ids, full_mask)[:, -1]
    return TorchReference(
        ids, mask, prefill, nxt, decode,
        greedy=torch_greedy(model, ids, mask, new_tokens) if new_tokens else None,
        generate=hf_generate(model, ids, mask, new_tokens) if new_tokens and generate else None,
        new_tokens=new_tokens,
    )


def check_parity(model: Any, decoder: DecoderSession, dtype: str, ids: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """Compare prefill logits and one decode step (through the KV cache if any) with torch.

    ``model`` is the torch model, or a :class:`TorchReference` taken from it on ``ids`` and
    ``mask`` (no torch forward then). Returns the worst relative RMS error, the max abs error,
    top-1 agreement, the tolerance for ``dtype`` and whether it passed.
    """
    ref = model if isinstance(model, TorchReference) else torch_reference(model, ids, mask)
    ref_prefill, ref_decode, nxt = ref.prefill, ref.decode, ref.next_ids
    full_ids = np.concatenate([ids, nxt], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)

    prefill, present = decoder.run(ids, mask)
    if decoder.has_past:
        decode = decoder.run(nxt, full_mask, present)[0][:, -1]
    else:
        decode = decoder.run(full_ids, full_mask)[0][:, -1]
    valid = mask.astype(bool)
    stats = {
        "prefill": _compare(prefill[valid], ref_prefill[valid]),
        "decode": _compare(decode, ref_decode),
    }
    worst = max(s["rel_rms"] for s in stats.values())
    tolerance = TOLERANCES[dtype]
    tf32 = dtype in ("fp32", "mixed") and _tf32(decoder.session)
    if tf32:  # "mixed" compares with float32 products of the de-quantized weights: TF32 there too
        tolerance = max(tolerance, TF32_TOLERANCE)
    return {
        "metric": "rel_rms = rms(ort - torch) / rms(torch) over non-padded positions",
        "dtype": dtype,
        **({"math": "tf32 (the CUDA provider's use_tf32=1, its default)"} if tf32 else {}),
        "tolerance": tolerance,
        "rel_rms": worst,
        "passed": bool(worst <= tolerance),
        "inputs": {"batch": int(ids.shape[0]), "length": int(ids.shape[1]), "left_pad_last_row": int((~valid[-1]).sum())},
        **stats,
    }


def _tf32(session: Any) -> bool:
    """Whether ``session`` runs on the CUDA provider with TF32 products (its ``use_tf32``, on by
    default; where the GPU has no TF32, before Ampere, the products are float32 all the same)."""
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return False
    return str(session.get_provider_options().get("CUDAExecutionProvider", {}).get("use_tf32", "1")) != "0"


def _reference_tokens(reference: TorchReference, kind: str, new_tokens: int) -> np.ndarray:
    tokens = getattr(reference, kind)
    if tokens is None or reference.new_tokens != new_tokens:
        raise ValueError(f"the torch reference holds no {kind} tokens for {new_tokens} new tokens;"
                         f" hint: take it with torch_reference(..., new_tokens={new_tokens})")
    return tokens


@torch.no_grad()
def torch_greedy(model: Any, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy continuation by full recomputation (no cache, no EOS stop): an independent reference."""
    tokens, m = ids, mask
    for _ in range(new_tokens):
        nxt = torch_logits(model, tokens, m)[:, -1].argmax(-1)[:, None]
        tokens = np.concatenate([tokens, nxt], axis=1)
        m = np.concatenate([m, np.ones_like(nxt)], axis=1)
    return tokens


@torch.no_grad()
def hf_generate(model: Any, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """transformers' greedy ``generate`` on the torch model (the reference for runtime loaders)."""
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=torch.from_numpy(ids).to(device),
        attention_mask=torch.from_numpy(mask).to(device),
        do_sample=False,
        max_new_tokens=new_tokens,
    )
    return out.cpu().numpy()


def check_generation(
    model: Any,
    decoder: DecoderSession,
    ids: np.ndarray,
    mask: np.ndarray,
    new_tokens: int,
    runtime_generate: Any = None,
) -> dict[str, Any]:
    """Greedy tokens of the artifact against torch, through the raw session and, when the
    backend has one, its runtime loader (``runtime_generate(ids, mask, new_tokens)``).

    Callers that want one ONNX Runtime session alive at a time pass no ``runtime_generate``,
    close ``decoder`` and then call :func:`check_runtime_generation`. ``model`` may be a
    :class:`TorchReference` holding ``greedy`` tokens for ``new_tokens`` (no torch forward then)."""
    if isinstance(model, TorchReference):
        ref = _reference_tokens(model, "greedy", new_tokens)
    else:
        ref = torch_greedy(model, ids, mask, new_tokens)
    got = decoder.greedy(ids, mask, new_tokens)
    report: dict[str, Any] = {
        "new_tokens": new_tokens,
        "session_equal": bool(np.array_equal(ref, got)),
        "session_agreement": float(np.mean(ref[:, ids.shape[1] :] == got[:, ids.shape[1] :])),
    }
    if runtime_generate is not None:
        report = check_runtime_generation(model, ids, mask, new_tokens, runtime_generate, report)
    report["passed"] = report["session_equal"] and report.get("runtime_equal", True)
    return report


def check_runtime_generation(
    model: Any, ids: np.ndarray, mask: np.ndarray, new_tokens: int, runtime_generate: Any,
    report: dict[str, Any],
) -> dict[str, Any]:
    """``report`` (from :func:`check_generation`) with the runtime loader's greedy tokens
    compared against transformers' ``generate``: ``runtime_equal`` added, ``passed`` updated.
    ``model`` may be a :class:`TorchReference` holding ``generate`` tokens for ``new_tokens``."""
    if isinstance(model, TorchReference):
        ref_rt = _reference_tokens(model, "generate", new_tokens)
    else:
        ref_rt = hf_generate(model, ids, mask, new_tokens)
    got_rt = runtime_generate(ids, mask, new_tokens)
    report = {**report, "runtime_equal": bool(ref_rt.shape == got_rt.shape and np.array_equal(ref_rt, got_rt))}
    report["passed"] = report["session_equal"] and report["runtime_equal"]
    return report
