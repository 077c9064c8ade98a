"""The tool's budget search against uniform structure plus the best single precision, at byte budgets.

On the shipped model, for each budget (a fraction of the dense fp32 artifact's bytes):
  search   - `cwca-export export --plan damage-plan --method width --max-disk B`: structure level x
             per-layer precision, lowest calibration loss measured to fit;
  uniform  - the same search restricted to a uniform width plan (every block the same fraction)
             and one storage format for every block, embedding and head (best of the formats);
  precision-only - the search without a plan (per-layer precision alone), where it fits.
Each artifact: disk bytes, resident memory, prefill / decode p50 (measured by the export, same
workload), held-out perplexity with `cwca-export eval` (all held-out tokens unless --max-tokens).

    python benchmarks/bench_budget_search.py --out benchmarks/results/bench_budget_search.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from cwca_export.demo import DEMO_MODEL, HELDOUT_TEXT, TRAIN_TEXT
from cwca_export.versions import library_versions

BUDGETS = (0.30, 0.20, 0.15, 0.12, 0.10)
UNIFORM_FORMATS = ("int8", "int4-b64-asym", "int4-b32")


def cli(*args: str, quiet: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cwca_export", *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 and not quiet:
        print(result.stderr[-2000:], file=sys.stderr)
    return result


def evaluate(folder: Path, max_tokens: int | None) -> dict:
    args = ["eval", str(folder), "--data", str(HELDOUT_TEXT), "--json"]
    if max_tokens:
        args += ["--max-tokens", str(max_tokens)]
    r = cli(*args, quiet=False)
    return json.loads(r.stdout)


def row(folder: Path, max_tokens: int | None, seconds: float) -> dict:
    manifest = json.loads((folder / "cwca_manifest.json").read_text())
    search = (manifest.get("budget") or {}).get("search") or {}
    chosen = search.get("chosen") or {}
    ev = evaluate(folder, max_tokens)
    return {
        "disk_bytes": manifest["disk_bytes"],
        "graph_bytes": sum(f["bytes"] for f in manifest["files"] if f["path"].startswith("model.onnx")),
        "resident_bytes": manifest["measurement"]["resident_bytes"],
        "prefill_p50_ms": manifest["measurement"]["latency_ms"]["prefill"]["p50"],
        "decode_p50_ms": manifest["measurement"]["latency_ms"]["decode"]["p50"],
        "perplexity": ev["perplexity"],
        "tokens": ev.get("tokens"),
        "structure_t": chosen.get("t"),
        "width_sparsity": chosen.get("target"),
        "storage": chosen.get("storage"),
        "formats": chosen.get("formats"),
        "search_seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/cwca-bench-budget-search"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_budget_search.json"))
    ap.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    ap.add_argument("--max-tokens", type=int, default=None, help="held-out tokens (default: all)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    calib = ["--data", str(TRAIN_TEXT), "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    scores, plan, uniform = work / "damage-width.json", work / "plan-damage.json", work / "plan-uniform.json"
    if not scores.exists():
        cli("score", str(DEMO_MODEL), *calib, "--method", "damage", "--option", "pruner=width",
            "--option", "points=0.2,0.4,0.6,0.8", "--out", str(scores), quiet=False)
    cli("plan", str(scores), "--program", "prune", "--rule", "damage", "--sparsity", "0.3", "--hi", "0.9",
        "--out", str(plan), quiet=False)
    cli("plan", str(scores), "--program", "prune", "--rule", "band", "--band", "0", "--sparsity", "0.3",
        "--hi", "0.9", "--out", str(uniform), quiet=False)
    dense = work / "dense"
    if not (dense / "cwca_manifest.json").exists():
        cli("export", str(DEMO_MODEL), "--out", str(dense), "--overwrite", quiet=False)
    dense_manifest = json.loads((dense / "cwca_manifest.json").read_text())
    dense_graph = sum(f["bytes"] for f in dense_manifest["files"] if f["path"].startswith("model.onnx"))
    side = dense_manifest["disk_bytes"] - dense_graph  # config and tokenizer files
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor()},
               "versions": library_versions(), "settings": {k: str(v) for k, v in vars(args).items()},
               "dense": {"graph_bytes": dense_graph, "disk_bytes": dense_manifest["disk_bytes"],
                         **row(dense, args.max_tokens, 0.0)}, "budgets": {}}
    for fraction in (float(b) for b in args.budgets.split(",")):
        limit = int(fraction * dense_graph) + side  # the graph at the fraction, plus the same side files
        entry: dict = {"graph_budget_bytes": int(fraction * dense_graph), "max_disk": limit}
        runs = {"search": ["--plan", str(plan), "--method", "width", *calib],
                "precision-only": [*calib]}
        for fmt in UNIFORM_FORMATS:
            runs[f"uniform+{fmt}"] = ["--plan", str(uniform), "--method", "width", *calib, "--formats", fmt]
        for name, extra in runs.items():
            folder = work / f"{fraction:g}-{name}"
            began = time.perf_counter()
            r = cli("export", str(DEMO_MODEL), "--out", str(folder), "--overwrite", "--max-disk", str(limit),
                    *extra)
            took = time.perf_counter() - began
            if r.returncode != 0:
                entry[name] = {"error": r.stderr.strip().splitlines()[-1][:400], "search_seconds": round(took, 1)}
            else:
                entry[name] = row(folder, args.max_tokens, took)
            print(f"{fraction:g} {name}: {json.dumps(entry[name])[:300]}", flush=True)
        uniform_rows = {k: v for k, v in entry.items() if k.startswith("uniform+") and "perplexity" in v}
        if uniform_rows:
            best = min(uniform_rows, key=lambda k: uniform_rows[k]["perplexity"])
            entry["uniform-best"] = {"format": best.removeprefix("uniform+"), **uniform_rows[best]}
        results["budgets"][f"{fraction:g}"] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
