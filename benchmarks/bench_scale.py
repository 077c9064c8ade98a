"""The recommended path at three model sizes: measured peak memory and time per step against
the memory model (``cwca_export/memory_model.py``), and the model's projection to 7B and 70B.

Three Llama models are built from configs here (random init, fp32, saved as real Hugging Face
folders with the shipped model's tokenizer: its 4,096 ids fit every vocabulary below), and
every step runs as its own ``python -m cwca_export`` subprocess, so its peak resident memory
is the ``ru_maxrss`` that ``os.wait4`` reports for it (the largest process of its tree: the
export's measurement worker is counted on its own, not added). Linux starts a child's
``ru_maxrss`` at its parent's peak when it forks, so the models are built in a process of their
own and this one stays small; each row records this process's peak at the step's launch
(``parent_peak_rss``), the floor under what the step can report. Steps:

    score --estimator damage (wanda probes)  score --estimator fisher (plain scoring)
    refine (wanda)                           plan (uniform, the baseline)
    compress: wanda (refined plan), magnitude, sparsegpt, width, lowrank, asvd, wanda (uniform)
    export: optimum fp32, onnx int8, onnx int4
    eval: the compressed torch folder, the optimum artifact

Usage:
    python benchmarks/bench_scale.py [--sizes 5m,40m,150m] [--samples 8] [--seq-len 128]
        [--out benchmarks/results/bench_scale.json] [--keep DIR]

Times are wall seconds on whatever machine runs it (on a contended machine they vary run to
run); the memory model's time units are relative, compared as ratios only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "cwca_export" / "assets"
CALIB = ASSETS / "text" / "heldout-guides.txt"
HELDOUT = ASSETS / "text" / "heldout-library.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# name -> LlamaConfig fields; the parameter counts are printed by the run
SIZES: dict[str, dict[str, Any]] = {
    "5m": dict(hidden_size=256, num_hidden_layers=6, intermediate_size=688, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
    "40m": dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1376, num_attention_heads=8,
                num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=True),
    "150m": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2816, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
}
SPARSITY = 0.5
# baselines: what the interpreter holds after importing what a step imports, measured
_LIBRARIES = ("import torch, transformers, accelerate, cwca_export.cli, cwca_export.scoring, cwca_export.compression,"
              " cwca_export.planning.damage, cwca_export.evaluate, cwca_export.loading;"
              " from transformers import LlamaForCausalLM, AutoTokenizer;"
              f" tok = AutoTokenizer.from_pretrained({str(ASSETS / 'demo-llama')!r});"
              f" ids = tok(open({str(HELDOUT)!r}, encoding='utf-8').read())")
BASELINE_IMPORTS = {  # the tool's libraries imported and a text tokenised: what every step holds first
    "torch": _LIBRARIES,
    "onnx": _LIBRARIES + "; import onnx, onnxruntime, onnxruntime.quantization, optimum.exporters.onnx",
}


def build_model(name: str, folder: Path) -> dict[str, Any]:
    """A random-init fp32 Llama of the named size, saved as a model folder with a tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=2048, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                         **SIZES[name])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for file in TOKENIZER_FILES:
        shutil.copy(ASSETS / "demo-llama" / file, folder / file)
    return {"params": sum(p.numel() for p in model.parameters()), **SIZES[name]}


def proc_status_bytes(pid: int | str, fields: tuple[str, ...]) -> dict[str, int]:
    """``fields`` of ``/proc/PID/status`` (VmHWM, VmRSS, RssAnon...) in bytes; 0 for a process gone."""
    out = dict.fromkeys(fields, 0)
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                key = line.split(":")[0]
                if key in out:
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def own_peak_rss() -> int:
    """This process's peak resident bytes (VmHWM): a child's ru_maxrss starts there."""
    return proc_status_bytes("self", ("VmHWM",))["VmHWM"]


