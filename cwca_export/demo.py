"""The end-to-end demo on the shipped model: score, plan, compress, export, verify, compare.

It runs the same public functions a user calls, on the model and text that ship inside the
package (``cwca_export/assets``), so ``cwca-export demo`` needs no network and no arguments.
"""

from __future__ import annotations

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
_DEMO_OPTIONS = {"sparsity", "max_disk_fraction", "max_latency_ms"}  # `cwca-export demo`


@dataclass(frozen=True)
class DemoConfig:
    """What the demo does; the defaults run in a few minutes on 2 CPU cores.

    Attributes:
        sparsity: global structured (MLP width) sparsity of the plan the budget search moves.
        hi: per-block cap on the width removed.
        max_disk_fraction: the artifact budget as a fraction of the dense fp32 artifact's bytes,
            below what plain int8 (0.28x) and int4 reach.
        max_latency_ms: per-token decode p50 limit at batch 1 over ``context`` tokens, or
            ``"int8"``: no slower than the dense int8 peer (``--max-latency-ms int8``).
        probes: the measured-damage probe points (fractions of each block's MLP width removed).
        samples, seq_len: calibration sequences for scoring, compression and the search.
        eval_tokens: held-out tokens for perplexity (windows of ``eval_seq_len``).
        prompt_len, context: the latency workload.
    """

    sparsity: float = 0.3
    hi: float = 0.6
    max_disk_fraction: float = 0.15
    max_latency_ms: float | str | None = 50.0
    probes: str = "0.25,0.5,0.75"
    samples: int = 16
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
    from cwca_export.budget import Budget, latency_limit
    from cwca_export.data import calibration_data, load_texts
    from cwca_export.evaluate import ort_logits_fn, perplexity_from_logits, tokenize_text, torch_logits_fn
    from cwca_export.exporter.api import export
    from cwca_export.jsonio import write_bytes_atomic
    from cwca_export.loading import load_model
    from cwca_export.outputs import check_output, write_inventory
    from cwca_export.planning.plan import plan_by_rule
    from cwca_export.report import build_report
    from cwca_export.scoring import score

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; hint: pass --overwrite or another --out")
    check_output(out, overwrite=overwrite)  # only an earlier demo exactly as written (the CLI moved it aside)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def step(name: str, message: str):
        echo(f"[{len(timings) + 1}/6] {message}")
        timings[name] = time.perf_counter()

    def done(name: str) -> None:
        timings[name] = round(time.perf_counter() - timings[name], 1)

    step("score", f"measuring each block's damage when its MLP is narrowed ({config.probes}) on"
         f" {config.samples} x {config.seq_len} tokens")
    model, tokenizer = load_model(model_dir)
    model.eval()
    calib = calibration_data(TRAIN_TEXT, tokenizer, num_samples=config.samples, seq_len=config.seq_len, seed=0)
    scores = score(model, calib, method="damage", options={"pruner": "width", "points": config.probes},
                   progress=False, record_wall_time=False)
    scores.save(out / "scores.json")
    done("score")

    step("plan", f"planning {config.sparsity:.0%} MLP width on the measured curves (per-block cap {config.hi})")
    plan = plan_by_rule(scores, config.sparsity, rule="damage", hi=config.hi)
    plan.save(out / "plan.json")
    done("plan")

    budget_kw = dict(prompt_len=config.prompt_len, context=config.context)
    step("export_peers", "exporting the dense model as fp32, int8 and int4 (what a user tries first)")
    peers = {}
    for name, quantize in (("dense", None), ("dense-int8", "int8"), ("dense-int4", "int4")):
        peers[name] = export(model, None, out / f"{name}-artifact", tokenizer=tokenizer, quantize=quantize,
                             overwrite=overwrite, budget=Budget(**budget_kw))
    done("export_peers")

    max_disk = int(config.max_disk_fraction * peers["dense"].disk_bytes)
    step("export", f"searching structure x per-layer precision for {config.max_disk_fraction:g}x of the dense"
         f" bytes ({max_disk / 2**20:.2f} MiB), below plain int8 and int4")
    budget = Budget(max_disk=max_disk, **latency_limit(config.max_latency_ms), **budget_kw)
    artifact = export(model, plan, out / "artifact", tokenizer=tokenizer, method="width", budget=budget,
                      compress_options={"data": calib}, overwrite=overwrite)
    done("export")

    step("eval", f"held-out perplexity on {config.eval_tokens:,} tokens")
    ids = tokenize_text(tokenizer, "\n\n".join(load_texts(HELDOUT_TEXT)))

    def ppl(fn) -> float:
        return perplexity_from_logits(fn, ids, seq_len=config.eval_seq_len, max_tokens=config.eval_tokens).perplexity

    rows = {name: _row(art, ppl(ort_logits_fn(art.path))) for name, art in peers.items()}
    rows["searched"] = _row(artifact, ppl(ort_logits_fn(artifact.path)))
    rows["dense"]["perplexity_torch"] = ppl(torch_logits_fn(model))
    done("eval")

    chosen = (artifact.manifest.get("budget") or {}).get("search", {}).get("chosen") or {}
    report = {
        "model": str(model_dir),
        "config": config.__dict__,
        "rows": rows,
        "budget": artifact.manifest.get("budget"),
        "chosen": {"t": chosen.get("t"), "target_sparsity": chosen.get("target"), "storage": chosen.get("storage"),
                   "formats": chosen.get("formats")},
        "paths": {
            "scores": str(out / "scores.json"),
            "plan": str(out / "plan.json"),
            **{f"{name}_artifact": str(art.path) for name, art in peers.items()},
            "artifact": str(artifact.path),
            "html": str(out / "report.html"),
        },
        "seconds": timings,
        "commands": demo_commands(out, config, model_dir, max_disk=max_disk),
    }
    write_bytes_atomic(out / "report.json", (json.dumps(report, indent=2, default=str) + "\n").encode())
    page = build_report(out)
    write_inventory(out)  # the record that lets --overwrite and inspect --verify know these files
    echo(format_table(rows))
    if chosen:
        echo(f"searched: structure level t={chosen.get('t'):g} (MLP width sparsity {chosen.get('target') or 0:.3g}),"
             f" storage {chosen.get('storage')}")
    echo(f"artifact: {artifact.path}\nreport:   {out / 'report.json'}\nhtml:     {page}")
    return report


