"""``cwca-export score``: per-block curvature scores of a model folder, written to scores.json."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator

import click

from cwca_export.cli.guard import guards_output
from cwca_export.cli.options import COUNT, DTYPE, ESTIMATOR, RegisteredName, deprecated_alias, finite
from cwca_export.cli.verbosity import note_line, warning_line
from cwca_export.defaults import CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN

# Names only, so --help needs no torch; the flag checks the name against the registry (plug-ins too).
_ESTIMATORS = ["fisher", "kfac", "exact", "gradnorm", "obd", "layerif", "owl", "uniform", "damage"]
PRECISION = "precision"  # not a block score: the per-layer storage formats' damage table export reads


class _ScoreEstimator(RegisteredName):
    """A registered estimator, or ``precision`` (the precision-damage table)."""

    def convert(self, value, param, ctx):
        if value == PRECISION:
            return value
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as exc:  # the list of names includes precision
            self.fail(f"{exc.message}, {PRECISION}", param, ctx)


SCORE_ESTIMATOR = _ScoreEstimator("cwca_export.scoring.registry:ESTIMATORS")


@contextlib.contextmanager
def _short_text_hint() -> Iterator[None]:
    """Too little calibration text: score can also run on the samples that fit (--allow-fewer)."""
    from cwca_export.data import ShortCalibrationError

    try:
        yield
    except ShortCalibrationError as exc:
        lower = "--samples, --held-out or --seq-len" if exc.held_out else "--samples or --seq-len"
        raise exc.with_hint(f"add text, lower {lower}, or pass --allow-fewer (scores on the samples that fit)"
                            ) from None


def _table(scores) -> str:
    q = scores.qualities()
    width = max(len(n) for n in scores.block_names)
    floor, snr = scores.stats.get("noise_floor"), scores.stats.get("snr")
    noisy = floor is not None and snr is not None
    lines = [f"{'#':>3}  {'block':<{width}}  {'n_k':>12}  {'zeta2':>12}  {'q_k':>8}  {'zeta2*N/n_k':>11}"
             + (f"  {'noise floor':>12}  {'snr':>9}" if noisy else "")]
    for i, name in enumerate(scores.block_names):
        lines.append(
            f"{i:>3}  {name:<{width}}  {scores.n_params[i]:>12,}  {scores.zeta2[i]:12.5g}  {q[i]:8.4f}"
            f"  {scores.stats['zeta2_noise_ratio'][i]:11.4g}"
            + (f"  {floor[i]:12.5g}  {snr[i]:9.3g}" if noisy else "")
        )
    return "\n".join(lines)


@click.command()
@click.argument("model_dir", metavar="MODEL_DIR", type=click.Path(file_okay=False))
@click.option("--data", "data_path", required=True, type=click.Path(),
              help="Calibration text: a .txt file, a .jsonl file with one record per line,"
                   " or a folder saved by datasets' save_to_disk (one split; column --text-field; needs"
                   " pip install 'cwca-export[datasets]'). Read in pieces until the samples are drawn.")
@click.option("--estimator", type=SCORE_ESTIMATOR, default="fisher", show_default=True,
              help=f"Curvature estimator: {', '.join(_ESTIMATORS)} or a plug-in (see docs/scoring.md); or precision:"
                   " the loss increase of each layer alone in each storage format of --formats, the table"
                   " export --precision-damage reads instead of measuring it in its budget search.")
@click.option("--method", "method_alias", type=ESTIMATOR, default=None, hidden=True,
              callback=deprecated_alias("score --method", "--estimator (--method names a compression method)"),
              help="Deprecated spelling of --estimator.")
@click.option("--samples", type=COUNT, default=CALIBRATION_SAMPLES, show_default=True, help="Calibration sequences N.")
@click.option("--seq-len", type=click.IntRange(min=2), default=CALIBRATION_SEQ_LEN, show_default=True,
              help="Tokens per sequence L.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the choice of sequences.")
@click.option("--held-out", type=click.IntRange(min=0), default=None,
              help="Held-out sequences for layerif [default: samples // 4].")
@click.option("--damping", type=finite(0), default=0.1, show_default=True,
              help="delta: lambda_k = delta * mean curvature diagonal (or lambda with --absolute-damping).")
@click.option("--absolute-damping", is_flag=True, help="Use --damping as lambda itself.")
@click.option("--batch-size", type=COUNT, default=1, show_default=True,
              help="Sequences per forward/backward. fisher, gradnorm, obd and layerif split each sequence's"
                   " gradient from the batch (same scores as 1); 1 is the fallback for mixture-of-experts models."
                   " precision: always 8, the batches of export's search.")
@click.option("--option", "method_options", multiple=True, metavar="KEY=VALUE",
              help="Estimator option, repeatable: e.g. --option pruner=magnitude --option points=0.3,0.5,0.7"
                   " (damage), --option cg_max_iter=20 (exact).")
@click.option("--formats", metavar="LIST", default=None,
              help="precision: storage formats to measure [default: export's, fp32,int8,int4-bB-asym,int4-b32 with B"
                   " the largest of 128, 64 dividing every input size, else 32]; export may plan any of them.")
@click.option("--rounding", type=click.Choice(["clip", "rtn"]), default=None,
              help="precision: the rounding export will use (its --rounding) [default: clip].")
@click.option("--max-cache", metavar="SIZE", default=None,
              help="damage, precision: cap on the cached block inputs (N x L x hidden per block), e.g. 8GiB; over it"
                   " the blocks are probed in runs, one more dense pass each (same scores) [default: no cap].")
@click.option("--text-field", default="text", show_default=True,
              help="JSON Lines field (or dataset column) holding the text.")
@click.option("--allow-fewer", is_flag=True, help="Score on fewer sequences when the data is too short.")
@click.option("--dtype", type=DTYPE, default="float32", show_default=True, help="Dtype to load the weights in.")
@click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]), default="no", show_default=True,
              help="accelerate autocast for the passes.")
@click.option("--device", default="auto", show_default=True,
              help="cpu: stay on the CPU even when a GPU is present; auto: the accelerator accelerate finds"
                   " (torchrun / accelerate launch pick the GPU of each process).")
@click.option("--cpu", is_flag=True, hidden=True, callback=deprecated_alias("score --cpu", "--device cpu"),
              help="Deprecated spelling of --device cpu.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations to save memory.")
@click.option("--device-map", default=None, help="accelerate placement for offload, e.g. auto.")
@click.option("--device-memory", "max_memory", multiple=True, metavar="DEVICE=SIZE",
              help="Per-device cap with --device-map, repeatable: cpu=8GiB, 0=20GiB.")
@click.option("--max-memory", "max_memory_alias", multiple=True, metavar="DEVICE=SIZE", hidden=True,
              help="Deprecated spelling of --device-memory (export's --max-memory is a budget).")
@click.option("--debias", is_flag=True,
              help="Score with max(zeta2 - noise floor, 0), the debiased estimate (fisher, gradnorm).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the folder's own modelling code.")
@click.option("--allow-pickle", is_flag=True,
              help="Accept pickle weights (.bin, .pt, .pth, .ckpt) in a folder without safetensors.")
@click.option("--no-wall-time", is_flag=True, help="Leave wall time out (byte-identical reruns).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--out", type=click.Path(dir_okay=False), default="scores.json", show_default=True,
              help="Where to write the scores (atomically; only the main process writes). An existing file is"
                   " replaced only when it is the tool's own of the same kind, unedited (its content stamp).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, metavar="N",
              help="Save the accumulators every N sequences to OUT.checkpoint (atomically; removed when done).")
@click.option("--resume", is_flag=True,
              help="Continue from OUT.checkpoint of an interrupted run with the same options (same scores).")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON instead of a table.")
@guards_output(inputs={"model_dir": "MODEL_DIR", "data_path": "--data"}, kind="file",
               json_types={"LayerScores", "PrecisionDamageTable"}, overwrite=None)
def score(
    model_dir, data_path, estimator, method_alias, samples, seq_len, seed, held_out, damping, absolute_damping,
    batch_size,
    method_options, formats, rounding, max_cache, text_field, allow_fewer, dtype, mixed_precision, device, cpu,
    gradient_checkpointing,
    device_map, max_memory, max_memory_alias, debias, trust_remote_code, allow_pickle, no_wall_time, no_progress,
    out, checkpoint_every, resume, as_json,
) -> None:
    """Score every decoder block of MODEL_DIR (a local checkpoint folder) on calibration text.

    --estimator precision measures instead the table of export's budget search: each layer's loss
    increase alone in each storage format (for export --precision-damage), data-parallel like the rest.

    \b
    Examples:
      cwca-export score models/llama --data calib.txt --samples 128 --seq-len 512
      cwca-export score models/llama --data c4.jsonl --estimator kfac --batch-size 4 --out kfac.json
      torchrun --nproc_per_node 2 -m cwca_export score models/llama --data calib.txt --device cpu
      cwca-export score models/llama --data calib.txt --checkpoint-every 16 --resume  # survive kills
      torchrun --nproc_per_node 2 -m cwca_export score models/llama --estimator precision --data calib.txt \\
          --samples 32 --seq-len 128 --device cpu --out precision.json
      cwca-export export models/llama --data calib.txt --samples 32 --seq-len 128 --max-memory 300MB \\
          --precision-damage precision.json --out ./fitted
    """
    from cwca_export.loading import check_model_folder
    from cwca_export.scores import ScoreNoiseWarning
    from cwca_export.scoring import score as run_score

    method = method_alias or estimator
    if device not in ("auto", "cpu"):
        raise click.BadParameter(f"{device!r}: score runs where accelerate places it; pass --device cpu or auto"
                                 " (torchrun / accelerate launch choose each process's GPU)", param_hint="--device")
    cpu = cpu or device == "cpu"
    if method == PRECISION or formats is not None or rounding is not None:
        ctx = click.get_current_context()
        _check_precision_flags(ctx, method)
    if method == PRECISION:
        from click.core import ParameterSource

        from cwca_export.planning.precision_table import EXPORT_BATCH_SIZE

        if click.get_current_context().get_parameter_source("batch_size") == ParameterSource.DEFAULT:
            batch_size = EXPORT_BATCH_SIZE
        elif batch_size != EXPORT_BATCH_SIZE:
            raise click.BadParameter(
                f"export's search measures in batches of {EXPORT_BATCH_SIZE} (dynamic int8 quantizes a batch's"
                f" activations together), so the precision table is measured in them too; hint: drop --batch-size",
                param_hint="--batch-size")
        _score_precision(model_dir, data_path, formats=formats, rounding=rounding or "clip", samples=samples,
                         seq_len=seq_len, seed=seed, allow_fewer=allow_fewer, text_field=text_field,
                         batch_size=batch_size, dtype=dtype, cpu=cpu, max_cache=max_cache,
                         trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, progress=not no_progress,
                         record_wall_time=not no_wall_time, out=out, as_json=as_json)
        return
    checkpoint = _checkpoint_file(out, checkpoint_every, resume)
    check_model_folder(model_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                       lengths={"--seq-len": seq_len})

    caps = {}
    if max_memory_alias:
        warning_line("score --max-memory is deprecated (export's --max-memory is a budget); pass --device-memory")
    for spec, flag in [(s, "--device-memory") for s in max_memory] + [(s, "--max-memory") for s in max_memory_alias]:
        device, sep, size = spec.partition("=")
        if not sep or not size:
            raise click.BadParameter(f"{spec!r}: expected DEVICE=SIZE, e.g. cpu=8GiB", param_hint=flag)
        caps[int(device) if device.isdigit() else device] = size
    options = {}
    for spec in method_options:
        key, sep, value = spec.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{spec!r}: expected KEY=VALUE, e.g. pruner=magnitude", param_hint="--option")
        try:
            options[key] = json.loads(value)  # numbers and true/false; anything else stays text
        except ValueError:
            options[key] = value
    if max_cache is not None:
        from cwca_export.budget import parse_size

        if method != "damage":
            raise click.UsageError(f"--max-cache caps the damage probes' input cache; --estimator {method} has none")
        try:
            parse_size(max_cache)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--max-cache") from None
        options["max_cache"] = max_cache
    caught: list[warnings.WarningMessage] = []
    try:  # ScoreNoiseWarning becomes one stderr line below; every other warning shows as usual
        with _short_text_hint(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ScoreNoiseWarning)  # the CLI always reports it
            scores = run_score(
                model_dir, data_path, method=method, num_samples=samples, seq_len=seq_len, seed=seed,
                held_out=held_out, allow_fewer=allow_fewer, text_field=text_field, damping=damping,
                damping_mode="absolute" if absolute_damping else "relative", batch_size=batch_size, dtype=dtype,
                mixed_precision=mixed_precision, cpu=cpu, gradient_checkpointing=gradient_checkpointing,
                device_map=device_map, max_memory=caps or None, trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle, debias=debias, progress=not no_progress, record_wall_time=not no_wall_time,
                options=options or None, checkpoint=checkpoint, checkpoint_every=checkpoint_every or 0,
                resume=resume,
            )
    finally:
        for w in caught:
            if not issubclass(w.category, ScoreNoiseWarning):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    noise = [str(w.message) for w in caught if issubclass(w.category, ScoreNoiseWarning)]
    if scores.settings["processes"] > 1:
        import torch.distributed as dist

        if dist.get_rank() != 0:  # every process holds the same reduced scores; one writes
            return
    path = scores.save(out)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)  # the scores are safe: the checkpoint has done its job
    if as_json:
        click.echo(json.dumps(scores.to_dict(), indent=2))
    else:
        click.echo(_table(scores))
        _summary(scores, method, seq_len, path)
    for message in noise:  # one line each on stderr, after the scores
        warning_line(message)


def _checkpoint_file(out: str, every: int | None, resume: bool):
    """The checkpoint beside ``out`` when asked for; refuses a file there the tool did not write."""
    from cwca_export.scoring.checkpoint import checkpoint_path, read_checkpoint_header

    if resume and every is None:
        raise click.UsageError("--resume continues a checkpoint: give --checkpoint-every N as well")
    if every is None:
        return None
    path = checkpoint_path(out)
    if path.exists() and read_checkpoint_header(path) is None:
        raise click.UsageError(
            f"{path} exists and is not a checkpoint cwca-export wrote; it is kept; pass another --out")
    if path.exists() and not resume:
        note_line(f"Note: starting afresh and replacing {path} (pass --resume to continue it)")
    elif resume and not path.exists():
        note_line(f"Note: no checkpoint at {path}; starting from the beginning")
    return path


def _summary(scores, method: str, seq_len: int, path) -> None:
    within = scores.settings.get("blocks_within_noise")
    click.echo(
        f"{method}{' (debiased)' if scores.settings.get('debias') else ''}: {scores.samples} x {seq_len} tokens,"
        f" {scores.tokens} tokens through the model"
        f"{'' if scores.wall_time_s is None else f' in {scores.wall_time_s:.1f} s'}"
        f"{'' if within is None else f'; {within} of {scores.num_blocks} blocks within noise'}; wrote {path}"
    )


# flags of the curvature estimators that the precision table does not take (parameter name -> flag)
_NOT_FOR_PRECISION = {
    "held_out": "--held-out", "damping": "--damping", "absolute_damping": "--absolute-damping",
    "method_options": "--option", "mixed_precision": "--mixed-precision", "gradient_checkpointing":
    "--gradient-checkpointing", "device_map": "--device-map", "max_memory": "--device-memory",
    "max_memory_alias": "--max-memory", "debias": "--debias", "checkpoint_every": "--checkpoint-every",
    "resume": "--resume",
}


def _check_precision_flags(ctx: click.Context, method: str) -> None:
    """--formats / --rounding only with --estimator precision; its run refuses the curvature flags."""
    from click.core import ParameterSource

    given = {name for name in ctx.params if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)}
    if method != PRECISION:
        for name, flag in (("formats", "--formats"), ("rounding", "--rounding")):
            if name in given:
                raise click.UsageError(f"{flag} applies to --estimator precision (the per-layer storage table);"
                                       f" --estimator {method} has no storage formats")
        return
    for name, flag in _NOT_FOR_PRECISION.items():
        if name in given:
            raise click.UsageError(f"{flag} does not apply to --estimator precision (forward probes of each"
                                   f" layer in each storage format); hint: drop {flag}")


def _score_precision(model_dir, data_path, *, formats, rounding, samples, seq_len, seed, allow_fewer, text_field,
                     batch_size, dtype, cpu, max_cache, trust_remote_code, allow_pickle, progress, record_wall_time,
                     out, as_json) -> None:
    """``--estimator precision``: measure the precision-damage table, data-parallel under torchrun
    (:mod:`cwca_export.planning.precision_table`); the main process writes it atomically."""
    import torch

    from cwca_export.blocks import model_fingerprint
    from cwca_export.budget import parse_size
    from cwca_export.data import calibration_data
    from cwca_export.data_parallel import joined_processes
    from cwca_export.loading import check_model_folder, load_model
    from cwca_export.planning.precision import default_formats, parse_formats
    from cwca_export.planning.precision_table import measure_table

    check_model_folder(model_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                       lengths={"--seq-len": seq_len})
    cap = None
    if max_cache is not None:
        try:
            cap = parse_size(max_cache)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--max-cache") from None
    if formats is not None:
        try:
            parse_formats(formats)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--formats") from None
    model, tokenizer = load_model(model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                                  allow_pickle=allow_pickle)
    with _short_text_hint():
        calib = calibration_data(data_path, tokenizer, num_samples=samples, seq_len=seq_len, seed=seed,
                                 allow_fewer=allow_fewer, text_field=text_field)
    names = formats if formats is not None else ",".join(default_formats(model))
    with joined_processes() as processes:
        processes.require_same({"--data": calib.data_hash, "model (MODEL_DIR)": model_fingerprint(model)})
        if not cpu and torch.cuda.is_available():
            model.to(processes.device("cuda"))
        table = measure_table(
            model, calib.input_ids, names, rounding=rounding, batch_size=batch_size, max_cache=cap,
            processes=processes, progress=progress, record_wall_time=record_wall_time,
            source={"data": str(data_path), "seed": seed, "text_field": text_field, "data_hash": calib.data_hash},
        )
    if not processes.is_main:  # every process holds the same reduced table; one writes
        return
    table.model["name_or_path"] = str(model_dir)
    path = table.save(out)
    if as_json:
        click.echo(json.dumps(table.to_dict(), indent=2))
        return
    click.echo(_precision_table(table.damage))
    click.echo(
        f"precision ({rounding} rounding): {table.calibration['samples']} x {seq_len} tokens,"
        f" {len(table.damage.groups)} groups x {len(table.damage.formats)} formats, {table.processes} process"
        f"{'es' if table.processes > 1 else ''}"
        f"{f' in {table.damage.wall_time_s:.1f} s' if record_wall_time else ''}; wrote {path}"
        f" (export --precision-damage {path})"
    )


def _precision_table(damage) -> str:
    width = max(len(g) for g in damage.groups)
    cols = [max(len(f), 10) for f in damage.formats]
    lines = [f"{'group':<{width}}  " + "  ".join(f"{f:>{c}}" for f, c in zip(damage.formats, cols, strict=True))]
    for g, row in zip(damage.groups, damage.damage, strict=True):
        cells = ("-" if v is None else f"{v:.4g}" for v in row)
        lines.append(f"{g:<{width}}  " + "  ".join(f"{v:>{c}}" for v, c in zip(cells, cols, strict=True)))
    return "\n".join(lines)
