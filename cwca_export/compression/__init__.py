"""Apply a plan to a torch model: sparsity, structured width or low-rank factors per block.

The package is ``compression`` and the verb is ``cwca_export.compress``: a subpackage named
``compress`` would be bound as the attribute ``cwca_export.compress`` the moment any of its
modules is imported, shadowing the lazily exported function.

Modules: ``registry`` (methods by name), ``methods`` (the registered methods), ``sparsity``,
``width``, ``lowrank`` (the math, as pure functions), ``stats`` (calibration statistics),
``sequential`` (the block-by-block driver), ``saving`` (save / :func:`load_compressed`).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from cwca_export.compression import methods as _methods  # noqa: F401  (registers the methods)
from cwca_export.compression.registry import METHODS, BlockJob, get_method, register_method
from cwca_export.compression.saving import load_compressed, save_compressed
from cwca_export.compression.sequential import run_layer_by_layer, run_whole_model
from cwca_export.compression.stats import STATISTICS
from cwca_export.data import calibration_ids
from cwca_export.progress import bar as progress_bar

__all__ = ["METHODS", "compress", "load_compressed", "register_method", "save_compressed"]


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    """Options as recorded in the config: tensors and mappings of them become a note."""
    out = {}
    for key, value in options.items():
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, tuple) and len(value) == 2:  # an N:M pattern
            out[key] = f"{value[0]}:{value[1]}"
        else:
            out[key] = f"<{type(value).__name__}>"
    return out


def _checked_inputs(model: nn.Module, plan: Any, spec: Any, data: Any, options: dict[str, Any], *, batch_size: int,
                    check_fingerprint: bool) -> tuple[dict[str, Any], str | None, torch.Tensor | None]:
    """Resolved options, the statistic the method needs and the calibration ids, checked before any block changes."""
    if plan.program != spec.program:
        wanted = {
            "prune": "a pruning plan (--program prune)",
            "allocate": "an allocation plan (--program allocate)",
        }
        raise ValueError(
            f"method {spec.name!r} reads {wanted[spec.program]}, but this plan's program is"
            f" {plan.program!r}; hint: cwca-export plan ... --program {spec.program}"
        )
    plan.check(model, fingerprint=check_fingerprint)
    resolved = spec.resolve(options)
    if spec.prepare is not None:
        resolved = spec.prepare(resolved, plan)
    stat_name = spec.statistic(resolved)
    input_ids = calibration_ids(data)
    if stat_name is not None and input_ids is None:
        raise ValueError(
            f"method {spec.name!r} needs calibration data (per-Linear {stat_name});"
            " hint: pass --data FILE (Python: data=)"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be >= 1")
    return resolved, stat_name, input_ids


def _step_record(spec: Any, resolved: dict[str, Any], plan: Any, data: Any, input_ids: torch.Tensor | None,
                 rows: list, extra: dict[str, Any], *, sequential: bool, wall_time_s: float) -> dict[str, Any]:
    """What ``model.config.cwca_compression`` records of one compression step."""
    from cwca_export.versions import library_versions

    return {
        "method": spec.name,
        "options": _jsonable(resolved),
        "mode": "layer-by-layer" if sequential else "whole-model",
        "plan": {"program": plan.program, "x": list(plan.x), "parameters": dict(plan.parameters)},
        "data": None if input_ids is None else {
            "samples": int(input_ids.shape[0]),
            "seq_len": int(input_ids.shape[1]),
            "data_hash": getattr(data, "data_hash", None),
        },
        "blocks": rows,
        **extra,
        "wall_time_s": wall_time_s,
        "versions": library_versions(),
    }


def compress(
    model: nn.Module,
    plan: Any,
    *,
    method: str,
    data: Any = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    sequential: bool = True,
    check_fingerprint: bool = True,
    progress: bool = False,
    **options: Any,
) -> nn.Module:
    """Apply ``plan`` to ``model`` with ``method``. The model is changed in place and returned.

    Pruning plans (rho_k per block) drive ``magnitude``, ``wanda``, ``sparsegpt`` and
    ``width``; allocation plans (units per block) drive ``lowrank`` and ``asvd`` with
    rank_k = units_k * rank_step. The plan is checked against the model first
    (:meth:`Plan.check`). The per-block shapes and a report of the step are recorded in
    ``model.config.cwca_compression`` (see :mod:`cwca_export.compression.saving`), so
    ``save_pretrained`` / :func:`save_compressed` write them and :func:`load_compressed`
    rebuilds the model.

    Args:
        model: a transformers causal LM; it is compressed in place (and left in eval mode).
        plan: a :class:`~cwca_export.planning.plan.Plan` made for this model.
        method: a registered method (``cwca_export.compression.METHODS``).
        data: calibration ids, a :class:`~cwca_export.data.CalibrationData` or an int tensor
            ``(N, L)``; needed by ``wanda``, ``sparsegpt``, ``asvd`` and ``width`` with
            ``importance="activation"``.
        batch_size: sequences per forward pass.
        device: where each block is processed (e.g. ``"cuda"`` while the model stays on the
            CPU); default: where the blocks are.
        sequential: layer by layer, each block calibrated on the compressed blocks before it
            (default); False takes every block's statistics from one pass of the dense model.
        check_fingerprint: also compare the plan's model fingerprint (off to apply a plan to
            a re-trained copy of the same shapes).
        progress: a bar over blocks on stderr (shown on a terminal; see :mod:`cwca_export.progress`).
        **options: method options, e.g. ``nm="2:4"``, ``head_sparsity=0.5`` (sparsity),
            ``multiple=8``, ``heads=True`` (width), ``rank_step=8`` (low rank).

    Returns:
        ``model``, compressed.

    Raises:
        PlanMismatchError: the plan was made for another model.
        ValueError: wrong plan program for the method, unknown options, missing data.

    Example:
        >>> import cwca_export, torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        >>> blocks = cwca_export.find_blocks(model)
        >>> plan = cwca_export.Plan("prune", x=[0.25, 0.5], q=[0.5, 0.5],
        ...     n_params=[b.n_params for b in blocks], lo=[0, 0], hi=[1, 1],
        ...     block_names=[b.name for b in blocks])
        >>> model = cwca_export.compress(model, plan, method="magnitude", nm="2:4")
        >>> float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean())
        0.5
    """
    from cwca_export.blocks import find_blocks
    from cwca_export.compression.saving import record_step

    spec = get_method(method)
    resolved, stat_name, input_ids = _checked_inputs(model, plan, spec, data, options, batch_size=batch_size,
                                                     check_fingerprint=check_fingerprint)

    blocks = find_blocks(model)

    def handler(block, stats):
        return spec.apply_block(BlockJob(block, float(plan.x[block.index]), stats, resolved))

    blocks_bar = progress_bar(total=len(blocks), desc=f"compress ({method})", unit="block", show=progress)

    was_training = model.training
    model.eval()
    start = time.perf_counter()
    runner = run_layer_by_layer if sequential else run_whole_model
    with blocks_bar:
        rows = runner(
            model,
            blocks,
            handler,
            statistic=None if stat_name is None else STATISTICS[stat_name],
            input_ids=input_ids if stat_name is not None else None,
            batch_size=batch_size,
            device=device,
            progress=lambda _block: blocks_bar.update(),
        )
    extra = spec.finish(model, resolved) if spec.finish is not None else {}
    model.train(was_training)
    record_step(model, _step_record(spec, resolved, plan, data, input_ids if stat_name is not None else None, rows,
                                    extra, sequential=sequential, wall_time_s=round(time.perf_counter() - start, 3)))
    return model


def apply_plan(model: Any, plan: Any, method: str, **compress_options: Any) -> Any:
    """A compressed copy of ``model`` (the original is untouched) through ``cwca_export.compress``.

    ``compress_options`` go to :func:`cwca_export.compress` (``data=`` calibration for
    methods that need activations, ``rank_step=``, ``nm=`` ...).
    """
    if plan is None:
        raise ValueError(f"compression method {method!r} needs a plan; hint: pass --plan plan.json")
    return compress(copy.deepcopy(model), plan, method=method, **compress_options)
