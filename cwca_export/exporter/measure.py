"""Measured numbers of an artifact: disk bytes and hashes (:func:`file_inventory`), session memory, latency.

Memory and latency run in a fresh Python process (``python -m cwca_export.exporter.measure``)
so that torch, the exporter and earlier sessions do not pollute the numbers.

Resident memory: the peak resident set (``VmHWM``) of the process through session creation,
one prefill of P tokens and one decode step over a KV cache of ``context - 1`` tokens at
batch B, minus its resident set (``VmRSS``) just before the session was created
(onnxruntime and NumPy already imported). The peak is what must fit on the device: it
includes the graph as parsed during loading, the weights as ONNX Runtime holds them
(initializers and pre-packed copies), its arenas, the KV cache of the full context and the
activations. The resident set after the runs is recorded too. The worker runs with one
glibc malloc arena (``MALLOC_ARENA_MAX=1``): with per-thread arenas the peak of identical
runs flips between two values several MB apart. Linux only; elsewhere memory is reported
as not measured.

On the CUDA provider what must fit is device memory: ``resident_bytes`` is then the device
memory this process holds after the same session creation and runs, read with
``nvidia-smi`` (its per-process figure, CUDA context included; where the process is not
listed, e.g. in another PID namespace, the growth of the device's used memory since just
before the session was created). ONNX Runtime's CUDA arena keeps what it grew to, so the
figure after the runs is their peak. The host figures move to ``host_resident_bytes``.

Latency: ``warmup`` untimed calls, then ``runs`` timed calls of each shape; p50 and p90 in
milliseconds. "Decode" is one new token at batch B over a cache of ``context - 1`` tokens
(the slowest step within the context); a graph without a KV cache recomputes the whole
context for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cwca_export.outputs import (
    file_inventory as file_inventory,  # re-exported: build.py imports it here
)

# glibc gives threads their own malloc arenas; which thread allocates what during session
# creation then decides whether the peak lands on one of two values ~5 MB apart (measured on a
# 9 MB model). One arena makes the peak reproducible, and it is the upper of the two values.
_REPRODUCIBLE_MALLOC = {"MALLOC_ARENA_MAX": "1"}
RSS_METHOD = (
    "peak resident set (VmHWM, /proc/self/status) of a fresh process through session creation,"
    " one prefill and one decode step at full context, minus its resident set (VmRSS) just"
    " before the session was created; glibc with MALLOC_ARENA_MAX=1"
)


@dataclass(frozen=True)
class MeasureConfig:
    """Workload and repetitions for memory and latency measurement.

    Attributes:
        ep: execution provider, ``"cpu"`` or ``"cuda"``.
        batch: sequences per call (B).
        prompt_len: prefill length (P).
        context: tokens the KV cache holds at the decode step measured (context - 1 cached).
        warmup: untimed calls before timing.
        runs: timed calls per shape.
        threads: intra-op threads (0: ONNX Runtime's default, one per physical core).
        prepack: ONNX Runtime's weight prepacking (False for a float artifact under
            ``--low-memory``: the session computes from the artifact's mapped weights, and a
            float16 one on the CPU provider casts them per forward,
            :func:`~cwca_export.exporter.session.make_session`).
    """

    ep: str = "cpu"
    batch: int = 1
    prompt_len: int = 32
    context: int = 128
    warmup: int = 3
    runs: int = 10
    threads: int = 0
    prepack: bool = True


def measure_runtime(model_path: Path, config: MeasureConfig, *, timeout_s: float = 600) -> dict[str, Any]:
    """Resident memory and latency of ``model_path`` under ``config``, in a fresh process."""
    request = {"model": str(model_path), **asdict(config)}
    proc = subprocess.run(
        [sys.executable, "-m", "cwca_export.exporter.measure"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **_REPRODUCIBLE_MALLOC},
    )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise RuntimeError(f"measuring {model_path.name} failed: {lines[-1] if lines else 'no output'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_side_by_side(model_paths: list[Path], config: MeasureConfig, *, rounds: int = 3) -> list[dict[str, Any]]:
    """Decode and prefill p50 of several artifacts measured in alternating rounds.

    Each round measures every artifact once (a fresh process each, in order); each artifact
    keeps its lowest p50 over the rounds. Load that comes and goes on a shared machine then
    falls on all of them alike, which a single measurement each, minutes apart, does not give.
    """
    if rounds < 1:
        raise ValueError(f"rounds {rounds}: must be >= 1")
    seen: list[dict[str, list[float]]] = [{"decode": [], "prefill": []} for _ in model_paths]
    for _ in range(rounds):
        for path, times in zip(model_paths, seen, strict=True):
            latency = measure_runtime(path, config)["latency_ms"]
            for phase in times:
                times[phase].append(latency[phase]["p50"])
    return [{"decode_p50_ms": min(t["decode"]), "prefill_p50_ms": min(t["prefill"]),
             "rounds_ms": {phase: [round(v, 4) for v in values] for phase, values in t.items()}} for t in seen]


def _status_bytes(field: str) -> int | None:
    """``VmRSS`` (resident now), ``VmHWM`` (peak resident) or ``RssAnon`` (resident, not file pages) of this
    process, in bytes."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def _nvidia_smi(*query: str) -> list[list[str]] | None:
    """Rows of an ``nvidia-smi --query-...`` CSV answer (no header, no units); None if unreadable."""
    try:
        proc = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return [[cell.strip() for cell in line.split(",")] for line in proc.stdout.splitlines() if line.strip()]


