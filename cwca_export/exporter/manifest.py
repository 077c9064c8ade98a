"""``cwca_manifest.json``: what an artifact is, how it was made, and what was measured.

Besides provenance (plan, versions, hashes) it states which savings are real on ONNX Runtime
(docs/design.md 3.2): unstructured zeros buy nothing there, while narrower blocks, factorised Linears,
quantization and fp16 shrink bytes and, on the right provider, time.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import torch
from torch import nn

from cwca_export.blocks import find_blocks, is_linear_like, model_fingerprint
from cwca_export.versions import library_versions

MANIFEST_NAME = "cwca_manifest.json"
MANIFEST_SCHEMA_VERSION = 1
_ZERO_THRESHOLD = 0.01  # below 1% exact zeros a model is dense (random init has none)


def _is_factorised(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and len(module) == 2 and all(is_linear_like(m) for m in module)


@torch.no_grad()
def describe_model(model: nn.Module) -> dict[str, Any]:
    """Architecture, size and the compression visible in the model's tensors."""
    blocks = find_blocks(model)
    weights = [m.weight for b in blocks for m in b.linears.values()]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    seen: set[int] = set()
    params = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:  # tied embeddings count once
            seen.add(p.data_ptr())
            params += p.numel()
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "name_or_path": getattr(model.config, "_name_or_path", "") or None,
        "fingerprint": model_fingerprint(model),
        "parameters": params,
        "block_params": [b.n_params for b in blocks],
        "factorised_linears": [n for n, m in model.named_modules() if _is_factorised(m)],
        "zero_fraction": zeros / total if total else 0.0,
    }


def real_savings(
    structure: dict[str, Any], plan: Any, quantize: dict[str, Any] | None, dtype: str, ep: str,
    precision: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Each compression this artifact carries and whether ONNX Runtime turns it into savings."""
    rows = []
    dense_blocks = plan.n_params if plan is not None else None
    narrower = dense_blocks is not None and sum(structure["block_params"]) < sum(dense_blocks)
    if structure["zero_fraction"] > _ZERO_THRESHOLD:
        rows.append({
            "kind": "unstructured sparsity",
            "amount": structure["zero_fraction"],
            "disk": False, "memory": False, "latency": False,
            "effect": "disk-only",
            "why": "ONNX Runtime stores and multiplies dense tensors; zeros cost the same bytes and time."
                   " They only make the files compress better (a zip or a compressed file system);"
                   " for a smaller or faster artifact use width, lowrank or asvd, or per-layer precision",
        })
    if narrower or len(set(structure["block_params"])) > 1:
        rows.append({
            "kind": "structured width",
            "amount": None if dense_blocks is None else 1 - sum(structure["block_params"]) / sum(dense_blocks),
            "disk": True, "memory": True, "latency": True,
            "why": "removed channels are absent from the graph's tensors",
        })
    if structure["factorised_linears"]:
        rows.append({
            "kind": "low-rank factorisation",
            "amount": len(structure["factorised_linears"]),
            "disk": True, "memory": True, "latency": True,
            "why": "two thin MatMuls replace one wide one (a saving while r < mn / (m + n))",
        })
    if quantize is not None:
        int8 = quantize["method"] == "int8"
        rows.append({
            "kind": f"{quantize['method']} weights",
            "amount": None,
            "disk": True, "memory": True, "latency": ep == "cpu" if int8 else True,
            "why": (
                "int8 MatMulInteger kernels exist on the CPU provider only" if int8
                else "MatMulNBits kernels on CPU and CUDA read 4-bit blocks directly"
            ),
        })
    if precision:
        counts: dict[str, int] = {}
        for fmt in precision["groups"].values():
            counts[fmt] = counts.get(fmt, 0) + 1
        dynamic = "int8" in counts
        rows.append({
            "kind": "per-layer precision",
            "amount": counts,
            "disk": True, "memory": True, "latency": ep == "cpu" if dynamic else True,
            "why": "each group's weights stored in its planned format (MatMulNBits, GatherBlockQuantized,"
                   " dynamic int8 MatMulInteger on the CPU provider); the formats were read back from the graph",
        })
    if dtype == "fp16":
        rows.append({
            "kind": "fp16",
            "amount": None,
            "disk": True, "memory": True, "latency": ep == "cuda",
            "why": "half the bytes everywhere; faster only where the provider has fp16 kernels (CUDA)",
        })
    return rows


def build_manifest(
    *,
    model: nn.Module,
    plan: Any,
    backend: dict[str, Any],
    postprocess: dict[str, Any],
    files: list[dict[str, Any]],
    verification: dict[str, Any],
    measurement: dict[str, Any],
    prediction: dict[str, Any],
    budget: dict[str, Any] | None,
    structure: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest as a JSON-ready dict; ``structure`` is :func:`describe_model` taken earlier
    (a low-memory export releases the weights it reads)."""
    structure = structure if structure is not None else describe_model(model)
    return {
        "_type": "CwcaManifest",
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": structure,
        "plan": plan.to_dict() if plan is not None else None,
        "backend": backend,
        "postprocess": postprocess,
        "files": files,
        "disk_bytes": sum(f["bytes"] for f in files),
        "prediction": prediction,
        "verification": verification,
        "measurement": measurement,
        "budget": budget,
        "savings": real_savings(
            structure, plan, postprocess.get("quantize"), postprocess["dtype"], measurement["workload"]["ep"],
            postprocess.get("precision"),
        ),
        "versions": library_versions(),
    }
