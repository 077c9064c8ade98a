#!/usr/bin/env bash
# GPU checks for a lent CUDA machine, about 5 minutes in all:
#   1. the gpu-marked tests (tests/test_gpu.py): scoring, damage probes, whole-plan losses,
#      compress and refine on cuda against the CPU; ONNX Runtime's CUDA provider (export,
#      parity with torch, device memory, perplexity);
#   2. a short timing of scoring (fisher, damage) on the shipped demo model, cuda against cpu,
#      with the peak CUDA memory (torch.cuda.max_memory_allocated);
#   3. the shipped demo model exported through the CLI for ONNX Runtime's CUDA provider (float32,
#      float16) beside the CPU provider's float32: the manifest's device and host memory, latency;
#   4. (STEPS=large) bench_scale's 150m model likewise in float16 and float32 on the CUDA provider:
#      does a session keep a host copy of the weights (LARGE_EP=cpu runs it on the CPU provider).
# Needs torch with CUDA; onnxruntime-gpu (in place of onnxruntime) for the ONNX Runtime tests,
# which are otherwise reported as skipped. Exits non-zero when a step fails (the timing step when
# torch has no CUDA device, the export steps when ONNX Runtime has no CUDA provider).
# The package must be installed (pip install --no-deps -e .): `cwca_export.recipes` and
# `cwca_export.backends` live in top-level folders that only the install maps into the package
# (or link them in: ln -s ../recipes cwca_export/recipes; ln -s ../backends cwca_export/backends).
# onnxruntime and onnxruntime-gpu must not both be installed (cwca_export.ort refuses the pair).
# Run on a lent H100 (2026-11-27, BENCHMARKS.md "GPU checks"): the image's torch 2.11.0+cu130, the
# pinned transformers / optimum / optimum-onnx / huggingface_hub / tokenizers / pydantic carried as
# wheels, onnxruntime-gpu 1.31.1 (its PyPI wheel is the CUDA 13 build) in place of the image's onnxruntime.
#
#   PYTHON=.venv/bin/python benchmarks/gpu_checks.sh [OUT_DIR]    # default OUT_DIR: benchmarks/results/gpu
#   STEPS="tests timing ort" (the default) picks the steps; pytest's -k expression in TESTS_K, if set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-benchmarks/results/gpu}
STEPS=${STEPS:-tests timing ort}
for step in $STEPS; do
    case $step in tests|timing|ort|large) ;; *) echo "STEPS: unknown step '$step' (tests, timing, ort, large)" >&2; exit 2;; esac
done
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  "$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" 2>&1 | tail -1
} | tee "$OUT/device.txt"

# -rs lists every skip with its reason: on a GPU machine there should be none
tests=0; timing=0; ort=0
if [[ " $STEPS " == *" tests "* ]]; then
timeout 240 "$PY" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} \
    --junitxml "$OUT/tests.xml" 2>&1 | tee "$OUT/tests.txt"
tests=${PIPESTATUS[0]}
fi

if [[ " $STEPS " == *" timing "* ]]; then
timeout 150 "$PY" - "$OUT/scoring_timing.json" <<'PY'
"""Scoring the shipped demo model (12 blocks, hidden 192) on 16 x 128 tokens: cpu against cuda."""
import json
import sys
import time

import torch

from cwca_export.demo import DEMO_MODEL, TRAIN_TEXT
from cwca_export.scoring import score

if not torch.cuda.is_available():
    sys.exit("no CUDA device: scoring was not timed on cuda")
