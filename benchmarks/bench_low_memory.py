"""The process's own memory against its file pages, for export and eval with and without
``--low-memory`` (issue 14: the 7B export and eval).

A resident-set peak (``ru_maxrss``) counts file pages too: a safetensors checkpoint mapped by
transformers, a low-memory export's mapped float32 scratch file, an artifact's external data
that an ONNX Runtime session without prepacking computes from. The kernel evicts such clean
pages under pressure and reads them again, so what a run needs of the host is its anonymous
memory (``RssAnon``) plus a working set of file pages. This benchmark samples ``RssAnon`` and
``VmRSS`` of the CLI process and its children (the measurement worker) every 10 ms and reports
both peaks (and the CLI process's own ``RssAnon`` peak alone) beside ``os.wait4``'s ``ru_maxrss``;
a spike shorter than the interval can be missed.

The model is bench_export_phases.py's 550M Llama (2.1 GB of float32 weights: external data, the
path every 7B export takes), saved once in float32 and once in bfloat16 (how 7B checkpoints ship).

Then one ONNX Runtime session with and one without prepacking on the low-memory artifact, each in
a process of its own: creation time, own and file pages, forward time, and the logits' difference;
and the quantization step alone (int8, int4) on that artifact, ONNX Runtime's quantizer on the
whole graph against ``quantize_streamed`` (what ``--low-memory --quantize`` runs); and the float16
conversion alone, ONNX Runtime's converter on the whole graph against ``convert_fp16_streamed``
(what ``--low-memory --dtype float16`` runs).

Usage:
    python benchmarks/bench_low_memory.py --work /tmp/lowmem [--out benchmarks/results/bench_low_memory.json]
    python benchmarks/bench_low_memory.py --work /tmp/lowmem --sessions-only --out ...   # the session probe alone
    python benchmarks/bench_low_memory.py --work /tmp/lowmem --quantize-only --out ...   # the quantizers alone
    python benchmarks/bench_low_memory.py --work /tmp/lowmem --fp16-only --out ...   # the float16 converters alone
    python benchmarks/bench_low_memory.py --work /tmp/lowmem --quantized-external-only --out ...   # with external data
    python benchmarks/bench_low_memory.py --work /tmp/lowmem --quantized-inline-only --out ...   # the same pair inline
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_export_phases  # noqa: E402,F401  (registers the 550m size)
import bench_scale  # noqa: E402

MIB = 2**20


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", encoding="ascii") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return pids


def run_sampled(args: list[str], env: dict[str, str], interval: float = 0.01,
                command: list[str] | None = None, may_fail: bool = False) -> dict[str, Any]:
    """``python -m cwca_export ARGS`` (or ``command``) with its process tree's RssAnon and VmRSS sampled
    (``may_fail``: a failing command's peaks are reported with ``"failed": True`` and its last line)."""
    parent_peak = bench_scale.own_peak_rss()  # the floor under the child's ru_maxrss
    start = time.perf_counter()
    proc = subprocess.Popen(command or [sys.executable, "-m", "cwca_export", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peaks = {"anon": 0, "rss": 0, "main_anon": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            total = {"RssAnon": 0, "VmRSS": 0}
            for pid in _tree(proc.pid):
                for key, value in bench_scale.proc_status_bytes(pid, ("RssAnon", "VmRSS")).items():
                    total[key] += value
                    if pid == proc.pid and key == "RssAnon":
                        peaks["main_anon"] = max(peaks["main_anon"], value)
            peaks["anon"] = max(peaks["anon"], total["RssAnon"])
            peaks["rss"] = max(peaks["rss"], total["VmRSS"])
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    failed = os.waitstatus_to_exitcode(status) != 0
    if failed and not may_fail:
        raise RuntimeError(f"{' '.join(command or ['cwca-export', *args])} failed:\n{out.decode()[-3000:]}")
    return {"args": args, "wall_s": round(time.perf_counter() - start, 1), "ru_maxrss": usage.ru_maxrss * 1024,
            "parent_peak_rss": parent_peak, "last_line": out.decode().strip().splitlines()[-1][:300],
            "sampled_anon_peak": peaks["anon"], "sampled_rss_peak": peaks["rss"],
            "sampled_anon_peak_main_process": peaks["main_anon"], **({"failed": True} if failed else {})}


BFLOAT16_COPY = """
import shutil, sys, torch
from transformers import AutoModelForCausalLM
src, dst = sys.argv[1], sys.argv[2]
AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, local_files_only=True).save_pretrained(dst)
for name in sys.argv[3:]:
    shutil.copy(f"{src}/{name}", f"{dst}/{name}")
"""


def bfloat16_copy(src: Path, dst: Path) -> None:
    """The same weights saved in bfloat16 (values rounded once; both exports start from these),
    in a process of its own: a child's ru_maxrss starts at its parent's peak."""
    subprocess.run([sys.executable, "-c", BFLOAT16_COPY, str(src), str(dst), *bench_scale.TOKENIZER_FILES],
                   check=True)


SESSION_PROBE = """
import json, sys, time
import numpy as np
from cwca_export.exporter.session import DecoderSession, make_session
def status():
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024
    return out
path, prepack, batch, length = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
before = status()
start = time.perf_counter()
decoder = DecoderSession(make_session(path, prepack=prepack))
created = time.perf_counter() - start
after_creation = status()
ids = np.random.default_rng(0).integers(2, 4000, size=(batch, length))
times = []
for _ in range(3):
    start = time.perf_counter()
    logits = decoder.session.run(["logits"], decoder.feed(ids, np.ones_like(ids), None))[0]
    times.append(time.perf_counter() - start)
np.save(sys.argv[5], logits[:, -2:])
print(json.dumps({"create_s": round(created, 2), "forward_s": round(min(times), 3),
                  "anon_after_creation": after_creation["RssAnon"] - before["RssAnon"],
                  "file_after_creation": after_creation["RssFile"] - before["RssFile"],
                  "anon_after_forwards": status()["RssAnon"] - before["RssAnon"],
                  "file_after_forwards": status()["RssFile"] - before["RssFile"]}))
"""


QUANTIZE_STEP = """
import json, sys, time
from pathlib import Path
from cwca_export.exporter import postprocess as pp
from cwca_export.exporter.streamed_quantize import quantize_streamed
import onnx, onnxruntime.quantization  # imported before the runtime's memory is read
src, dst, how, method = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
def anon():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("RssAnon"))
runtime = anon()
start = time.perf_counter()
config = pp.QuantizeConfig(method)
if how == "whole":
    (pp.quantize_int8 if method == "int8" else pp.quantize_int4)(src, dst, config, [])
else:
    quantize_streamed(src, dst, config, [])
print(json.dumps({"runtime_anon": runtime, "step_s": round(time.perf_counter() - start, 1)}))
"""


def empty_folder(folder: Path) -> Path:
    """``folder``, created or emptied of an earlier run's files."""
    if folder.exists():
        for path in folder.iterdir():
            path.unlink()
    folder.mkdir(exist_ok=True)
    return folder


def probe_quantizers(artifact: Path, work: Path, env: dict[str, str]) -> dict[str, Any]:
    """The quantization step alone on the float32 artifact (external data), each in a process of
    its own with its RssAnon sampled: ONNX Runtime's quantizer on the whole graph against
    ``quantize_streamed``, for int8 and int4 (the CLI's int4 export of the random-init model fails
    its parity check, so only this probe measures int4's memory). Both graphs are compared too."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    out: dict[str, Any] = {}
    for method in ("int8", "int4"):
        written = {}
        for how in ("whole", "streamed"):
            folder = empty_folder(work / f"quantize-{how}-{method}")
            row = run_sampled([], env, command=[sys.executable, "-c", QUANTIZE_STEP, str(artifact / "model.onnx"),
                                                str(folder / "q.onnx"), how, method])
            row.update(json.loads(row.pop("last_line")))
            out[f"{how} {method}"] = row
            written[how] = folder / "q.onnx"
            print(how, method, {k: v // MIB if isinstance(v, int) else v for k, v in row.items() if k != "args"},
                  flush=True)
        same = True
        streamed = {t.name: t for t in onnx.load(str(written["streamed"]), load_external_data=False).graph.initializer}
        whole = onnx.load(str(written["whole"]), load_external_data=False).graph.initializer
        for tensor in whole:  # one tensor's bytes at a time
            if tensor.name not in streamed:
                same = False
                break
            a = numpy_helper.to_array(tensor, str(written["whole"].parent))
            b = numpy_helper.to_array(streamed[tensor.name], str(written["streamed"].parent))
            same = same and a.dtype == b.dtype and bool(np.array_equal(a, b))
        out[f"{method} initializers identical"] = same and len(whole) == len(streamed)
    return out


FP16_STEP = """
import json, sys, time
from pathlib import Path
from cwca_export.exporter import postprocess as pp
from cwca_export.exporter.streamed_fp16 import convert_fp16_streamed
import onnx, onnxruntime.transformers.float16  # imported before the runtime's memory is read
src, dst, how = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
def anon():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("RssAnon"))
runtime = anon()
start = time.perf_counter()
if how == "whole":  # what the ordinary export runs: the loaded model handed to the converter
    pp.convert_fp16(src, dst)
elif how == "whole-path":  # the converter given the file: ONNX Runtime's own way past protobuf's 2 GiB
    from onnxruntime.transformers.float16 import convert_float_to_float16
    pp.save_with_data(convert_float_to_float16(str(src), keep_io_types=False), dst)
else:
    convert_fp16_streamed(src, dst)
print(json.dumps({"runtime_anon": runtime, "step_s": round(time.perf_counter() - start, 1)}))
"""


def probe_fp16(artifact: Path, work: Path, env: dict[str, str]) -> dict[str, Any]:
    """The float16 conversion alone on the float32 artifact (external data), each in a process of
    its own with its RssAnon sampled: ONNX Runtime's converter handed the loaded model (as the
    ordinary export calls it), handed the file's path (it infers shapes from the file, then loads
    the model whole), and ``convert_fp16_streamed``. The graphs written are compared too."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    # a copy of the artifact: the path mode writes a scratch file beside it (onnx refuses symbolic links)
    source = work / "fp16-source"
    source.mkdir(exist_ok=True)
    for name in ("model.onnx", "model.onnx_data"):
        if not (source / name).exists():
            shutil.copyfile(artifact / name, source / name)
    out: dict[str, Any] = {}
    written = {}
    for how in ("whole", "whole-path", "streamed"):
        folder = empty_folder(work / f"fp16-{how}")
        row = run_sampled([], env, command=[sys.executable, "-c", FP16_STEP, str(source / "model.onnx"),
                                            str(folder / "fp16.onnx"), how], may_fail=True)
        if not row.get("failed"):
            row.update(json.loads(row.pop("last_line")))
            written[how] = folder / "fp16.onnx"
        out[how] = row
        print(how, {k: v // MIB if type(v) is int else v for k, v in row.items() if k != "args"}, flush=True)
    if {"whole-path", "streamed"} <= set(written):
        a = onnx.load(str(written["whole-path"]), load_external_data=False)
        b = onnx.load(str(written["streamed"]), load_external_data=False)
        same = [(n.op_type, n.name, list(n.input), list(n.output)) for n in a.graph.node] == \
               [(n.op_type, n.name, list(n.input), list(n.output)) for n in b.graph.node]
        streamed = {t.name: t for t in b.graph.initializer}
        for tensor in a.graph.initializer:  # one tensor's bytes at a time
            if tensor.name not in streamed:
                same = False
                break
            x = numpy_helper.to_array(tensor, str(written["whole-path"].parent))
            y = numpy_helper.to_array(streamed[tensor.name], str(written["streamed"].parent))
            same = same and x.dtype == y.dtype and bool(np.array_equal(x, y, equal_nan=True))
        out["graphs identical"] = same and len(a.graph.initializer) == len(streamed)
    return out


def probe_sessions(artifact: Path, work: Path, env: dict[str, str]) -> dict[str, Any]:
    """One ONNX Runtime session with and one without prepacking, each in a fresh process: its
    creation time, own and file pages after creation and after three forwards (the fastest
    timed), at prefill (4 x 64) and decode (1 x 1) sizes, and how far the logits differ."""
    import numpy as np

    out: dict[str, Any] = {}
    for batch, length in ((4, 64), (1, 1)):
        logits = {}
        for prepack in (True, False):
            save = work / f"logits-{batch}x{length}-{int(prepack)}.npy"
            proc = subprocess.run([sys.executable, "-c", SESSION_PROBE, str(artifact / "model.onnx"), str(int(prepack)),
                                   str(batch), str(length), str(save)], env=env, capture_output=True, text=True,
                                  check=True)
            out[f"{batch}x{length} prepack={prepack}"] = json.loads(proc.stdout.strip().splitlines()[-1])
            logits[prepack] = np.load(save)
        out[f"{batch}x{length} max_abs_logit_difference"] = float(np.abs(logits[True] - logits[False]).max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--size", default="550m")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sessions-only", action="store_true",
                    help="only the session probe, on the low-memory artifact an earlier run left in --work")
    ap.add_argument("--quantize-only", action="store_true",
                    help="only the quantizer probe and the --low-memory --quantize int8 export, on the artifact an"
                         " earlier run left in --work (merged into --out)")
    ap.add_argument("--fp16-only", action="store_true",
                    help="only the float16 converter probe and the --low-memory --dtype float16 export (inline, and"
                         " with external data), on the artifact an earlier run left in --work (merged into --out)")
    ap.add_argument("--optimum-only", action="store_true",
                    help="only the --low-memory export of the bf16 checkpoint with --backend optimum, beside the same"
                         " export with --backend onnx in the same run (merged into --out)")
    ap.add_argument("--quantized-external-only", action="store_true",
                    help="only the --low-memory --quantize int8 exports of the bf16 checkpoint with external data"
                         " (with and without --exclude lm_head), side by side, and a prepacked session on each and on"
                         " --quantize-only's int4 graph (merged into --out)")
    ap.add_argument("--quantized-inline-only", action="store_true",
                    help="the same int8 pair under the default threshold (550M's artifact inline), no probes")
    args = ap.parse_args()
    work = Path(args.work)
    fp32, bf16 = work / f"model-{args.size}", work / f"model-{args.size}-bf16"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if not fp32.exists():
        bench_scale.build_model_in_child(args.size, fp32, env)
    if not bf16.exists():
        bfloat16_copy(fp32, bf16)
    measure = ["--runs", "3", "--warmup", "1", "--prompt-len", "16", "--context", "32"]
    rows: dict[str, Any] = {}
    artifact = work / "export_bf16_checkpoint_low-memory"
    quantized_export = ("export bf16 checkpoint --low-memory --quantize int8", bf16,
                        ["--low-memory", "--quantize", "int8"])
    fp16_export = ("export bf16 checkpoint --low-memory --dtype float16", bf16,
                   ["--low-memory", "--dtype", "float16"])
    if (args.sessions_only or args.quantize_only or args.fp16_only or args.optimum_only
            or args.quantized_external_only or args.quantized_inline_only):
        result = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).exists() else {}
        if args.quantized_external_only or args.quantized_inline_only:
            # int8 with and without the head kept float32 (--exclude lm_head): with external data, as a
            # 7B model's artifact has, each then probed in a prepacked session; or inline, as 550M's is
            external = args.quantized_external_only
            layout, label = ((["--external-data-threshold", "256MB"], "--external-data-threshold 256MB (side by side)")
                             if external else ([], "(inline, side by side)"))
            built = []
            for extra in (["--quantize", "int8"], ["--quantize", "int8", "--exclude", "lm_head"]):
                name = " ".join(["export bf16 checkpoint --low-memory", *extra, label])
                out = work / "".join(c for c in name.replace(" ", "_").replace("--", "") if c not in "(),")
                result.setdefault("rows", {})[name] = run_sampled(
                    ["export", str(bf16), "--backend", "onnx", "--low-memory", *extra, *layout, *measure, "--out",
                     str(out), "--overwrite"], env)
                print(name, {k: v // MIB if isinstance(v, int) else v for k, v in result["rows"][name].items()
                             if k != "args"}, flush=True)
                built.append((name, out / "model.onnx"))
            # int4: the export refuses this random-init model (int4 logits 0.45 relative RMS from torch's,
            # tolerance 0.3), so the streamed quantizer's int4 graph of --quantize-only (external data)
            int4 = ("quantize_streamed int4 (--quantize-only's artifact)", work / "quantize-streamed-int4" / "q.onnx")
            for name, graph in [*built, int4] if external else []:
                proc = subprocess.run([sys.executable, "-c", SESSION_PROBE, str(graph), "1", "1", "1",
                                       str(work / "logits-quantized.npy")], env=env, capture_output=True, text=True,
                                      check=True)
                result.setdefault("prepacked_sessions", {})[name] = json.loads(proc.stdout.strip().splitlines()[-1])
                print(name, result["prepacked_sessions"][name], flush=True)
        elif args.optimum_only:
            for backend in ("onnx", "optimum"):
                name = f"export bf16 checkpoint --low-memory --backend {backend} (side by side)"
                result.setdefault("rows", {})[name] = run_sampled(
                    ["export", str(bf16), "--backend", backend, "--low-memory", *measure, "--out",
                     str(work / f"export_bf16_low-memory_{backend}"), "--overwrite"], env)
                print(name, {k: v // MIB if isinstance(v, int) else v for k, v in result["rows"][name].items()
                             if k != "args"}, flush=True)
        elif args.sessions_only:
            result["sessions"] = probe_sessions(artifact, work, env)
            print(json.dumps(result["sessions"], indent=1))
        else:
            if args.quantize_only:
                result["quantizers"] = probe_quantizers(artifact, work, env)
            else:
                result["fp16"] = probe_fp16(artifact, work, env)
            # the float16 weights above a (lowered) --external-data-threshold: a 7B model's artifact is
            # external (its 13.5 GB of float16 weights exceed protobuf's 2 GiB); 550M's 1.1 GB would be inline
            exports = [quantized_export] if args.quantize_only else [
                fp16_export, (fp16_export[0] + " --external-data-threshold 512MB", bf16,
                              [*fp16_export[2], "--external-data-threshold", "512MB"])]
            for name, model, extra in exports:
                result.setdefault("rows", {})[name] = run_sampled(
                    ["export", str(model), "--backend", "onnx", *extra, *measure, "--out",
                     str(work / name.replace(" ", "_").replace("--", "")), "--overwrite"], env)
                print(name, {k: v // MIB if isinstance(v, int) else v for k, v in result["rows"][name].items()
                             if k != "args"}, flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return
    for name, model, extra in [("export bf16 checkpoint", bf16, []),
                               ("export bf16 checkpoint --low-memory", bf16, ["--low-memory"]),
                               ("export fp32 checkpoint --low-memory", fp32, ["--low-memory"]),
                               quantized_export]:
        out = work / name.replace(" ", "_").replace("--", "")
        rows[name] = run_sampled(["export", str(model), "--backend", "onnx", *extra, *measure, "--out", str(out),
                                  "--overwrite"], env)
        print(name, {k: v // MIB if isinstance(v, int) else v for k, v in rows[name].items() if k != "args"},
              flush=True)
    for name, extra in [("eval", []), ("eval --low-memory", ["--low-memory"])]:
        rows[name] = run_sampled(["eval", str(artifact), "--data", str(bench_scale.HELDOUT), "--seq-len", "128",
                                  "--max-tokens", "1024", "--batch-size", "4", *extra], env)
        print(name, {k: v // MIB if isinstance(v, int) else v for k, v in rows[name].items() if k != "args"},
              flush=True)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(fp32, local_files_only=True)

    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    weights = 4 * params
    result = {"size": args.size, "params": params, "fp32_weight_bytes": weights, "machine": bench_scale.machine(),
              "interval_s": 0.01, "rows": rows, "sessions": probe_sessions(artifact, work, env),
              "quantizers": probe_quantizers(artifact, work, env)}
    print(json.dumps(result["sessions"], indent=1))
    print("\n| run | ru_maxrss MiB | sampled RSS peak MiB | sampled anonymous peak MiB (x fp32 weights) | s |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['ru_maxrss'] // MIB:,} | {r['sampled_rss_peak'] // MIB:,} | "
              f"{r['sampled_anon_peak'] // MIB:,} ({r['sampled_anon_peak'] / weights:.2f}) | {r['wall_s']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