def build_model_in_child(name: str, folder: Path, env: dict[str, str]) -> dict[str, Any]:
    """:func:`build_model` in a process of its own, so this one's peak (which every later step's
    ru_maxrss would start from) stays that of a small interpreter."""
    code = ("import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import bench_scale;"
            " bench_scale.SIZES[sys.argv[2]] = json.loads(sys.argv[3]);"
            " print(json.dumps(bench_scale.build_model(sys.argv[2], Path(sys.argv[4]))))")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), name,
                           json.dumps(SIZES[name]), str(folder)], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"building the {name} model failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_step(args: list[str], cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``python -m cwca_export ARGS``; its wall time and peak RSS (os.wait4's ru_maxrss), and
    this process's own peak at the launch (``parent_peak_rss``: the floor under ru_maxrss)."""
    parent_peak = own_peak_rss()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cwca_export", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"cwca-export {' '.join(args)} exited {proc.returncode}:\n{out.decode()[-3000:]}")
    return {"wall_s": wall, "peak_rss": usage.ru_maxrss * 1024, "parent_peak_rss": parent_peak, "args": args}


def baseline_rss(code: str, env: dict[str, str]) -> int:
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"baseline {code!r} failed")
    return usage.ru_maxrss * 1024


def steps_for(size: str, work: Path, samples: int, seq_len: int, batch: int, config: dict[str, Any],
              quick: bool, points: str = "0.3,0.5,0.7,0.9") -> list[tuple[str, list[str]]]:
    """(step name, CLI arguments) in run order: every output the next step needs comes first."""
    model = str(work / "model")
    calib = ["--data", str(CALIB), "--samples", str(samples), "--seq-len", str(seq_len)]
    hidden = config["hidden_size"]
    rank_step = max(1, hidden // 16)
    units = 8  # half of the full rank (hidden) per Linear of a block, on average
    export_common = ["--runs", "3", "--warmup", "1", "--prompt-len", "16", "--context", "32"]
    steps = [
        ("score_damage", ["score", model, *calib, "--estimator", "damage", "--option", "pruner=wanda",
                          "--option", f"points={points}",
                          "--batch-size", str(batch), "--no-progress", "--out", str(work / "damage.json")]),
        ("score_fisher", ["score", model, *calib, "--estimator", "fisher", "--no-progress",
                          "--out", str(work / "fisher.json")]),
        ("plan_uniform", ["plan", str(work / "fisher.json"), "--program", "prune", "--sparsity", str(SPARSITY),
                          "--rule", "band", "--band", "0", "--out", str(work / "uniform.json")]),
        ("refine", ["refine", model, "--scores", str(work / "damage.json"), "--sparsity", str(SPARSITY),
                    *calib, "--method", "wanda", "--max-evals", "8", "--out", str(work / "plan.json")]),
        ("compress_wanda", ["compress", model, "--plan", str(work / "plan.json"), "--method", "wanda", *calib,
                            "--batch-size", str(batch), "--out", str(work / "wanda")]),
        ("compress_uniform", ["compress", model, "--plan", str(work / "uniform.json"), "--method", "wanda",
                              *calib, "--batch-size", str(batch), "--out", str(work / "uniform")]),
        ("export_optimum", ["export", str(work / "wanda"), "--backend", "optimum", *export_common,
                            "--out", str(work / "art-optimum")]),
        ("export_uniform", ["export", str(work / "uniform"), "--backend", "optimum", *export_common,
                            "--out", str(work / "art-uniform")]),
        ("eval_torch", ["eval", str(work / "wanda"), "--data", str(HELDOUT), "--seq-len", str(seq_len),
                        "--max-tokens", str(8 * seq_len), "--batch-size", str(batch)]),
        ("eval_onnx", ["eval", str(work / "art-optimum"), "--data", str(HELDOUT), "--seq-len", str(seq_len),
                       "--max-tokens", str(8 * seq_len), "--batch-size", str(batch)]),
    ]
    if quick:
        return steps
    steps += [
        ("compress_magnitude", ["compress", model, "--plan", str(work / "plan.json"), "--method", "magnitude",
                                "--out", str(work / "magnitude")]),
        ("compress_sparsegpt", ["compress", model, "--plan", str(work / "plan.json"), "--method", "sparsegpt",
                                *calib, "--batch-size", str(batch), "--out", str(work / "sparsegpt")]),
        ("compress_width", ["compress", model, "--plan", str(work / "plan.json"), "--method", "width", *calib,
                            "--batch-size", str(batch), "--out", str(work / "width")]),
        ("plan_ranks", ["plan", str(work / "fisher.json"), "--program", "allocate",
                        "--budget", str(units * config["num_hidden_layers"]), "--lo", "1", "--hi", str(2 * units),
                        "--out", str(work / "ranks.json")]),
        ("compress_lowrank", ["compress", model, "--plan", str(work / "ranks.json"), "--method", "lowrank",
                              "--rank-step", str(rank_step), "--out", str(work / "lowrank")]),
        ("compress_asvd", ["compress", model, "--plan", str(work / "ranks.json"), "--method", "asvd",
                           "--rank-step", str(rank_step), *calib, "--batch-size", str(batch),
                           "--out", str(work / "asvd")]),
        ("export_onnx_int8", ["export", str(work / "wanda"), "--backend", "onnx", "--quantize", "int8",
                              *export_common, "--out", str(work / "art-int8")]),
        ("export_onnx_int4", ["export", str(work / "wanda"), "--backend", "onnx", "--quantize", "int4",
                              *export_common, "--out", str(work / "art-int4")]),
        ("export_onnx_lowmem", ["export", str(work / "wanda"), "--backend", "onnx", "--low-memory",
                                *export_common, "--out", str(work / "art-lowmem")]),
        ("export_onnx_lowmem_int8", ["export", str(work / "wanda"), "--backend", "onnx", "--low-memory",
                                     "--quantize", "int8", *export_common, "--out", str(work / "art-lowmem-int8")]),
        ("eval_onnx_lowmem", ["eval", str(work / "art-optimum"), "--data", str(HELDOUT), "--seq-len", str(seq_len),
                              "--max-tokens", str(8 * seq_len), "--batch-size", str(batch), "--low-memory"]),
    ]
    return steps


def size_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size,
            "damage_points": args.points, "sparsity": SPARSITY, "calibration": CALIB.name, "heldout": HELDOUT.name}


