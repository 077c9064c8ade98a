"""The registered compression methods: thin glue from a plan's per-block value to the math.

Pruning plans (rho_k): ``magnitude``, ``wanda``, ``sparsegpt`` (unstructured or N:M) and
``width`` (structured MLP channels, optionally whole GQA groups of heads). Allocation plans
(units e_k): ``lowrank`` (truncated SVD) and ``asvd`` (activation-aware, SVD-LLM whitening),
with rank_k = e_k * rank_step.

With an N:M pattern the ratio is fixed at 1 - N/M: a block whose planned rho_k is positive
gets the pattern on every Linear, a block the plan leaves dense (rho_k = 0) stays dense.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from cwca_export.blocks import weight_out_in
from cwca_export.compression import lowrank, width
from cwca_export.compression.registry import BlockJob, register_method
from cwca_export.compression.sparsity import magnitude_mask, parse_nm, sparsegpt_prune, wanda_mask

# ---------------------------------------------------------------- unstructured and N:M


def _validate_sparsity(options: dict[str, Any], _plan: Any) -> dict[str, Any]:
    options["nm"] = parse_nm(options["nm"])
    head = options["head_sparsity"]
    if head is not None and not 0.0 <= head < 1.0:
        raise ValueError(f"head_sparsity {head}: must lie in [0, 1)")
    return options


@torch.no_grad()
def _apply_keep(linear: nn.Module, keep: torch.Tensor) -> None:
    w = weight_out_in(linear)  # a view: writes reach the stored weight
    w.mul_(keep.to(w.dtype))


def _sparsify_block(
    job: BlockJob, prune: Callable[[str, nn.Module, float], torch.Tensor]
) -> dict[str, Any]:
    """Apply ``prune(rel, linear, rho) -> keep mask`` to every Linear of the block."""
    nm = job.options["nm"]
    rho = job.target
    row: dict[str, Any] = {"index": job.block.index, "name": job.block.name, "rho": rho}
    if nm is not None:
        row["nm"] = f"{nm[0]}:{nm[1]}"
        if rho <= 0:
            row["realised"] = 0.0
            return row
        rho = 1.0 - nm[0] / nm[1]
    removed = total = 0
    for path, linear in job.block.linears.items():
        keep = prune(job.relative(path), linear, rho)
        removed += int((~keep).sum())
        total += keep.numel()
    row["realised"] = removed / total
    return row


def _prune_head(model: nn.Module, options: Mapping[str, Any]) -> dict[str, Any]:
    """Magnitude-prune lm_head and the input embeddings when ``head_sparsity`` is set."""
    rho = options["head_sparsity"]
    if rho is None:
        return {}
    done: dict[str, float] = {}
    seen: set[int] = set()
    for name, module in (
        ("lm_head", model.get_output_embeddings()),
        ("embeddings", model.get_input_embeddings()),
    ):
        if module is None or id(module.weight) in seen:
            continue  # tied embeddings are one tensor: prune it once
        seen.add(id(module.weight))
        keep = magnitude_mask(module.weight, rho)
        with torch.no_grad():
            module.weight.mul_(keep.to(module.weight.dtype))
        done[name] = float((~keep).sum()) / keep.numel()
    return {"head_sparsity": done}


_SPARSITY_OPTIONS = {"nm": None, "head_sparsity": None}


@register_method(
    "magnitude",
    program="prune",
    dense_storage=True,
    summary="remove each Linear's smallest |W| (no data needed)",
    options=_SPARSITY_OPTIONS,
    finish=_prune_head,
    prepare=_validate_sparsity,
)
def _magnitude(job: BlockJob) -> dict[str, Any]:
    def prune(_rel: str, linear: nn.Module, rho: float) -> torch.Tensor:
        keep = magnitude_mask(weight_out_in(linear), rho, nm=job.options["nm"])
        _apply_keep(linear, keep)
        return keep

    return _sparsify_block(job, prune)


@register_method(
    "wanda",
    program="prune",
    dense_storage=True,
    summary="remove |W_ij| * ||X_j|| smallest within each output row (Sun et al. 2023)",
    options=_SPARSITY_OPTIONS,
    statistic="input_norms",
    finish=_prune_head,
    prepare=_validate_sparsity,
)
def _wanda(job: BlockJob) -> dict[str, Any]:
    def prune(rel: str, linear: nn.Module, rho: float) -> torch.Tensor:
        keep = wanda_mask(weight_out_in(linear), job.stats[rel], rho, nm=job.options["nm"])
        _apply_keep(linear, keep)
        return keep

    return _sparsify_block(job, prune)


@register_method(
    "sparsegpt",
    program="prune",
    dense_storage=True,
    summary="prune with OBS weight updates from H = X^T X (Frantar & Alistarh 2023)",
    options={**_SPARSITY_OPTIONS, "block_size": 128, "damp": 0.01},
    statistic="hessian",
    finish=_prune_head,
    prepare=_validate_sparsity,
)
def _sparsegpt(job: BlockJob) -> dict[str, Any]:
    opts = job.options

    def prune(rel: str, linear: nn.Module, rho: float) -> torch.Tensor:
        w = weight_out_in(linear)
        new, keep = sparsegpt_prune(
            w, job.stats[rel], rho, nm=opts["nm"], block_size=opts["block_size"], damp=opts["damp"]
        )
        with torch.no_grad():
            w.copy_(new)
        return keep

    return _sparsify_block(job, prune)


# ---------------------------------------------------------------- structured width

_IMPORTANCE = ("activation", "magnitude", "scores")


def _validate_width(options: dict[str, Any], _plan: Any) -> dict[str, Any]:
    if options["importance"] not in _IMPORTANCE:
        raise ValueError(
            f"width importance {options['importance']!r}: choose one of {list(_IMPORTANCE)}"
        )
    if (options["importance"] == "scores") != (options["channel_scores"] is not None):
        raise ValueError(
            "width: importance='scores' and channel_scores go together (channel_scores maps a block"
            " index to one score per MLP channel, e.g. Fisher from the scorer)"
        )
    if int(options["multiple"]) < 1:
        raise ValueError(f"width multiple {options['multiple']}: must be >= 1")
    return options


def _width_statistic(options: Mapping[str, Any]) -> str | None:
    return "input_norms" if options["importance"] == "activation" else None


@register_method(
    "width",
    program="prune",
    summary="remove MLP channels (heads=True: whole KV groups too) by activation-weighted |W|",
    options={"multiple": 8, "heads": False, "importance": "activation", "channel_scores": None},
    statistic=_width_statistic,
    prepare=_validate_width,
)
def _width(job: BlockJob) -> dict[str, Any]:
    module, rho, opts = job.block.module, job.target, job.options
    row: dict[str, Any] = {"index": job.block.index, "name": job.block.name, "rho": rho}
    norms = job.stats or {}
    if opts["heads"]:
        attn = width.attention_layout(module, job.block.name)
        if attn.refuse:
            raise width.LayoutError(f"{job.block.name}: {attn.refuse}")
        n_q, n_kv = attn.heads(module)
        keep_n = width.kept_groups(n_kv, rho)
        if keep_n < n_kv:
            scores = width.group_importance(attn.o_weight(module), norms.get(attn.o), n_q, n_kv)
            attn.narrow(module, width.top_sorted(scores, keep_n))
        row["kv_groups"] = [n_kv, keep_n]
        row["heads"] = [n_q, n_q // n_kv * keep_n]
    mlp = width.mlp_layout(module, job.block.name)
    d_ff = mlp.width(module)
    kept = width.kept_width(d_ff, rho, opts["multiple"])
    if kept < d_ff:
        if opts["importance"] == "scores":
            scores = torch.as_tensor(opts["channel_scores"][job.block.index]).float()
            if scores.shape != (d_ff,):
                raise ValueError(
                    f"{job.block.name}: channel_scores has shape {tuple(scores.shape)},"
                    f" expected ({d_ff},)"
                )
        else:
            scores = width.channel_importance(mlp.down_weight(module), norms.get(mlp.down))
        mlp.narrow(module, width.top_sorted(scores.to(_module_device(module)), kept))
    row["intermediate_size"] = [d_ff, kept]
    return row


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# ---------------------------------------------------------------- low rank


def _resolve_rank_step(options: dict[str, Any], plan: Any) -> dict[str, Any]:
    step = options["rank_step"]
    if step is None:
        step = plan.parameters.get("rank_step", lowrank.DEFAULT_RANK_STEP)
    if int(step) != step or step < 1:
        raise ValueError(f"rank_step {step}: must be a positive integer")
    options["rank_step"] = int(step)
    return options


def _lowrank_block(
    job: BlockJob, factors: Callable[[str, nn.Module, int], tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, Any]:
    units = job.target
    if abs(units - round(units)) > 1e-9:
        raise ValueError(
            f"{job.block.name}: {units} units is not a whole number; hint: re-plan with --integer"
        )
    rank = int(round(units)) * job.options["rank_step"]
    if rank < 1:
        raise ValueError(
            f"{job.block.name}: 0 units gives rank 0, which would delete the block's Linears;"
            " hint: re-plan with --lo 1"
        )
    row: dict[str, Any] = {
        "index": job.block.index,
        "name": job.block.name,
        "units": units,
        "rank": rank,
        "factorised": {},
        "dense": {},
    }
    for path, linear in list(job.block.linears.items()):
        rel = job.relative(path)
        out_features, in_features = weight_out_in(linear).shape
        if not lowrank.shrinks(out_features, in_features, rank):
            bound = out_features * in_features / (out_features + in_features)
            row["dense"][rel] = (
                f"rank {rank} >= mn/(m+n) = {bound:.1f}: factors would not shrink it"
            )
            continue
        a, b = factors(rel, linear, rank)
        parent_path, _, child = rel.rpartition(".")
        parent = job.block.module.get_submodule(parent_path) if parent_path else job.block.module
        setattr(parent, child, lowrank.factorised_linear(linear, a, b))
        row["factorised"][rel] = rank
    return row


@register_method(
    "lowrank",
    program="allocate",
    summary="truncated-SVD factors of rank units * rank_step for each Linear (no data needed)",
    options={"rank_step": None},
    prepare=_resolve_rank_step,
)
def _lowrank(job: BlockJob) -> dict[str, Any]:
    return _lowrank_block(
        job, lambda _rel, linear, r: lowrank.svd_factors(weight_out_in(linear), r)
    )


@register_method(
    "asvd",
    program="allocate",
    summary="activation-aware SVD: factors whitened by the input covariance (SVD-LLM)",
    options={"rank_step": None, "damp": 1e-4},
    statistic="hessian",
    prepare=_resolve_rank_step,
)
def _asvd(job: BlockJob) -> dict[str, Any]:
    def factors(rel: str, linear: nn.Module, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        return lowrank.whitened_svd_factors(
            weight_out_in(linear), job.stats[rel], r, damp=job.options["damp"]
        )

    return _lowrank_block(job, factors)
