"""``cwca-export export``: a model folder -> a verified ONNX artifact, fitted to a budget if given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cwca_export.cli.guard import guards_output
from cwca_export.cli.options import (
    COUNT,
    DTYPE,
    LATENCY_LIMIT,
    METHOD,
    OVERWRITE_HELP,
    SIZE,
    deprecated_alias,
    finite,
    loading_options,
)
from cwca_export.cli.verbosity import note_line
from cwca_export.defaults import EXPORT_SAMPLES, EXPORT_SEQ_LEN, EXPORT_SIGNIFICANCE


def parse_layers(text: str | None) -> tuple[int, ...]:
    """Block indices from ``"0,5-7"``.

    Example:
        >>> parse_layers("0,5-7")
        (0, 5, 6, 7)
    """
    if not text:
        return ()
    layers: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            if int(last or first) < int(first):  # a backwards range would select no layer at all
                raise click.BadParameter(f"{part.strip()!r} runs backwards; hint: --exclude-layers {last}-{first}",
                                         param_hint="--exclude-layers")
            layers += range(int(first), int(last or first) + 1)
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected indices like 0,5-7", param_hint="--exclude-layers") from None
    return tuple(layers)


def _summary(art) -> list[str]:
    from cwca_export.budget import format_size

    m = art.manifest
    work = m["measurement"]["workload"]
    post = m["postprocess"]
    storage = post["quantize"]["method"] if post["quantize"] else post["dtype"]
    if post.get("precision"):
        storage = "per-layer precision"
    fp32 = m["verification"]["fp32"]
    parity = art.parity
    lat = art.latency_ms
    lines = [
        f"wrote {art.path} (backend {m['backend']['name']}, {storage}): {format_size(art.disk_bytes)} on disk",
        f"parity: relative RMS {parity['rel_rms']:.2e} (tolerance {parity['tolerance']:g}, {parity['dtype']}"
        f"{', tf32 products' if parity.get('math') else ''});"
        f" fp32 greedy tokens {'equal' if fp32['generation']['passed'] else 'differ from'} torch",
        f"latency ({work['ep']}, batch {work['batch']}): prefill of {work['prompt_len']} tokens"
        f" p50 {lat['prefill']['p50']:.3g} ms, p90 {lat['prefill']['p90']:.3g} ms;"
        f" decode at context {work['context']} p50 {lat['decode']['p50']:.3g} ms, p90 {lat['decode']['p90']:.3g} ms",
    ]
    if art.resident_bytes is not None:
        lines.append(f"resident memory: {format_size(art.resident_bytes)} (session + KV cache of {work['context']} tokens)")
        own = m["measurement"].get("anonymous_after_bytes")
        if work.get("prepack") is False and own is not None:
            how = "without prepacking"
            if work.get("casts_float16_per_run"):
                how += " or a float32 copy of the float16 weights (cast per forward, so slower)"
            lines[-1] += (f"; {how} (--low-memory) the session's own memory after the runs was"
                          f" {format_size(own)}, the rest the artifact's file pages")
    budget = m["budget"]
    if budget:
        checks = ", ".join(
            f"{c['name']} {c['measured']:.4g} <= {c['limit']:.4g}" for c in budget["checks"]
        )
        search = budget["search"]
        priced = sum(1 for c in search.get("candidates", []) if c.get("calib_loss") is not None)
        lines.append(f"budget met: {checks}; {priced} candidate(s) priced, {len(search['trials'])} built and measured")
        chosen = search.get("chosen") or {}
        if chosen.get("storage"):
            lines.append(f"chosen: {chosen['storage']} at structure level t={chosen['t']:g}; {search.get('why') or ''}")
    precision = post.get("precision")
    if precision:
        rounding = (precision.get("rounding") or {}).get("method", "rtn")
        lines.append(f"per-layer precision: {len(precision['nodes'])} weight nodes in their planned formats"
                     f" (read back from the graph), rounding {rounding}")
    return lines


def _read_precision(path: str) -> dict[str, str]:
    """Group -> format from ``{"formats": {...}}`` (or a bare mapping), formats checked."""
    from cwca_export.planning.precision import StorageFormat

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise click.BadParameter(f"{path}: not a JSON file ({exc})", param_hint="--precision") from None
    formats = data.get("formats", data) if isinstance(data, dict) else None
    if not isinstance(formats, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in formats.items()):
        raise click.BadParameter(f"{path}: expected {{\"formats\": {{group: format}}}}", param_hint="--precision")
    for value in formats.values():
        try:
            StorageFormat.parse(value)
        except ValueError as exc:
            raise click.BadParameter(f"{path}: {exc}", param_hint="--precision") from None
    return formats


def _storage_searched(budget: Any, quantize: bool, precision: bool) -> bool:
    """Whether a budget search plans per-layer storage (a limit, and no fixed storage)."""
    return budget.has_limits and not quantize and not precision and budget.dtype == "fp32"


def _check_storage_flags(ctx: click.Context, budget: Any, quantize: bool, precision: bool) -> None:
    """--formats, --precision-estimate and --rounding change only per-layer storage: given where
    none is planned, they would be ignored without a word."""
    from click.core import ParameterSource

    given = {name for name in ctx.params if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)}
    searched = _storage_searched(budget, quantize, precision)
    why = ("it has no limit (add --max-memory, --max-disk or --max-latency-ms)" if not budget.has_limits
           else "--quantize fixes the storage" if quantize else "--precision fixes the storage" if precision
           else "a float16 artifact's storage is not searched")
    for name, flag in (("formats", "--formats"), ("precision_estimate", "--precision-estimate"),
                       ("significance", "--significance")):
        if name in given and not searched:
            raise click.UsageError(f"{flag} applies to a budget search that plans per-layer storage, and this"
                                   f" export plans none: {why}; hint: drop {flag}")
    if "rounding" in given and not (searched or precision):
        raise click.UsageError("--rounding applies to per-layer formats (a budget search's or --precision's);"
                               " --quantize is always round to nearest; hint: drop --rounding")


def _check_levels(ctx: click.Context, budget: Any, plan_path: str | None, method: str | None) -> None:
    """--levels spaces the structure levels of a budget search that re-makes --plan with --method:
    given without one, it would be ignored without a word."""
    from click.core import ParameterSource

    if ctx.get_parameter_source("levels") in (ParameterSource.DEFAULT, None):
        return
    missing = [flag for flag, value in (("--plan", plan_path), ("--method", method)) if not value]
    if missing:
        why = f"this export has no {' and no '.join(missing)}"
    elif not budget.has_limits:
        why = "this export has no limit (add --max-memory, --max-disk or --max-latency-ms)"
    else:
        return
    raise click.UsageError(f"--levels sets the structure levels a budget search tries with --plan and --method,"
                           f" and {why}; hint: drop --levels")


def _precision_damage_search(budget, fixed, estimate) -> None:
    """``--precision-damage`` needs a search that plans per-layer storage from measured damage."""
    if not budget.has_limits or fixed or budget.dtype != "fp32":
        raise click.BadParameter("the table prices a budget search's per-layer storage; hint: add --max-memory,"
                                 " --max-disk or --max-latency-ms, without --quantize, --precision, --low-memory or"
                                 " --dtype float16", param_hint="--precision-damage")
    if estimate != "measured":
        raise click.BadParameter("the table is measured damage; hint: drop --precision-estimate fisher",
                                 param_hint="--precision-damage")


def _precision_damage(path, model, tokenizer, compress_options, rounding, formats):
    """The table of ``--precision-damage`` and the formats the search may plan, checked against
    this export (model, groups, formats, rounding, calibration ids): a mismatch is a usage error."""
    from cwca_export.exporter.search import calibration_ids
    from cwca_export.planning.precision_table import PrecisionTable

    ids, _ = calibration_ids(tokenizer, compress_options, None, model.config.vocab_size)
    try:
        return PrecisionTable.load(path).for_export(path, model, ids, rounding, formats)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--precision-damage") from None


@click.command("export")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Artifact folder (written atomically).")
@click.option("--backend", default="optimum", show_default=True, help="Export backend: optimum or onnx (or a plug-in).")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False),
              help="plan.json behind the model, recorded in the manifest; applied only with --method.")
@click.option("--method", type=METHOD, help="Compression method that applies --plan (and lets a budget search re-solve it).")
@click.option("--data", type=click.Path(exists=True),
              help="Calibration text for --method width / wanda / sparsegpt / asvd, the search's pricing and"
                   " --rounding clip: .txt, .jsonl, or a folder saved by datasets' save_to_disk [default for the"
                   " pricing and clip: the shipped Python documentation text].")
@click.option("--text-field", default="text", show_default=True,
              help="JSON Lines field (or dataset column) holding the text.")
@click.option("--samples", type=COUNT, default=EXPORT_SAMPLES, show_default=True, help="Calibration sequences for --data.")
@click.option("--seq-len", type=click.IntRange(min=2), default=EXPORT_SEQ_LEN, show_default=True, help="Tokens per calibration sequence.")
@click.option("--quantize", type=click.Choice(["int8", "int4"]), help="ONNX Runtime weight quantization.")
@click.option("--exclude", multiple=True, metavar="NAME", help="Node name or module path kept in float when quantizing; repeatable.")
@click.option("--exclude-layers", metavar="I,J-K", help="Decoder blocks kept in float when quantizing, e.g. 0,5-7.")
@click.option("--block-size", type=COUNT, default=32, show_default=True,
              help="int4: weights per scale, a power of two >= 16.")
@click.option("--formats", metavar="LIST",
              help="Storage formats a budget search may give each layer [default: fp32,int8,int4-bB-asym,int4-b32 with B"
                   " the largest of 128, 64 dividing every input size, else 32; with a latency limit on the CPU each int4"
                   " format also with int8 compute (-a8); on --ep cuda no int8 or -a8].")
@click.option("--precision", "precision_path", type=click.Path(exists=True, dir_okay=False),
              help="Per-layer precision plan (JSON {\"formats\": {group: format}}, e.g. a manifest's chosen candidate).")
@click.option("--levels", type=COUNT, default=5, show_default=True,
              help="Structure levels a budget search tries with --plan and --method (refused without them).")
@click.option("--precision-estimate", type=click.Choice(["measured", "fisher"]), default="measured", show_default=True,
              help="How a budget search prices each layer's formats: measured probes or the Fisher-weighted error.")
@click.option("--precision-damage", "precision_damage_path", type=click.Path(exists=True, dir_okay=False),
              help="A budget search's per-layer damage table measured before (score --estimator precision, e.g. under"
                   " torchrun), used instead of measuring it; refused unless measured on this model with these"
                   " --formats, --rounding and calibration (--data, --samples, --seq-len).")
@click.option("--rounding", type=click.Choice(["clip", "rtn"]), default="clip", show_default=True,
              help="How per-layer integer formats round: clip each weight block where the calibration inputs say it"
                   " lowers the output error, or rtn (ONNX Runtime's plain round to nearest). --quantize is always rtn.")
@click.option("--significance", type=finite(0), default=EXPORT_SIGNIFICANCE, show_default=True, metavar="SIGMAS",
              help="A budget search builds a plain export's storage (one format for every block, no structure"
                   " removed: what --quantize gives) before a per-layer or structured candidate that beats it by less"
                   " than this many standard errors of the paired per-window loss difference, on --samples further"
                   " windows of the calibration text held out from the pricing (the calibration windows when the"
                   " text has no more); 0 ranks by calibration loss alone.")
@click.option("--dtype", type=DTYPE, help="Artifact float dtype: float32 or float16 (for GPU providers) [default: float32].")
@click.option("--optimize", type=click.Choice(["basic", "extended", "all"]), help="Offline ONNX Runtime graph optimisation.")
@click.option("--max-memory", type=SIZE, metavar="SIZE", help="Disk and resident limit: 1.5GiB, 300MB or bytes.")
@click.option("--max-disk", type=SIZE, metavar="SIZE",
              help="Limit on the artifact's bytes on disk alone (download, flash): every file but the tool's"
                   " cwca_manifest.json (a few KB, tens with a search's candidates).")
@click.option("--max-latency-ms", type=LATENCY_LIMIT, metavar="MS|int8",
              help="Limit on p50 ms per decoded token, or int8: no slower than this model's plain dynamic int8"
                   " export (--quantize int8), measured here and confirmed beside the winner.")
@click.option("--max-prefill-ms", type=finite(0, min_open=True), help="Limit on p50 ms for the prefill of --prompt-len tokens.")
@click.option("--ep", type=click.Choice(["cpu", "cuda"]), help="ONNX Runtime execution provider [default: cpu].")
@click.option("--batch-size", "batch", type=COUNT, help="Sequences per call in the measured workload [default: 1].")
@click.option("--batch", "batch_alias", type=COUNT, hidden=True, callback=deprecated_alias("export --batch", "--batch-size"),
              help="Deprecated spelling of --batch-size.")
@click.option("--prompt-len", type=COUNT, help="Prefill length for measurement [default: 32].")
@click.option("--context", type=click.IntRange(min=2), help="KV cache length at the measured decode step [default: 128].")
@click.option("--hardware", metavar="PROFILE", help="Hardware profile (cpu-2core-24gb, jetson-orin-8gb, a10g-24gb, h100-80gb) or a YAML path.")
@click.option("--no-kv-cache", is_flag=True,
              help="--backend onnx: export logits only, without KV cache inputs (optimum keeps the cache its loader needs).")
@click.option("--opset", type=COUNT, help="ONNX opset [default: the backend's].")
@click.option("--external-data-threshold", type=SIZE, default="2GiB", show_default=True, metavar="SIZE", help="Weights go to model.onnx_data above this graph size.")
@click.option("--runs", type=COUNT, default=10, show_default=True, help="Timed runs per latency measurement.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed runs before timing.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True, help="ONNX Runtime intra-op threads (0: its default).")
@click.option("--low-memory", is_flag=True,
              help="Load the checkpoint as its safetensors store it (bf16 / fp16 widened into a mapped"
                   " fp32 scratch file, not memory; with --method, fp32), trace with placeholder weights, write the fp32"
                   " weights tensor by tensor, quantize (--quantize) a weight group at a time, and run every ONNX Runtime"
                   " session of the fp32 graph without prepacking: the process's own memory stays a fraction of one fp32"
                   " copy, the weights file pages (docs/memory.md). Not with --max-* limits, --hardware limits or"
                   " --precision. --backend optimum then writes the onnx backend's trace (Optimum's input and output"
                   " names) in Optimum's folder layout, verified through ORTModelForCausalLM.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--no-fingerprint", is_flag=True, help="With --method: apply a --plan whose model fingerprint differs or is missing.")
@loading_options
@guards_output(inputs={"model_dir": "MODEL_DIR", "plan_path": "--plan", "data": "--data"})
def export(
    model_dir, out, backend, plan_path, method, data, text_field, samples, seq_len, quantize, exclude, exclude_layers,
    block_size, formats, precision_path, levels, precision_estimate, precision_damage_path, rounding, significance, dtype,
    optimize, max_memory, max_disk, max_latency_ms, max_prefill_ms, ep, batch, batch_alias, prompt_len, context, hardware,
    no_kv_cache, opset, external_data_threshold, runs, warmup, threads, low_memory, overwrite, as_json,
    no_fingerprint, trust_remote_code, allow_pickle,
) -> None:
    """Export MODEL_DIR (a saved HF causal LM) to a verified ONNX artifact.

    The artifact is checked in ONNX Runtime against the torch model (logits and greedy
    tokens), measured (disk, resident memory, latency) and described in cwca_manifest.json.
    With --max-memory / --max-disk / --max-latency-ms one search finds the artifact with the
    lowest calibration loss that measurement proves within them: structure levels of --plan
    (re-made by the plan's own rule, applied with --method) x per-layer storage formats (an
    exact byte-budget program on measured per-layer damage; with a latency limit each layer's
    formats are timed in ONNX Runtime and the program keeps the predicted latency within it too),
    finalists built and measured. Unstructured and N:M sparsity cannot meet a budget (ONNX
    Runtime runs them dense) and are refused with one. Without --method, --plan is only recorded.

    \b
    Examples:
      cwca-export export ./tiny-llama --out ./tiny-onnx
      cwca-export export ./tiny-llama --backend onnx --quantize int4 --exclude lm_head --out ./q4
      cwca-export export ./tiny-llama --max-memory 300MB --max-latency-ms 20 --out ./fitted
      cwca-export export ./tiny-llama --max-memory 2MB --max-latency-ms int8 --out ./as-fast-as-int8
      cwca-export export ./llama --hardware jetson-orin-8gb --plan plan.json --method width --out ./orin
      cwca-export export ./llama --data calib.txt --samples 32 --seq-len 128 --max-memory 2GiB \\
          --precision-damage precision.json --out ./fit   # the table of score --help's example
    """
    from cwca_export.budget import Budget, latency_limit, parse_size
    from cwca_export.exporter.api import export as run_export
    from cwca_export.exporter.postprocess import QuantizeConfig, is_block_size
    from cwca_export.loading import check_model_folder, load_model, stored_dtype
    from cwca_export.planning.plan import Plan

    if dtype == "bfloat16":
        raise click.BadParameter("ONNX Runtime artifacts are float32 or float16; pass --dtype float16", param_hint="--dtype")
    dtype = {"float32": "fp32", "float16": "fp16"}.get(dtype, dtype)  # the budget's names
    batch = batch or batch_alias
    limits = {
        "max_memory": parse_size(max_memory) if max_memory else None,
        "max_disk": parse_size(max_disk) if max_disk else None,
        **latency_limit(max_latency_ms), "max_prefill_ms": max_prefill_ms,
        "ep": ep, "dtype": dtype, "batch": batch, "prompt_len": prompt_len, "context": context,
    }
    if hardware:
        budget = Budget.from_profile(hardware, **limits)
    else:
        budget = Budget(**{k: v for k, v in limits.items() if v is not None})
    _check_storage_flags(click.get_current_context(), budget, bool(quantize), bool(precision_path))
    _check_levels(click.get_current_context(), budget, plan_path, method)
    quantize_config = None
    if quantize:
        if not is_block_size(block_size):
            nearest = max(16, 1 << (block_size.bit_length() - 1))
            raise click.BadParameter(f"{block_size} is not a power of two >= 16; hint: --block-size {nearest}",
                                     param_hint="--block-size")
        quantize_config = QuantizeConfig(
            quantize, exclude_nodes=tuple(exclude), exclude_layers=parse_layers(exclude_layers), block_size=block_size
        )
    elif exclude or exclude_layers:
        raise click.UsageError("--exclude / --exclude-layers apply to --quantize int8|int4")
    options = {}
    if no_kv_cache:
        options["with_past"] = False
    if opset is not None:
        options["opset"] = opset
    if options:  # a backend without the flag's option refuses here, before the model loads
        from cwca_export.backends import get_backend, weightless_export
        from cwca_export.exporter.build import unknown_options

        chosen = get_backend(backend)
        unknown = unknown_options((weightless_export(chosen) if low_memory else None) or chosen.export, options)
        if unknown:
            flag = {"with_past": "--no-kv-cache", "opset": "--opset"}[unknown[0]]
            raise click.BadParameter(f"backend {backend} does not take it; hint: add --backend onnx", param_hint=flag)
    plan = Plan.load(plan_path) if plan_path else None
    if method and budget.has_limits:
        from cwca_export.compression.registry import get_method
        from cwca_export.exporter.search import dense_storage_message

        if get_method(method).dense_storage:
            raise click.UsageError(dense_storage_message(method))
    if low_memory:
        from cwca_export.backends import get_backend, weightless_export

        if weightless_export(get_backend(backend)) is None:
            raise click.BadParameter(f"backend {backend} has no export that leaves the weights out of its trace;"
                                     " hint: add --backend onnx", param_hint="--low-memory")
        if budget.has_limits:
            limits_from = f"--hardware {hardware} (its limits)" if hardware else "the --max-* limits"
            raise click.BadParameter(f"a budget search builds several artifacts from the model; hint: drop --low-memory"
                                     f" or {limits_from}", param_hint="--low-memory")
        if precision_path:
            raise click.BadParameter("--precision checks its graph against torch with quantized weights, which"
                                     " --low-memory frees; hint: drop one of them", param_hint="--low-memory")
    precision = None
    if precision_path:
        precision = _read_precision(precision_path)
        if quantize:
            raise click.UsageError("--precision and --quantize do not combine; hint: pick one of them")
    if precision_damage_path:
        _precision_damage_search(budget, bool(quantize or precision or low_memory), precision_estimate)
    check_model_folder(model_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                       lengths={"--seq-len": seq_len if data else None, "--context": budget.context})
    from cwca_export.backends import check_config

    check_config(backend, model_dir, trust_remote_code=trust_remote_code)  # a model type it cannot take: before loading
    if low_memory:  # before the model's tensors reach the heap (docs/memory.md, "export --low-memory")
        from cwca_export.exporter.build import return_large_frees

        return_large_frees()
    # --low-memory without compression loads the checkpoint as its safetensors store it (a bfloat16 one
    # stays mapped; mixed or pickle storage loads in float32) and
    # widens it into a float32 scratch file, never into memory (docs/memory.md, "export --low-memory")
    load_dtype = stored_dtype(model_dir, allow_pickle=allow_pickle) if low_memory and not method else "float32"
    model, tokenizer = load_model(model_dir, dtype=load_dtype, trust_remote_code=trust_remote_code,
                                  allow_pickle=allow_pickle)
    from cwca_export.exporter import postprocess

    fp32_bytes = sum(p.numel() for p in model.parameters()) * 4
    # the graph stays inline up to --external-data-threshold (and protobuf's 2 GiB)
    if low_memory and fp32_bytes <= min(parse_size(external_data_threshold), postprocess.PROTOBUF_LIMIT):
        note_line("note: --low-memory saves memory only when the weights go to external data (float32 weights"
                  " above --external-data-threshold, at most 2 GiB; below, the graph is written inline and"
                  " rewritten whole); this model is smaller")
    elif not low_memory and fp32_bytes > postprocess.PROTOBUF_LIMIT and not budget.has_limits and not precision_path:
        from cwca_export.budget import format_size
        from cwca_export.memory_model import EXPORT_COPIES

        held = fp32_bytes * (1 + EXPORT_COPIES["external"])
        note_line(f"note: this export holds the float32 model and its graph, about {format_size(held)};"
                  " --low-memory holds a fraction of one copy, the weights as file pages (docs/memory.md)")
    if precision is not None:  # its groups and formats, before anything is exported
        from cwca_export.planning.precision import check_precision_plan

        try:
            check_precision_plan(model, precision)
        except ValueError as exc:
            raise click.BadParameter(f"{precision_path}: {exc}", param_hint="--precision") from None
    compress_options = {}
    if plan is not None and method:  # the plan is applied here: it must fit this model
        plan.check(model, fingerprint=not no_fingerprint, require_fingerprint=not no_fingerprint)
        if no_fingerprint:
            compress_options["check_fingerprint"] = False
    elif plan is not None:
        note_line(f"note: --plan {plan_path} is recorded in the manifest as the plan behind this model, not applied"
                  " (the model is exported as given); to apply it, pass --method (or run `cwca-export compress`"
                  " first)")
    if not as_json:
        mode = " (low memory: placeholder trace, weights written per tensor)" if low_memory else ""
        note_line(f"exporting {model_dir} with backend {backend}{mode} ...")
    search_calibration = None  # with held-out windows for --significance; else compress_options' data
    if data:
        from cwca_export.data import ShortCalibrationError, calibration_data

        # --significance tests on as many further windows, disjoint from the calibration ones (which they leave
        # as they are, so a --precision-damage table still matches)
        tested = significance > 0 and _storage_searched(budget, bool(quantize), bool(precision_path))
        try:
            calib = calibration_data(data, tokenizer, num_samples=samples, seq_len=seq_len, seed=0,
                                     text_field=text_field, held_out=samples if tested else 0)
        except ShortCalibrationError:
            if not tested:
                raise
            calib = calibration_data(data, tokenizer, num_samples=samples, seq_len=seq_len, seed=0,
                                     text_field=text_field)
            note_line(f"note: --data {data} holds no {samples} further windows of {seq_len} tokens beside the"
                      " calibration ones; --significance tests on the calibration sequences")
        compress_options["data"] = calib.calibration_only()  # what compress methods record, as compress would
        if tested:
            search_calibration = calib
    search_options = {"significance": significance} if budget.has_limits else None
    if precision_damage_path:  # a table measured before (score --estimator precision): checked, then reused
        table, formats = _precision_damage(precision_damage_path, model, tokenizer, compress_options, rounding, formats)
        search_options = {**search_options, "precision_damage": table}
    artifact = run_export(
        model, plan, out, backend=backend, quantize=quantize_config, budget=budget, tokenizer=tokenizer,
        method=method, optimize=optimize, backend_options=options, compress_options=compress_options,
        calibration=search_calibration,
        external_data_threshold=parse_size(external_data_threshold), overwrite=overwrite,
        warmup=warmup, runs=runs, threads=threads, precision=precision, formats=formats, levels=levels,
        precision_estimate=precision_estimate, rounding=rounding, low_memory=low_memory, search_options=search_options,
    )
    if as_json:
        click.echo(json.dumps(artifact.manifest, indent=2))
        return
    for line in _summary(artifact):
        click.echo(line)