text = TRAIN_TEXT.read_text(encoding="utf-8")[:100_000]
rows = []
for method, options, batch in (("fisher", None, 1), ("damage", {"pruner": "wanda", "points": "0.3,0.5,0.7"}, 8)):
    results = {}
    for device in ("cpu", "cuda"):
        kwargs = dict(method=method, options=options, num_samples=16, seq_len=128, batch_size=batch,
                      cpu=device == "cpu", progress=False)
        if device == "cuda":
            score(DEMO_MODEL, [text], **{**kwargs, "num_samples": 2})  # warm-up: CUDA context, kernels
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        scores = score(DEMO_MODEL, [text], **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        results[device] = scores
        # score_s: the whole call (loading, tokenising); passes_s: the estimator's passes alone
        rows.append({"method": method, "device": device, "score_s": round(wall, 3),
                     "passes_s": scores.wall_time_s,
                     "tokens_per_s": round(scores.tokens / scores.wall_time_s, 1),
                     "peak_cuda_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None})
        print(json.dumps(rows[-1]), flush=True)
    a, b = results["cpu"].zeta2, results["cuda"].zeta2
    worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
    rows.append({"method": method, "max_rel_diff_zeta2_cuda_vs_cpu": worst})
    print(json.dumps(rows[-1]), flush=True)
with open(sys.argv[1], "w", encoding="utf-8") as f:
    json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, f, indent=2)
PY
timing=$?
fi

if [[ " $STEPS " == *" ort "* ]]; then
timeout 200 "$PY" - "$OUT/ort_cuda.json" <<'PY'
"""The shipped demo model exported by the CLI for ONNX Runtime: cpu float32, cuda float32 and float16."""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from cwca_export.demo import DEMO_MODEL

rows, failed = [], 0
with tempfile.TemporaryDirectory() as tmp:
    for ep, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "float16")):
        out = Path(tmp) / f"{ep}-{dtype}"
        command = [sys.executable, "-m", "cwca_export", "export", str(DEMO_MODEL), "--out", str(out),
                   "--backend", "onnx", "--ep", ep, "--dtype", dtype, "--runs", "20"]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode:
            failed += 1
            rows.append({"ep": ep, "dtype": dtype, "exit": run.returncode, "output": run.stdout[-800:] + run.stderr[-800:]})
        else:
            manifest = json.loads((out / "cwca_manifest.json").read_text(encoding="utf-8"))
            m = manifest["measurement"]
            rows.append({"ep": ep, "dtype": dtype, "providers": m.get("providers"), "disk_bytes": manifest.get("disk_bytes"),
                         "resident_bytes": m.get("resident_bytes"), "resident_method": m.get("resident_method"),
                         "host_resident_bytes": m.get("host_resident_bytes"),
                         "host_resident_after_bytes": m.get("host_resident_after_bytes"), "latency_ms": m.get("latency_ms"),
                         "verification": manifest.get("verification")})
        print(json.dumps(rows[-1])[:1500], flush=True)
with open(sys.argv[1], "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=2)
sys.exit(1 if failed else 0)
PY
ort=$?
fi

large=0
if [[ " $STEPS " == *" large "* ]]; then
timeout 400 "$PY" - "$OUT/ort_cuda_150m.json" "${LARGE_EP:-cuda}" <<'PY'
"""bench_scale's 150m model (12 x 768, 32k vocabulary, 0.6 GB in float32) exported by the CLI for the
CUDA provider in float16 and float32: whether the sessions keep a host copy of the weights."""
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, "benchmarks")
from bench_scale import build_model

ep, rows, failed = sys.argv[2], [], 0
with tempfile.TemporaryDirectory() as tmp:
    model = Path(tmp) / "m"
    info = build_model("150m", model)
    for dtype in ("float16", "float32"):
        out, start = Path(tmp) / dtype, time.perf_counter()
        command = [sys.executable, "-m", "cwca_export", "export", str(model), "--out", str(out), "--backend", "onnx",
                   "--ep", ep, "--dtype", dtype, "--runs", "10"]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode:
            failed += 1
            rows.append({"dtype": dtype, "exit": run.returncode, "output": run.stdout[-800:] + run.stderr[-800:]})
        else:
            manifest = json.loads((out / "cwca_manifest.json").read_text(encoding="utf-8"))
            m = manifest["measurement"]
            rows.append({"ep": ep, "dtype": dtype, "params": info["params"], "disk_bytes": manifest["disk_bytes"],
                         "resident_bytes": m["resident_bytes"], "resident_method": m["resident_method"],
                         "host_resident_bytes": m.get("host_resident_bytes"),
                         "host_resident_after_bytes": m.get("host_resident_after_bytes"), "latency_ms": m["latency_ms"],
                         "export_s": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1])[:1500], flush=True)
with open(sys.argv[1], "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=2)
sys.exit(1 if failed else 0)
PY
large=$?
fi

echo "gpu tests: exit $tests; scoring timing: exit $timing; ort cuda export: exit $ort; 150m: exit $large; results in $OUT"
[ "$tests" -eq 0 ] && [ "$timing" -eq 0 ] && [ "$ort" -eq 0 ] && [ "$large" -eq 0 ]