def _visible_gpu() -> str:
    """The GPU the CUDA provider uses (its device 0): the first of CUDA_VISIBLE_DEVICES, for nvidia-smi -i."""
    return (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"


def device_used_bytes(gpu: str) -> int | None:
    """Memory in use on ``gpu`` (all processes), from nvidia-smi; None if unreadable."""
    rows = _nvidia_smi("--query-gpu=memory.used", "-i", gpu)
    try:
        return int(float(rows[0][0]) * 2**20) if rows else None  # MiB
    except (ValueError, IndexError):
        return None


def process_device_bytes(gpu: str, pid: int, used_before: int | None) -> tuple[int | None, str]:
    """Device memory held by process ``pid`` on ``gpu`` and how it was read (see the module doc)."""
    rows = _nvidia_smi("--query-compute-apps=pid,used_memory", "-i", gpu)
    if rows is None:
        return None, "not measured (nvidia-smi is not available)"
    for row in rows:
        if len(row) >= 2 and row[0] == str(pid) and row[1].replace(".", "", 1).isdigit():
            return int(float(row[1]) * 2**20), (
                f"device memory of this process on GPU {gpu} (nvidia-smi --query-compute-apps, CUDA context"
                " included) after session creation, one prefill and one decode step at full context")
    used = device_used_bytes(gpu)
    if used is None or used_before is None:
        return None, f"not measured (nvidia-smi lists no memory for GPU {gpu})"
    return max(used - used_before, 0), (
        f"growth of GPU {gpu}'s used memory (nvidia-smi memory.used) from just before session creation to"
        " after one prefill and one decode step at full context (this process is not listed by its PID)")


def timed(session: Any, feed: dict[str, np.ndarray], warmup: int, runs: int) -> dict[str, float]:
    """``warmup`` untimed calls, then ``runs`` timed ones: p50, p90 and mean in ms."""
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "p50": float(np.percentile(times, 50)),
        "p90": float(np.percentile(times, 90)),
        "mean": float(np.mean(times)),
        "runs": runs,
    }


def _worker(request: dict[str, Any]) -> dict[str, Any]:
    from cwca_export.exporter.session import DecoderSession, casts_float16_per_run, make_session
    from cwca_export.ort import require_onnxruntime

    require_onnxruntime()  # the library itself is not part of the session's footprint
    b, p, c = request["batch"], request["prompt_len"], request["context"]
    cuda = request["ep"] == "cuda"
    device_before = device_used_bytes(_visible_gpu()) if cuda else None
    prepack = request.get("prepack", True)
    # read before the baseline: it imports onnx to look at the graph's header, not the session's memory
    casts = casts_float16_per_run(request["model"], request["ep"], prepack)
    before, before_anonymous = _status_bytes("VmRSS"), _status_bytes("RssAnon")
    session = make_session(request["model"], request["ep"], threads=request["threads"], prepack=prepack)
    decoder = DecoderSession(session)
    prefill = decoder.feed(np.ones((b, p), np.int64), np.ones((b, p), np.int64), None)
    if decoder.has_past:
        decode = decoder.feed(np.ones((b, 1), np.int64), np.ones((b, c), np.int64), decoder.empty_past(b, c - 1))
    else:
        decode = decoder.feed(np.ones((b, c), np.int64), np.ones((b, c), np.int64), None)
    session.run(None, prefill)
    session.run(None, decode)
    peak, now = _status_bytes("VmHWM"), _status_bytes("VmRSS")
    resident = None if before is None or peak is None else peak - before
    anonymous_now = _status_bytes("RssAnon")
    memory = {
        "resident_bytes": resident,
        "resident_after_bytes": None if before is None or now is None else now - before,
        # the part of it that is the process's own (the rest: pages of the artifact's files,
        # which the kernel may evict and read again; all of it without prepacking)
        "anonymous_after_bytes": None if before_anonymous is None or anonymous_now is None
        else anonymous_now - before_anonymous,
        "resident_method": RSS_METHOD if resident is not None else "not measured (needs /proc)",
    }
    if cuda:
        device, method = process_device_bytes(_visible_gpu(), os.getpid(), device_before)
        memory = {"resident_bytes": device, "resident_after_bytes": device, "resident_method": method,
                  "host_resident_bytes": memory["resident_bytes"],
                  "host_resident_after_bytes": memory["resident_after_bytes"]}
    return {
        **memory,
        "kv_cache_bytes": decoder.kv_cache_bytes(b, c),
        "has_kv_cache": decoder.has_past,
        "latency_ms": {
            "prefill": timed(session, prefill, request["warmup"], request["runs"]),
            "decode": timed(session, decode, request["warmup"], request["runs"]),
        },
        "workload": {**{k: request[k] for k in ("ep", "batch", "prompt_len", "context", "warmup", "runs", "threads")},
                     "prepack": prepack,
                     "casts_float16_per_run": casts},
        "providers": session.get_providers(),
    }


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.stdin.read()))))