def demo_commands(out: Path, config: DemoConfig, model_dir: str | Path = DEMO_MODEL, *,
                  max_disk: int | None = None) -> list[str]:
    """The demo as one command, then the CLI commands equivalent to each of its steps.

    ``max_disk`` is the searched export's byte limit, known once the dense artifact is measured;
    without it that command carries the placeholder ``MAX_DISK``.
    """
    q = shlex.quote

    def at(name: str) -> str:
        return q(str(Path(out) / name))

    model, outq, train, heldout = q(str(model_dir)), q(str(out)), q(str(TRAIN_TEXT)), q(str(HELDOUT_TEXT))
    calib = f"--data {train} --samples {config.samples} --seq-len {config.seq_len}"
    workload = f"--prompt-len {config.prompt_len} --context {config.context}"
    limit = config.max_latency_ms
    latency = "" if limit is None else f" --max-latency-ms {limit if isinstance(limit, str) else format(limit, 'g')}"
    disk = max_disk if max_disk is not None else "MAX_DISK"  # known once the dense artifact is measured
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
        demo = (f"cwca-export demo --out {outq} --sparsity {config.sparsity:g}"
                f" --max-disk-fraction {config.max_disk_fraction:g}{latency}")
    evals = [
        f"cwca-export eval {p} --data {heldout} --seq-len {config.eval_seq_len} --max-tokens {config.eval_tokens}"
        for p in (model, *(at(f"{n}-artifact") for n in ("dense", "dense-int8", "dense-int4")), at("artifact"))
    ]
    return [
        demo,
        "# the same steps one by one (--max-disk: the fraction times the dense artifact's bytes):",
        f"cwca-export score {model} {calib} --estimator damage --option pruner=width"
        f" --option points={config.probes} --no-wall-time --out {at('scores.json')}",
        f"cwca-export plan {at('scores.json')} --program prune --rule damage --sparsity {config.sparsity:g}"
        f" --hi {config.hi:g} --out {at('plan.json')}",
        f"cwca-export export {model} --out {at('dense-artifact')} {workload}",
        f"cwca-export export {model} --quantize int8 --out {at('dense-int8-artifact')} {workload}",
        f"cwca-export export {model} --quantize int4 --out {at('dense-int4-artifact')} {workload}",
        f"cwca-export export {model} --plan {at('plan.json')} --method width {calib} --max-disk {disk}{latency}"
        f" --out {at('artifact')} {workload}",
        *evals,
        f"cwca-export report {outq}",
    ]


def _row(artifact, ort_ppl: float) -> dict[str, Any]:
    latency = artifact.latency_ms
    return {
        "disk_bytes": artifact.disk_bytes,
        "resident_bytes": artifact.resident_bytes,
        "prefill_ms_p50": latency["prefill"]["p50"],
        "decode_ms_p50": latency["decode"]["p50"],
        "perplexity": ort_ppl,
    }


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """Every artifact side by side; sizes also as a fraction of the dense fp32 artifact."""
    from cwca_export.budget import format_size

    names = list(rows)
    dense = rows["dense"]
    lines = [f"{'':24}" + "".join(f"{n:>14}" for n in names)]
    for key, label, fmt in (
        ("disk_bytes", "disk", format_size),
        ("disk_bytes", "  of dense fp32", None),
        ("resident_bytes", "resident memory", format_size),
        ("prefill_ms_p50", "prefill p50 (ms)", lambda v: f"{v:.2f}"),
        ("decode_ms_p50", "decode p50 (ms/token)", lambda v: f"{v:.3f}"),
        ("perplexity", "held-out perplexity", lambda v: f"{v:.2f}"),
    ):
        cells = []
        for n in names:
            v = rows[n].get(key)
            if fmt is None:
                cells.append(f"{v / dense[key]:.3f}x" if v and dense[key] else "-")
            else:
                cells.append(fmt(v) if v is not None else "-")
        lines.append(f"{label:24}" + "".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)
