"""Export benchmark: compressed vs dense Optimum export time, and dense / int8 / budget-fitted artifacts.

Builds a small Llama from a config (no download), narrows every block's MLP and factorises
one attention projection per block by hand (the shapes ``cwca_export.compress`` produces),
then, in one run:

1. times Optimum's ``onnx_export_from_model`` on the dense and on the compressed model
   (median of ``--repeats``; target: compressed <= 1.3x dense);
2. exports dense fp32, dense int8 and a budget-fitted artifact through ``cwca_export.export``
   and tabulates disk bytes, peak resident memory and ORT latency side by side.

Usage:
    .venv/bin/python benchmarks/bench_export.py [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

import cwca_export
from cwca_export.budget import Budget, format_size
from cwca_export.versions import library_versions

CONFIG = {
    "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 512,
}
WORKLOAD = {"batch": 1, "prompt_len": 32, "context": 128}


def compressed_copy(model: nn.Module) -> nn.Module:
    """Heterogeneous MLP widths (1/2 .. 1/4 of 1024) and a rank-32 q_proj in every block."""
    from cwca_export.compression.lowrank import factorised_linear, svd_factors
    from cwca_export.compression.width import narrow_linear

    model = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            keep = torch.arange([512, 384, 256, 384][i % 4])
            for name, dim in (("gate_proj", "out"), ("up_proj", "out"), ("down_proj", "in")):
                narrow_linear(getattr(layer.mlp, name), dim, keep)
            q = layer.self_attn.q_proj
            layer.self_attn.q_proj = factorised_linear(q, *svd_factors(q.weight, 32))
    return model


def time_optimum_export(model: nn.Module, repeats: int) -> float:
    from optimum.exporters.onnx import onnx_export_from_model

    times = []
    for _ in range(repeats):
        folder = Path(tempfile.mkdtemp())
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_export_from_model(model, folder, task="text-generation-with-past", do_validation=False)
        times.append(time.perf_counter() - start)
        shutil.rmtree(folder)
    return statistics.median(times)


def _machine() -> str:
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    cpu = next(
        (ln.split(":", 1)[1].strip()
         for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
         if ln.startswith("Model name")),
        platform.processor() or "unknown CPU",
    )
    return f"{cpu}, nproc={cores}, {platform.system()} {platform.release()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="export timings per model (median)")
    parser.add_argument("--runs", type=int, default=20, help="timed ORT runs per latency measurement")
    parser.add_argument("--out", default=None, help="Write the markdown report here too (it always prints).")
    args = parser.parse_args()

    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), attn_implementation="eager").eval()
    small = compressed_copy(dense)
    t_dense = time_optimum_export(dense, args.repeats)
    t_small = time_optimum_export(small, args.repeats)

    work = Path(tempfile.mkdtemp())
    plain = Budget(**WORKLOAD)
    rows = []
    for label, model, kwargs in [
        ("dense fp32", dense, {}),
        ("dense int8", dense, {"quantize": "int8"}),
        ("compressed fp32", small, {}),
    ]:
        art = cwca_export.export(model, None, work / label.replace(" ", "-"), budget=plain, runs=args.runs, **kwargs)
        rows.append((label, art))
    # budget: halfway between the dense fp32 and dense int8 peaks, so the search must act
    limit = (rows[0][1].resident_bytes + rows[1][1].resident_bytes) // 2
    fitted = cwca_export.export(dense, None, work / "fitted", budget=Budget(max_memory=limit, **WORKLOAD),
                                runs=args.runs)
    chosen = fitted.manifest["budget"]["search"]["chosen"]
    rows.append((f"budget-fitted (<= {format_size(limit)}: {chosen['quantize'] or chosen['dtype']})", fitted))

    lines = [
        "# Export benchmark",
        "",
        f"Command: `{Path(sys.executable).name} benchmarks/bench_export.py --repeats {args.repeats}"
        f" --runs {args.runs}`",
        f"Machine: {_machine()} (shared with other jobs: latencies are indicative)",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in library_versions().items()),
        f"Model: Llama from config {CONFIG} ({sum(p.numel() for p in dense.parameters()):,} parameters);"
        " compressed = MLP widths 512/384/256/384 of 1024 per block + rank-32 q_proj"
        f" ({sum(p.numel() for p in small.parameters()):,} parameters)",
        f"Workload: batch {WORKLOAD['batch']}, prefill {WORKLOAD['prompt_len']} tokens, decode at context"
        f" {WORKLOAD['context']}, CPUExecutionProvider, {args.runs} timed runs after 3 warm-up",
        "",
        "## Optimum export time (onnx_export_from_model, median of "
        f"{args.repeats})",
        "",
        "| model | seconds |",
        "|---|---|",
        f"| dense | {t_dense:.2f} |",
        f"| compressed (heterogeneous widths, factorised) | {t_small:.2f} |",
        f"| ratio compressed / dense | {t_small / t_dense:.2f} (target <= 1.3) |",
        "",
        "## Artifacts (cwca_export.export, optimum backend, verified against torch)",
        "",
        "| artifact | disk | peak resident | prefill p50 ms | decode p50 ms | rel. RMS logits |",
        "|---|---|---|---|---|---|",
    ]
    for label, art in rows:
        lat = art.latency_ms
        lines.append(
            f"| {label} | {format_size(art.disk_bytes)} | {format_size(art.resident_bytes)} |"
            f" {lat['prefill']['p50']:.3f} | {lat['decode']['p50']:.3f} | {art.parity['rel_rms']:.2e} |"
        )
    lines += [
        "",
        "Peak resident: VmHWM of a fresh process through session creation, one prefill and one"
        " decode step, minus its VmRSS before the session (MALLOC_ARENA_MAX=1).",
        "",
    ]
    if args.out:
        Path(args.out).write_text("\n".join(lines))
    shutil.rmtree(work)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
