"""The end-to-end demo on the shipped model: score, plan, compress, export, verify, compare.

It runs the same public functions a user calls, on the model and text that ship inside the
package (``cwca_export/assets``), so ``cwca-export demo`` needs no network and no arguments.
"""

from __future__ import annotations

import copy
import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL = ASSETS / "demo-llama"
TRAIN_TEXT = ASSETS / "text" / "train.txt"
HELDOUT_TEXT = ASSETS / "text" / "heldout.txt"
_DEMO_OPTIONS = {"method", "sparsity", "quantize", "max_memory", "max_latency_ms"}  # `cwca-export demo`


@dataclass(frozen=True)
class DemoConfig:
    """What the demo does; the defaults run in a few minutes on 2 CPU cores.

    Attributes:
        method: scoring estimator.
        sparsity: global structured (MLP width) sparsity of the plan.
        hi: per-block cap on the width removed.
        quantize: ONNX Runtime weight quantization of the compressed artifact (None: fp32).
        max_memory: the budget the compressed artifact must meet (bytes; disk and resident).
        max_latency_ms: per-token decode p50 limit at batch 1 over ``context`` tokens.
        samples, seq_len: calibration sequences for scoring and compression.
        eval_tokens: held-out tokens for perplexity (windows of ``eval_seq_len``).
        prompt_len, context: the latency workload.
    """

    method: str = "gradnorm"  # ranks blocks like measured damage on small models (docs/design.md 2.1)
    sparsity: float = 0.3
    hi: float = 0.6
    quantize: str | None = "int8"
    max_memory: int | None = 48 * 2**20
    max_latency_ms: float | None = 50.0
    samples: int = 32
    seq_len: int = 128
    eval_tokens: int = 32_768
    eval_seq_len: int = 256
    prompt_len: int = 32
    context: int = 128