def run_size(size: str, work: Path, args: argparse.Namespace, env: dict[str, str],
             baselines: dict[str, int]) -> dict[str, Any]:
    from cwca_export import memory_model as mm

    if args.only and (work / "model" / "config.json").exists():
        config = {"params": mm.ModelShape.from_folder(work / "model").params, **SIZES[size]}
    else:
        config = build_model_in_child(size, work / "model", env)
    shape = mm.ModelShape.from_folder(work / "model")
    runs = mm.RunSettings(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                          eval_tokens=8 * args.seq_len)
    print(f"\n== {size}: {config['params'] / 1e6:.1f}M parameters, {shape.blocks} blocks x {shape.hidden} hidden,"
          f" vocabulary {shape.vocab}", flush=True)
    results: dict[str, Any] = {}
    for name, cli_args in steps_for(size, work, args.samples, args.seq_len, args.batch_size, config,
                                    quick=size in args.quick, points=args.points):
        if args.only and name not in args.only.split(","):
            continue
        measured = run_step(cli_args, ROOT, env)
        row: dict[str, Any] = {"wall_s": round(measured["wall_s"], 2), "peak_rss": measured["peak_rss"],
                               "parent_peak_rss": measured["parent_peak_rss"],
                               "command": "cwca-export " + " ".join(a.replace(str(work), "$WORK") for a in cli_args)}
        predicted = mm.predict(name, shape, runs, runtime=baselines)
        if predicted is not None:
            row.update(predicted_peak=predicted.peak_bytes, predicted_time=round(predicted.time_units, 3),
                       ratio=round(measured["peak_rss"] / predicted.peak_bytes, 3),
                       terms={k: int(v) for k, v in predicted.terms.items()})
        results[name] = row
        partial = Path(args.out).with_suffix(".partial.json")  # what finished so far, if the run is cut short
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"size": size, "config": config, "settings": size_settings(args),
                                       "runtime_baselines": baselines, "steps": results}, indent=2) + "\n",
                           encoding="utf-8")
        ratio = f"{row['ratio']:.2f}" if "ratio" in row else "-"
        pred = f"{row['predicted_peak'] / 2**20:8.0f}" if "predicted_peak" in row else "       -"
        print(f"{name:20s} {row['wall_s']:8.1f} s  peak {row['peak_rss'] / 2**20:8.0f} MiB"
              f"  predicted {pred} MiB  ratio {ratio}", flush=True)
    return {"config": config, "shape": shape.to_dict(), "steps": results, "settings": size_settings(args),
            "time": timing(results)}


