"""One ONNX Runtime session of the tool's own on a float16 artifact with external data
(``exporter.session.make_session(prepack=False)``: the session ``export --low-memory --dtype
float16`` checks and measures with, casting each weight as a node reads it): its own memory
(``RssAnon``, sampled every 3 ms on a thread) over creation and two 16-token forwards, beyond the
runtime, in MiB and in copies of the graph's largest float32 tensor (what
``memory_model.FP16_CAST_TENSOR_COPIES`` multiplies).

Usage (an artifact from ``cwca-export export MODEL --low-memory --dtype float16
--external-data-threshold 64MB --out ART``):
    python benchmarks/bench_fp16_session.py ART/model.onnx [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scale  # noqa: E402

MIB = 2**20


def anon() -> int:
    return bench_scale.proc_status_bytes(os.getpid(), ("RssAnon",))["RssAnon"]


def largest_tensor_fp32_bytes(path: str) -> int:
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    return max(int(np.prod(t.dims)) for t in graph.initializer) * 4


def probe(path: str) -> dict[str, float]:
    from cwca_export.exporter.session import DecoderSession, casts_float16_per_run, make_session

    if not casts_float16_per_run(path, "cpu", False):
        raise SystemExit(f"{path}: not a float16 graph (export it with --dtype float16)")
    peak, stop = [0], [False]

    def sample() -> None:
        while not stop[0]:
            peak[0] = max(peak[0], anon())
            time.sleep(0.003)

    base = anon()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    decoder = DecoderSession(make_session(path, prepack=False))
    created = time.perf_counter() - start
    ids = np.random.default_rng(0).integers(2, 4000, size=(1, 16))
    forwards = []
    for _ in range(2):
        start = time.perf_counter()
        decoder.session.run(["logits"], decoder.feed(ids, np.ones_like(ids), None))
        forwards.append(time.perf_counter() - start)
    after = anon()
    stop[0] = True
    thread.join()
    return {"own_after_runs_mib": (after - base) / MIB, "own_peak_mib": (peak[0] - base) / MIB,
            "create_s": created, "forward_s": min(forwards)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="the float16 artifact's model.onnx")
    ap.add_argument("--repeat", type=int, default=1, help="sessions, each in a fresh process (a second one in the"
                    " same process reuses the first one's freed memory)")
    args = ap.parse_args()
    if args.repeat > 1:
        for _ in range(args.repeat):
            subprocess.run([sys.executable, __file__, args.model], check=True)
        return
    largest = largest_tensor_fp32_bytes(args.model)
    r = probe(args.model)
    print(f"own peak {r['own_peak_mib']:.0f} MiB ({r['own_peak_mib'] * MIB / largest:.2f} x the largest tensor's"
          f" {largest / MIB:.1f} MiB in float32), after the runs {r['own_after_runs_mib']:.0f} MiB;"
          f" create {r['create_s']:.1f} s, forward {r['forward_s']:.2f} s", flush=True)


if __name__ == "__main__":
    main()