def run_demo(
    out_dir: str | Path,
    config: DemoConfig = DemoConfig(),
    *,
    model_dir: str | Path = DEMO_MODEL,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the pipeline and return the side-by-side report (also written to ``report.json``).

    Example:
        >>> report = run_demo("demo-out")  # doctest: +SKIP
        >>> report["rows"]["compressed"]["perplexity"]  # doctest: +SKIP
    """
    from cwca_export._jsonio import write_bytes_atomic
    from cwca_export.budget import Budget
    from cwca_export.compression import compress, save_compressed
    from cwca_export.data import calibration_data, load_texts
    from cwca_export.evaluate import ort_logits_fn, perplexity_from_logits, tokenize_text, torch_logits_fn
    from cwca_export.exporter.api import export
    from cwca_export.loading import load_model
    from cwca_export.outputs import write_inventory
    from cwca_export.plan import plan_pruning
    from cwca_export.report import build_report
    from cwca_export.scoring import score

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; hint: pass --overwrite or another --out")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def step(name: str, message: str):
        echo(f"[{len(timings) + 1}/6] {message}")
        timings[name] = time.perf_counter()

    def done(name: str) -> None:
        timings[name] = round(time.perf_counter() - timings[name], 1)

    step("score", f"scoring {Path(model_dir).name} with {config.method} on {config.samples} x {config.seq_len} tokens")
    model, tokenizer = load_model(model_dir)
    model.eval()
    calib = calibration_data(TRAIN_TEXT, tokenizer, num_samples=config.samples, seq_len=config.seq_len, seed=0)
    scores = score(model, calib, method=config.method, progress=False, record_wall_time=False)
    scores.save(out / "scores.json")
    done("score")

    step("plan", f"planning {config.sparsity:.0%} structured MLP width (per-block cap {config.hi})")
    plan = plan_pruning(scores, config.sparsity, hi=config.hi)
    plan.save(out / "plan.json")
    done("plan")

    step("compress", "removing MLP channels block by block (activation-weighted)")
    compressed = compress(copy.deepcopy(model), plan, method="width", data=calib)
    save_compressed(compressed, out / "compressed", tokenizer=tokenizer)
    done("compress")

    budget_kw = dict(prompt_len=config.prompt_len, context=config.context)
    step("export_dense", "exporting the dense model (optimum, fp32) as the baseline")
    dense = export(model, None, out / "dense-artifact", tokenizer=tokenizer, overwrite=overwrite,
                   budget=Budget(**budget_kw))
    done("export_dense")

    step("export", f"exporting the compressed model ({config.quantize or 'fp32'}) under the budget")
    budget = Budget(max_memory=config.max_memory, max_latency_ms=config.max_latency_ms, **budget_kw)
    artifact = export(compressed, plan, out / "artifact", tokenizer=tokenizer, quantize=config.quantize,
                      budget=budget, overwrite=overwrite)
    done("export")

    step("eval", f"held-out perplexity on {config.eval_tokens:,} tokens")
    ids = tokenize_text(tokenizer, "\n\n".join(load_texts(HELDOUT_TEXT)))

    def ppl(fn) -> float:
        return perplexity_from_logits(fn, ids, seq_len=config.eval_seq_len, max_tokens=config.eval_tokens).perplexity

    rows = {
        "dense": _row(dense, ppl(torch_logits_fn(model)), ppl(ort_logits_fn(dense.path))),
        "compressed": _row(artifact, ppl(torch_logits_fn(compressed)), ppl(ort_logits_fn(artifact.path))),
    }
    done("eval")

    report = {
        "model": str(model_dir),
        "config": config.__dict__,
        "rows": rows,
        "budget": artifact.manifest.get("budget"),
        "paths": {
            "scores": str(out / "scores.json"),
            "plan": str(out / "plan.json"),
            "compressed_model": str(out / "compressed"),
            "dense_artifact": str(dense.path),
            "artifact": str(artifact.path),
            "html": str(out / "report.html"),
        },
        "seconds": timings,
        "commands": demo_commands(out, config, model_dir),
    }
    write_bytes_atomic(out / "report.json", (json.dumps(report, indent=2, default=str) + "\n").encode())
    page = build_report(out)
    write_inventory(out)  # the record that lets --overwrite and inspect --verify know these files
    echo(format_table(rows))
    echo(f"artifact: {artifact.path}\nreport:   {out / 'report.json'}\nhtml:     {page}")
    return report


def demo_commands(out: Path, config: DemoConfig, model_dir: str | Path = DEMO_MODEL) -> list[str]:
    """The demo as one command, then the CLI commands equivalent to each of its steps."""
    q = shlex.quote

    def at(name: str) -> str:
        return q(str(Path(out) / name))

    model, outq, train, heldout = q(str(model_dir)), q(str(out)), q(str(TRAIN_TEXT)), q(str(HELDOUT_TEXT))
    calib = f"--data {train} --samples {config.samples} --seq-len {config.seq_len} --seed 0"
    workload = f"--prompt-len {config.prompt_len} --context {config.context}"
    limits = ""
    if config.max_memory is not None:
        limits += f" --max-memory {config.max_memory}"
    if config.max_latency_ms is not None:
        limits += f" --max-latency-ms {config.max_latency_ms:g}"
    quantize = f" --quantize {config.quantize}" if config.quantize else ""
    default = DemoConfig()
    hidden = {  # settings `cwca-export demo` has no option for
        k: v for k, v in config.__dict__.items()
        if getattr(default, k) != v and (k not in _DEMO_OPTIONS or v is None)
    }
    if Path(model_dir) != DEMO_MODEL:
        hidden["model_dir"] = str(model_dir)
    if hidden:
        args = ", ".join(f"{k}={v!r}" for k, v in hidden.items())
        demo = f"# Python: run_demo({str(out)!r}, DemoConfig({args}))"
    else:
        demo = (f"cwca-export demo --out {outq} --method {config.method} --sparsity {config.sparsity:g}"
                f" --quantize {config.quantize or 'none'}{limits}")
    evals = [
        f"cwca-export eval {p} --data {heldout} --seq-len {config.eval_seq_len} --max-tokens {config.eval_tokens}"
        for p in (model, at("dense-artifact"), at("compressed"), at("artifact"))
    ]
    return [
        demo,
        "# the same steps one by one:",
        f"cwca-export score {model} {calib} --method {config.method} --no-wall-time --out {at('scores.json')}",
        f"cwca-export plan {at('scores.json')} --program prune --sparsity {config.sparsity:g} --hi {config.hi:g}"
        f" --out {at('plan.json')}",
        f"cwca-export compress {model} --plan {at('plan.json')} --method width {calib} --out {at('compressed')}",
        f"cwca-export export {model} --out {at('dense-artifact')} {workload}",
        f"cwca-export export {at('compressed')} --plan {at('plan.json')} --out {at('artifact')}{quantize}"
        f"{limits} {workload}",
        *evals,
        f"cwca-export report {outq}",
    ]


def _row(artifact, torch_ppl: float, ort_ppl: float) -> dict[str, Any]:
    latency = artifact.latency_ms
    return {
        "disk_bytes": artifact.disk_bytes,
        "resident_bytes": artifact.resident_bytes,
        "prefill_ms_p50": latency["prefill"]["p50"],
        "decode_ms_p50": latency["decode"]["p50"],
        "perplexity_torch": torch_ppl,
        "perplexity": ort_ppl,
    }


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """Dense and compressed side by side, with the compressed/dense ratio."""
    from cwca_export.budget import format_size

    dense, comp = rows["dense"], rows["compressed"]
    lines = [f"{'':24}{'dense':>14}{'compressed':>14}{'ratio':>8}"]
    for key, label, fmt in (
        ("disk_bytes", "disk", format_size),
        ("resident_bytes", "resident memory", format_size),
        ("prefill_ms_p50", "prefill p50 (ms)", lambda v: f"{v:.2f}"),
        ("decode_ms_p50", "decode p50 (ms/token)", lambda v: f"{v:.3f}"),
        ("perplexity", "held-out perplexity", lambda v: f"{v:.2f}"),
    ):
        a, b = dense[key], comp[key]
        ratio = f"{b / a:.2f}x" if a else "-"
        lines.append(f"{label:24}{fmt(a):>14}{fmt(b):>14}{ratio:>8}")
    return "\n".join(lines)
