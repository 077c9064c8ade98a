"""``score()``: load, cut the calibration data, run one registered estimator, record everything."""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from cwca_export.scores import NOISE_SNR_THRESHOLD, LayerScores, warn_if_within_noise, within_noise
from cwca_export.scoring.registry import ESTIMATORS, get_estimator


def score(
    model: str | os.PathLike | nn.Module,
    data: Any,
    *,
    method: str = "fisher",
    tokenizer: Any = None,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    held_out: int | None = None,
    allow_fewer: bool = False,
    text_field: str = "text",
    damping: float = 0.1,
    damping_mode: str = "relative",
    batch_size: int = 1,
    dtype: str | None = None,
    mixed_precision: str = "no",
    cpu: bool = False,
    gradient_checkpointing: bool = False,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    options: dict[str, Any] | None = None,
    debias: bool = False,
    progress: bool = True,
    record_wall_time: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
) -> LayerScores:
    """Score every decoder block of a causal LM on calibration data.

    Runs under one process, or data-parallel under ``torchrun`` / ``accelerate launch``: each
    process scores its share of the sequences and the accumulators are summed, so every
    process returns the same scores.

    Args:
        model: a local checkpoint folder or a loaded ``PreTrainedModel``.
        data: anything :func:`cwca_export.data.calibration_data` accepts (.txt / .jsonl path,
            list of strings, token ids) or a ``CalibrationData``.
        method: a registered estimator (``fisher``, ``kfac``, ``exact``, ``gradnorm``,
            ``obd``, ``layerif``, ``owl``, ``uniform``).
        tokenizer: overrides the folder's tokenizer; needed for text with a model object.
        num_samples: N calibration sequences.
        seq_len: L tokens per sequence.
        seed: seeds the choice of sequences.
        held_out: held-out sequences (``layerif``); default N // 4 for methods that need them.
        allow_fewer: score on fewer than N sequences when the data is short.
        text_field: JSON Lines field holding the text.
        damping: delta, lambda_k = delta * mean diagonal of the block's curvature
            (``damping_mode="relative"``), or lambda itself (``"absolute"``).
        damping_mode: ``"relative"`` or ``"absolute"``.
        batch_size: sequences per forward/backward. Per-sequence estimators (fisher,
            gradnorm, obd, layerif, exact's gradient moments) split each sequence's gradient
            from the batch (same scores to float rounding); a mixture-of-experts model, whose
            expert Linears see tokens without the batch axis, falls back to batch size 1 with
            a warning (recorded in ``settings["batch_size"]``).
        dtype: ``"float32" | "bfloat16" | "float16"`` to load the folder in (default fp32).
        mixed_precision: accelerate's ``"no" | "bf16" | "fp16"`` autocast for the passes.
        cpu: force the CPU even when an accelerator device is present.
        gradient_checkpointing: recompute activations in the backward to save memory.
        device_map: accelerate placement for offload (e.g. ``"auto"``), with ``max_memory``.
        max_memory: per-device caps for ``device_map``.
        trust_remote_code: allow the folder's own modelling code.
        allow_pickle: accept pickle weights (``.bin``) in a folder without safetensors.
        options: estimator-specific options (see each estimator's ``options``).
        debias: score with max(zeta2 - noise_floor, 0), unbiased for the noise-free score
            before the clip, instead of the raw zeta2 (kept in ``stats["zeta2_biased"]``);
            for the methods with a ``debias`` option (fisher, gradnorm); needs N >= 2.
        progress: show a tqdm bar (tokens/s) on the main process.
        record_wall_time: write the wall time; off for byte-identical reruns.
        checkpoint: a file to save the accumulators in, atomically, every ``checkpoint_every``
            sequences (:mod:`cwca_export.scoring.checkpoint`); the caller removes it once the
            scores are saved. One process only; methods whose passes all hand their state
            (fisher, gradnorm, obd, kfac, owl, layerif, uniform).
        checkpoint_every: sequences between saves (needed with ``checkpoint``).
        resume: go on from ``checkpoint`` if it exists (a checkpoint of another run is an
            error); the scores equal those of an uninterrupted run.

    Returns:
        The :class:`~cwca_export.scores.LayerScores`, not yet saved. Methods with a noise
        floor record ``stats["noise_floor"]`` and ``stats["snr"]``, and
        ``settings["blocks_within_noise"]`` counts the blocks with snr below
        :data:`~cwca_export.scores.NOISE_SNR_THRESHOLD` (None for the other methods).

    Warns:
        ScoreNoiseWarning: more than half of the blocks are within noise (main process only).

    Example:
        >>> from cwca_export.scoring import score
        >>> scores = score("models/tiny-llama", "calib.txt", num_samples=32, seq_len=256)  # doctest: +SKIP
        >>> scores.save("scores.json")  # doctest: +SKIP
    """
    from cwca_export.blocks import find_blocks, model_fingerprint
    from cwca_export.data_parallel import require_same_everywhere
    from cwca_export.scoring.passes import ScoringRun, routes_tokens

    estimator = get_estimator(method)
    resolved = _checked_settings(estimator, options, debias=debias, damping=damping, damping_mode=damping_mode,
                                 batch_size=batch_size)
    net, calib = _model_and_data(
        model, data, estimator, resolved, tokenizer=tokenizer, num_samples=num_samples, seq_len=seq_len, seed=seed,
        held_out=held_out, allow_fewer=allow_fewer, text_field=text_field, dtype=dtype, device_map=device_map,
        max_memory=max_memory, gradient_checkpointing=gradient_checkpointing, trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    if batch_size > 1 and estimator.per_sequence and routes_tokens(net):
        warnings.warn(
            f"batch_size {batch_size}: method {method!r} needs each sequence's own gradient, and this"
            " mixture-of-experts model routes tokens to its experts without the batch axis, so it runs"
            " one sequence per backward (batch size 1)", stacklevel=2,
        )
        batch_size = 1
    blocks = find_blocks(net)
    # Without an accelerator device, accelerate forms the gloo group under torchrun only
    # when told it runs on the CPU.
    with _accelerator(cpu=cpu or not torch.accelerator.is_available(), mixed_precision=mixed_precision) as accelerator:
        if getattr(net, "hf_device_map", None) is None:
            net.to(accelerator.device)
        rank, world = accelerator.process_index, accelerator.num_processes
        if world > 1:
            require_same_everywhere({"--data": calib.data_hash, "model (MODEL_DIR)": model_fingerprint(net)})
        saver = None
        if checkpoint is not None:
            saver = _checkpoint(checkpoint, checkpoint_every, resume, estimator, world, {
                "method": method, "options": resolved, "num_samples": calib.num_samples, "seq_len": calib.seq_len,
                "seed": seed, "held_out": 0 if calib.held_out is None else int(calib.held_out.shape[0]),
                "damping": float(damping), "damping_mode": damping_mode, "batch_size": batch_size,
                "mixed_precision": mixed_precision, "gradient_checkpointing": gradient_checkpointing,
                "dtype": str(next(net.parameters()).dtype), "fingerprint": model_fingerprint(net),
                "data_hash": calib.data_hash,
            })
        run = ScoringRun(
            model=net,
            blocks=blocks,
            calibration=calib.input_ids[rank::world],
            held_out=None if calib.held_out is None else calib.held_out[rank::world],
            num_samples=calib.num_samples,
            num_held_out=0 if calib.held_out is None else int(calib.held_out.shape[0]),
            damping=float(damping),
            damping_mode=damping_mode,
            options=resolved,
            accelerator=accelerator,
            batch_size=batch_size,
            progress=progress,
            checkpoint=saver,
        )
        start = time.perf_counter()
        estimate = estimator.run(run)
        wall = time.perf_counter() - start
        sequences = torch.tensor([float(run.passes)], device=run.device, dtype=torch.float64)
        run.reduce_sum([sequences])

        return _layer_scores(model, net, blocks, calib, estimate, run, accelerator, method=method, resolved=resolved,
                             seed=seed, batch_size=batch_size, mixed_precision=mixed_precision,
                             gradient_checkpointing=gradient_checkpointing, passes=int(sequences.item()),
                             wall_time_s=round(wall, 3) if record_wall_time else None)


def _model_and_data(model: Any, data: Any, estimator: Any, resolved: dict[str, Any], *, tokenizer: Any,
                    num_samples: int, seq_len: int, seed: int, held_out: int | None, allow_fewer: bool,
                    text_field: str, dtype: str | None, device_map: Any, max_memory: Any,
                    gradient_checkpointing: bool, trust_remote_code: bool, allow_pickle: bool) -> tuple[nn.Module, Any]:
    """The model loaded for scoring and its calibration split; placements and splits it cannot score fail here."""
    from cwca_export.data import calibration_data
    from cwca_export.loading import load_model

    if isinstance(model, nn.Module) and dtype is not None and next(model.parameters()).dtype != _dtype(dtype):
        raise ValueError("dtype: a loaded model is scored in its own dtype; convert it first or pass a folder")

    net, folder_tokenizer = load_model(
        model, dtype=dtype or "float32", trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
        device_map=device_map, max_memory=max_memory, gradient_checkpointing=gradient_checkpointing,
    )
    if held_out is None:
        held_out = max(1, num_samples // 4) if estimator.needs_held_out else 0
    calib = calibration_data(
        data, tokenizer if tokenizer is not None else folder_tokenizer, num_samples=num_samples,
        seq_len=seq_len, seed=seed, held_out=held_out, allow_fewer=allow_fewer, text_field=text_field,
    )
    if resolved.get("debias") and calib.num_samples < 2:
        raise ValueError(f"debias: needs at least 2 calibration sequences, got {calib.num_samples}")
    if estimator.needs_held_out and calib.held_out is None:
        raise ValueError(f"method {estimator.name!r} needs a held-out split; pass held_out > 0")
    if _refuse_offloaded(net, estimator) and not gradient_checkpointing:
        warnings.warn(
            "weights are offloaded but gradient checkpointing is off: autograd keeps every streamed-in"
            " weight until the backward, so the backward holds them all at once; hint:"
            " gradient_checkpointing=True (--gradient-checkpointing)", stacklevel=3,
        )
    return net, calib


def _checked_settings(estimator, options: dict[str, Any] | None, *, debias: bool, damping: float, damping_mode: str,
                      batch_size: int) -> dict[str, Any]:
    """The estimator's resolved options; settings it cannot run with fail here, before the model loads."""
    method = estimator.name
    if debias or (options or {}).get("debias"):
        if "debias" not in estimator.options:
            supported = sorted(name for name, e in ESTIMATORS.items() if "debias" in e.options)
            raise ValueError(
                f"--debias: method {method!r} has no debiased estimate; pass --estimator {' or '.join(supported)}"
            )
        options = {**(options or {}), "debias": True}
    unknown = sorted(set(options or {}) - set(estimator.options))
    if unknown:
        raise ValueError(f"method {method!r} has no options {unknown}; it takes {sorted(estimator.options) or 'none'}")
    resolved = {**estimator.options, **(options or {})}
    if damping_mode not in ("relative", "absolute"):
        raise ValueError(f"damping_mode {damping_mode!r}: choose 'relative' or 'absolute'")
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping {damping}: must be finite and >= 0")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be >= 1")
    return resolved


def _layer_scores(model: Any, net: nn.Module, blocks: list, calib: Any, estimate: Any, run: Any, accelerator: Any, *,
                  method: str, resolved: dict[str, Any], seed: int, batch_size: int, mixed_precision: str,
                  gradient_checkpointing: bool, passes: int, wall_time_s: float | None) -> LayerScores:
    """The estimate with its provenance: noise statistics, the settings, the model and the versions."""
    from cwca_export.blocks import model_fingerprint
    from cwca_export.versions import library_versions

    n_params = [b.n_params for b in blocks]
    stats = dict(estimate.stats)
    stats["zeta2_noise_ratio"] = [z * calib.num_samples / n for z, n in zip(estimate.zeta2, n_params, strict=True)]
    noise: dict[str, Any] = {"blocks_within_noise": None}
    if "snr" in stats:
        noise["blocks_within_noise"] = (
            warn_if_within_noise(stats["snr"], method=method, samples=calib.num_samples,
                                 debiased=bool(resolved.get("debias", False)))
            if accelerator.is_main_process else sum(within_noise(stats["snr"]))
        )
        noise["noise_snr_threshold"] = NOISE_SNR_THRESHOLD
    settings = {
        "num_samples": calib.num_samples,
        "seq_len": calib.seq_len,
        "seed": seed,
        "held_out": run.num_held_out,
        "damping": run.damping,
        "damping_mode": run.damping_mode,
        "batch_size": batch_size,
        "mixed_precision": mixed_precision,
        "gradient_checkpointing": gradient_checkpointing,
        "processes": accelerator.num_processes,
        "tokens_available": calib.tokens_available,
        "options": resolved,
        "debias": bool(resolved.get("debias", False)),
        **noise,
        # times an estimator measured (damage's probe_time_s) go with the wall time: left out,
        # reruns write the same bytes
        **{k: v for k, v in estimate.settings.items() if wall_time_s is not None or not k.endswith("_time_s")},
    }
    config = getattr(net, "config", None)
    return LayerScores(
        method=method,
        zeta2=estimate.zeta2,
        n_params=n_params,
        block_names=[b.name for b in blocks],
        stats=stats,
        samples=calib.num_samples,
        tokens=passes * calib.seq_len,
        settings=settings,
        model={
            "fingerprint": model_fingerprint(net),
            "name_or_path": str(model) if not isinstance(model, nn.Module) else getattr(config, "name_or_path", ""),
            "architecture": type(net).__name__,
            "model_type": getattr(config, "model_type", None),
            "dtype": str(next(net.parameters()).dtype).removeprefix("torch."),
            "num_blocks": len(blocks),
        },
        data_hash=calib.data_hash,
        versions=library_versions(),
        wall_time_s=wall_time_s,
    )



def _checkpoint(path, every: int, resume: bool, estimator, world: int, identity: dict[str, Any]):
    from cwca_export.scoring.checkpoint import ScoreCheckpoint

    if not estimator.resumable:
        resumable = sorted(name for name, e in ESTIMATORS.items() if e.resumable)
        raise ValueError(
            f"checkpoint: method {estimator.name!r} cannot be checkpointed (not all of its passes keep saveable"
            f" accumulators); methods that can: {', '.join(resumable)}; hint: run it without --checkpoint-every"
        )
    if world > 1:
        raise ValueError("checkpoint: one process only; hint: drop --checkpoint-every under torchrun")
    return ScoreCheckpoint(path, every, identity, resume=resume)


def _refuse_offloaded(net: nn.Module, estimator) -> bool:
    """Refuse placements the estimators cannot score; True when block Linears are streamed.

    Weights accelerate offloads (kept on ``meta``, streamed in by its hooks) are fine for the
    gradient-moment estimators, kfac, layerif and owl (see :mod:`cwca_export.scoring.passes`);
    estimators registered with ``needs_resident`` (exact, damage) need every weight resident,
    and so does a weight no offload hook streams in.
    """
    from cwca_export.scoring.passes import offload_sources

    offloaded = [
        (f"{prefix}.{name}" if prefix else name, module)
        for prefix, module in net.named_modules()
        for name, p in module.named_parameters(recurse=False)
        if p.device.type == "meta"
    ]
    if not offloaded:
        return False
    hint = "hint: raise max_memory until every weight is resident on some device"
    if estimator.needs_resident:
        raise ValueError(
            f"method {estimator.name!r} cannot score offloaded weights ({len(offloaded)} offloaded by accelerate,"
            f" e.g. {offloaded[0][0]}): {estimator.needs_resident}; {hint}"
        )
    sources = offload_sources(net)
    orphans = [name for name, module in offloaded if id(module) not in sources]
    if orphans:
        raise ValueError(
            f"{len(orphans)} weights are on the meta device with no accelerate offload hook to stream them in"
            f" (e.g. {orphans[0]}), so they cannot be scored; {hint}, or load the model with its weights"
        )
    return True


@contextlib.contextmanager
def _accelerator(*, cpu: bool, mixed_precision: str) -> Iterator[Any]:
    """This call's Accelerator, even where an earlier ``score()`` (or the caller's own
    Accelerator) in the process chose another ``mixed_precision`` or device: accelerate keeps
    those process-wide, refuses some changes ("restart your runtime") and silently ignores
    others (``cpu=False`` after ``cpu=True`` stays on the CPU: the device lives in
    ``PartialState``). They are then set for this call and put back as they were on the way
    out. The process group of a multi-process launch (torchrun's ranks) is kept throughout, and
    with it its device: another device there is refused."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    saved = None

    def restore() -> None:  # the earlier settings, for whoever holds an Accelerator made with them
        for state, shared in zip((AcceleratorState, PartialState), saved, strict=True):
            state._shared_state.clear()
            state._shared_state.update(shared)

    try:
        accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    except ValueError as exc:
        if "already been initialized" not in str(exc):
            raise
        accelerator = None
    if accelerator is None or (accelerator.device.type == "cpu") != cpu:
        saved = dict(AcceleratorState._shared_state), dict(PartialState._shared_state)
        # accelerate's own way to re-set them; the device only in one process, where no group holds it
        wrong_device = (PartialState().device.type == "cpu") != cpu
        launched = PartialState().num_processes > 1
        AcceleratorState._reset_state(reset_partial_state=wrong_device and not launched)
        accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
        if wrong_device and launched:
            restore()
            raise ValueError(
                f"this {PartialState().num_processes}-process launch runs on {PartialState().device.type}, set by"
                f" its first Accelerator; scoring {'on the CPU' if cpu else 'on the accelerator'} needs a launch"
                " of its own; hint: score with the same --device in every call of one launch")
    try:
        yield accelerator
    finally:
        if saved is not None:
            restore()


def _dtype(name: str) -> torch.dtype:
    from cwca_export.dtypes import resolve_dtype

    return resolve_dtype(name)
