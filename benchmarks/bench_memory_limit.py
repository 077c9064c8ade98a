"""Export and eval on a host with less memory than the process's own memory plus the weights'
file pages: each run in a memory cgroup capped at a given size (issue 14's 7B goal, "twice the
bf16 weights in host memory", scaled to the 550M model).

``bench_low_memory.py`` shows that ``--low-memory`` keeps the weights as file pages (evictable)
and the process's own memory small. Whether such a run then fits a host smaller than both
together is a question for the kernel: this benchmark asks it. Each command runs in a fresh
cgroup (v1 ``memory.limit_in_bytes``, or v2 ``memory.max``) whose limit counts the process's
anonymous memory and every page cache page it brings in (the checkpoint, the scratch file, the
artifact, shared libraries); without swap, anonymous memory over the limit is killed and file
pages are evicted and read again. Before each run the files it reads are dropped from the page
cache (``posix_fadvise(DONTNEED)``), so pages cached by an earlier run are not free.

Needs root and a writable memory cgroup; says so and exits 2 otherwise.

Usage (the 550M model and its artifact as ``bench_low_memory.py --work /tmp/lowmem`` leaves them):
    python benchmarks/bench_memory_limit.py --work /tmp/lowmem --out benchmarks/results/bench_memory_limit.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MIB = 2**20


def own_cgroup_dir() -> Path | None:
    """This process's memory cgroup directory, v1 or v2, if it can hold children."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (base / "memory.limit_in_bytes").exists():
                return base
        if number == "0" and controllers == "":
            base = Path("/sys/fs/cgroup/unified") / path.lstrip("/")
            if not base.exists():
                base = Path("/sys/fs/cgroup") / path.lstrip("/")
            if (base / "cgroup.subtree_control").exists() and "memory" in (base / "cgroup.controllers").read_text():
                return base
    return None


def drop_from_page_cache(paths: list[Path]) -> None:
    """Evict the files' clean pages (those no process maps), so a run reads them from disk."""
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_limited(args: list[str], limit: int | None, parent: Path, reads: list[Path]) -> dict[str, Any]:
    """``python -m cwca_export ARGS`` in a new cgroup of ``parent`` capped at ``limit`` bytes."""
    cgroup = parent / f"cwca-bench-{os.getpid()}-{time.monotonic_ns()}"
    cgroup.mkdir()
    v1 = (cgroup / "memory.limit_in_bytes").exists()
    try:
        if limit is not None:
            (cgroup / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(limit))
        if not v1:
            (cgroup / "memory.swap.max").write_text("0")
        drop_from_page_cache(reads)
        start = time.perf_counter()
        # the child joins the cgroup before it execs the CLI: everything it maps is charged there
        proc = subprocess.run(["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh",
                               sys.executable, "-m", "cwca_export", *args],
                              capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        wall = time.perf_counter() - start
        peak_file = "memory.max_usage_in_bytes" if v1 else "memory.peak"
        peak = int((cgroup / peak_file).read_text()) if (cgroup / peak_file).exists() else None
        if v1:
            failures = int((cgroup / "memory.failcnt").read_text())
        else:
            events = dict(line.split() for line in (cgroup / "memory.events").read_text().splitlines())
            failures = int(events.get("max", 0))
        tail = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
        row = {"args": args, "limit": limit, "exit_code": proc.returncode, "wall_s": round(wall, 1),
               "cgroup_peak": peak, "limit_hits": failures, "last_line": tail[-1][:300] if tail else ""}
        if args[0] == "export" and proc.returncode == 0:  # the latency the export measured under the limit
            out = Path(args[args.index("--out") + 1])
            latency = json.loads((out / "cwca_manifest.json").read_text())["measurement"]["latency_ms"]
            row.update(prefill_p50_ms=round(latency["prefill"]["p50"], 1),
                       decode_p50_ms=round(latency["decode"]["p50"], 1))
        if args[0] == "eval" and proc.returncode == 0:
            row["perplexity"] = next((line for line in proc.stdout.splitlines() if "perplexity" in line), "")[:200]
        return row
    finally:
        cgroup.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="bench_low_memory.py's --work folder")
    ap.add_argument("--size", default="550m")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    parent = own_cgroup_dir()
    if os.geteuid() != 0 or parent is None:
        print("bench_memory_limit: needs root and a writable memory cgroup (v1 or v2); none here", file=sys.stderr)
        sys.exit(2)
    work = Path(args.work)
    bf16 = work / f"model-{args.size}-bf16"
    artifact = work / "export_bf16_checkpoint_low-memory"
    if not bf16.exists() or not (artifact / "model.onnx").exists():
        print(f"bench_memory_limit: run bench_low_memory.py --work {work} first", file=sys.stderr)
        sys.exit(2)
    bf16_bytes = sum(p.stat().st_size for p in bf16.glob("*.safetensors"))
    goal = 2 * bf16_bytes  # the host: twice the bf16 weights
    measure = ["--runs", "3", "--warmup", "1", "--prompt-len", "16", "--context", "32"]
    heldout = Path(__file__).resolve().parent.parent / "cwca_export" / "assets" / "text" / "heldout.txt"
    eval_args = ["eval", str(artifact), "--data", str(heldout), "--seq-len", "128", "--max-tokens", "1024",
                 "--batch-size", "4"]
    out_dir = work / "limited-export"
    export_args = ["export", str(bf16), "--backend", "onnx", *measure, "--out", str(out_dir), "--overwrite"]
    plans = [
        ("export --low-memory", export_args + ["--low-memory"], [bf16]),
        ("export --low-memory --quantize int8", export_args + ["--low-memory", "--quantize", "int8"], [bf16]),
        ("export (ordinary)", export_args, [bf16]),
        ("eval --low-memory", eval_args + ["--low-memory"], [artifact]),
        ("eval (ordinary)", eval_args, [artifact]),
    ]
    rows = []
    for name, cli_args, reads in plans:
        for label, limit in (("no limit", None), ("twice the bf16 weights", goal)):
            row = {"run": name, "host": label, **run_limited(cli_args, limit, parent, reads)}
            rows.append(row)
            print(json.dumps({k: (v // MIB if k in ("limit", "cgroup_peak") and v else v)
                              for k, v in row.items() if k != "args"}), flush=True)
    result = {"size": args.size, "bf16_weight_bytes": bf16_bytes, "limit_bytes": goal, "rows": rows,
              "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release}}
    print("\n| run | host | exit | wall s | cgroup peak MiB | limit hits | measured prefill / decode ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['cgroup_peak'] // MIB:,}" if r["cgroup_peak"] else "-"
        latency = f"{r['prefill_p50_ms']} / {r['decode_p50_ms']}" if "decode_p50_ms" in r else "-"
        print(f"| {r['run']} | {r['host']} | {r['exit_code']} | {r['wall_s']} | {peak} | {r['limit_hits']}"
              f" | {latency} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