RECOMMENDED_STEPS = ("score_damage", "refine", "compress_wanda", "export_optimum")
PLAIN_STEPS = ("score_fisher", "compress_uniform", "export_uniform")


def timing(steps: dict[str, Any]) -> dict[str, Any] | None:
    """Wall time of the recommended path against plain scoring + one uniform compress and export."""
    if not all(s in steps for s in (*RECOMMENDED_STEPS, *PLAIN_STEPS)):
        return None
    recommended = sum(steps[s]["wall_s"] for s in RECOMMENDED_STEPS)
    plain = sum(steps[s]["wall_s"] for s in PLAIN_STEPS)
    return {"recommended_s": round(recommended, 1), "plain_s": round(plain, 1), "ratio": round(recommended / plain, 2)}


def predicted_rows(sizes: dict[str, Any], settings: dict[str, Any], baselines: dict[str, int]) -> None:
    """(Re)compute every step's prediction and ratio in ``sizes`` in place: the ratio of the
    whole peak, and of the part above the interpreter baseline (``model_ratio``)."""
    from cwca_export import memory_model as mm

    for size in sizes.values():
        own = size.setdefault("settings", settings)
        run = mm.RunSettings(samples=own["samples"], seq_len=own["seq_len"], batch_size=own["batch_size"],
                             eval_tokens=8 * own["seq_len"],
                             damage_points=len(str(own.get("damage_points", "0.3,0.5,0.7,0.9")).split(",")))
        shape = mm.ModelShape.from_config(size["config"])
        size["shape"] = shape.to_dict()
        for name, row in size["steps"].items():
            predicted = mm.predict(name, shape, run, runtime=baselines)
            for key in ("predicted_peak", "predicted_time", "ratio", "model_ratio", "terms"):
                row.pop(key, None)
            if predicted is None:
                continue
            base = predicted.runtime
            row.update(predicted_peak=predicted.peak_bytes, predicted_time=round(predicted.time_units, 3),
                       ratio=round(row["peak_rss"] / predicted.peak_bytes, 3),
                       model_ratio=round((row["peak_rss"] - base) / max(predicted.peak_bytes - base, 1), 3),
                       terms={k: int(v) for k, v in predicted.terms.items()})


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version()}


def merge(files: list[str], out: Path) -> None:
    from cwca_export import memory_model as mm
    from cwca_export.versions import library_versions

    results = []
    for f in files:
        result = json.loads(Path(f).read_text(encoding="utf-8"))
        if "steps" in result:  # a .partial.json: one size, cut short
            result = {"settings": result["settings"], "runtime_baselines": result.get("runtime_baselines"),
                      "partial": True,
                      "sizes": {result["size"]: {k: result[k] for k in ("config", "settings", "steps")}}}
        results.append(result)
    results.sort(key=lambda r: "partial" in r)  # a full result's machine and versions go first
    merged = dict(results[0])
    merged["sizes"] = {}
    if "machine" not in merged:  # partial files only: they ran here
        merged["machine"] = machine()
        merged["versions"] = library_versions()
    for result in results:  # a size in several files: the later files' steps join (or replace) the earlier's
        for size, data in result["sizes"].items():
            if "settings" not in data:
                data["settings"] = result["settings"]
            if size in merged["sizes"]:
                merged["sizes"][size]["steps"].update(data["steps"])
            else:
                merged["sizes"][size] = data
    for data in merged["sizes"].values():
        data["time"] = timing(data["steps"])
    merged.pop("settings", None)
    merged["commands"] = [c for r in results for c in (r.get("commands") or [r.get("command")])]
    known = [r["runtime_baselines"] for r in results if r.get("runtime_baselines")]
    if known:  # machine constants: the first run's
        merged["runtime_baselines"] = known[0]
    else:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        merged["runtime_baselines"] = {key: baseline_rss(code, env) for key, code in BASELINE_IMPORTS.items()}
    predicted_rows(merged["sizes"], {}, merged["runtime_baselines"])
    merged["projection"] = mm.projection_table(merged["runtime_baselines"])
    out.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    print_table(merged)
    print(markdown(merged))
    print(f"wrote {out}")


def print_table(result: dict[str, Any]) -> None:
    for size, data in result["sizes"].items():
        t = data.get("time") or {}
        print(f"\n== {size}: {data['config']['params'] / 1e6:.1f}M parameters; time {t or 'incomplete'}")
        for name, row in data["steps"].items():
            pred = f"{row['predicted_peak'] / 2**20:7.0f}" if "predicted_peak" in row else "      -"
            ratio = f"{row['ratio']:.2f} / {row['model_ratio']:.2f}" if "ratio" in row else "-"
            print(f"{name:20s} {row['wall_s']:8.1f} s  {row['peak_rss'] / 2**20:7.0f} MiB  predicted {pred} MiB"
                  f"  ratio (whole / above runtime) {ratio}")
    print("\n== projection (memory model): bf16, calibration 128 x 2048 tokens")
    for row in result["projection"]:
        print(f"{row['model']:4s} {row['step']:24s} device {row['device_bytes'] / 2**30:7.1f} GiB"
              f"  host {row['host_bytes'] / 2**30:7.1f} GiB"
              f"  mapped file pages {row.get('mapped_bytes', 0) / 2**30:5.1f} GiB"
              f"  (weights {row['weight_bytes'] / 2**30:.1f} GiB)")


def markdown(result: dict[str, Any]) -> str:
    """The BENCHMARKS.md tables of a results file: measured against predicted, the projection."""
    mib = 2**20
    lines = ["| size | step | wall s | measured MiB | predicted MiB | ratio | ratio above runtime |",
             "|---|---|---|---|---|---|---|"]
    for size, data in result["sizes"].items():
        for name, row in data["steps"].items():
            if "ratio" not in row:
                continue
            lines.append(f"| {size} | {name} | {row['wall_s']:.0f} | {row['peak_rss'] / mib:.0f} |"
                         f" {row['predicted_peak'] / mib:.0f} | {row['ratio']:.2f} | {row['model_ratio']:.2f} |")
    lines += ["", "| size | recommended path s | plain scoring + uniform compress + export s | ratio |",
              "|---|---|---|---|"]
    for size, data in result["sizes"].items():
        t = data.get("time")
        if not t:
            continue
        lines.append(f"| {size} | {t['recommended_s']:.0f} | {t['plain_s']:.0f} | {t['ratio']:.2f} |")
    lines += ["", "| model | step | device GiB | host GiB | mapped file pages GiB | weights GiB | time units |",
              "|---|---|---|---|---|---|---|"]
    for row in result["projection"]:
        lines.append(f"| {row['model']} | {row['step']} | {row['device_bytes'] / 2**30:.1f} |"
                     f" {row['host_bytes'] / 2**30:.1f} | {row.get('mapped_bytes', 0) / 2**30:.1f} |"
                     f" {row['weight_bytes'] / 2**30:.1f} | {row['time_units']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5m,40m,150m")
    parser.add_argument("--quick", default="", help="sizes run with the recommended path and baseline only")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--points", default="0.3,0.5,0.7,0.9", help="damage probe points (score's default)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_scale.json"))
    parser.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one)")
    parser.add_argument("--only", default="", metavar="STEPS",
                        help="run only these steps (comma-separated names), reusing the --keep folder's model and"
                             " outputs from an earlier run")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="no run: combine earlier results files (same settings), re-predict with"
                             " the current memory model, write --out")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, Path(args.out))
        return
    args.quick = [s for s in args.quick.split(",") if s]


    from cwca_export import memory_model as mm
    from cwca_export.versions import library_versions

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CWCA_NO_PROGRESS="1")
    baselines = {key: baseline_rss(code, env) for key, code in BASELINE_IMPORTS.items()}
    print("runtime baselines (peak RSS after imports): "
          + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in baselines.items()), flush=True)
    work_root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    sizes: dict[str, Any] = {}
    try:
        for size in args.sizes.split(","):
            work = work_root / size
            if work.exists() and not args.only:
                shutil.rmtree(work)
            sizes[size] = run_size(size, work, args, env, baselines)
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work_root, ignore_errors=True)
    result = {
        "machine": machine(),
        "versions": library_versions(),
        "settings": size_settings(args),
        "runtime_baselines": baselines,
        "sizes": sizes,
        "projection": mm.projection_table(baselines),
        "command": "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:]),
    }
    predicted_rows(sizes, result["settings"], baselines)
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
