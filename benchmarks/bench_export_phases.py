"""Peak resident memory of each phase of one export (issue 14): backend export, fp32
verification, post-processing, final checks, measurement.

Builds a bench_scale.py model (random init, fp32), loads it as ``cwca-export export`` does,
and exports it through the Python API with each phase of ``exporter/build.py`` wrapped: the
kernel's peak-RSS mark (VmHWM) is reset before a phase (``/proc/self/clear_refs``) and read
after it, so each row is that phase's own peak. Linux only.

With ``--low-memory`` (``--backend onnx``) the rows are: torch's reference logits, the spill
of the weights to a scratch file (as each is swapped for its placeholder), the trace with
placeholder weights, filling the real initialisers, verification, post-processing,
measurement.

Usage:
    python benchmarks/bench_export_phases.py [--size 40m] [--backend optimum] [--low-memory] [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scale  # noqa: E402

# above the 2 GiB protobuf limit in fp32 (551M parameters, 2.2 GB): torch.onnx.export writes
# the weights as external data, the path every 7B export takes
bench_scale.SIZES["550m"] = dict(hidden_size=1536, num_hidden_layers=18, intermediate_size=4096,
                                 num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                                 tie_word_embeddings=False)

MIB = 2**20


def status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, bytes."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="40m")
    ap.add_argument("--backend", default="optimum")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--low-memory", action="store_true", help="the low-memory export (--backend onnx)")
    args = ap.parse_args()

    from cwca_export.exporter import api, build
    from cwca_export.loading import load_model

    work = Path(args.work or tempfile.mkdtemp(prefix="export-phases-"))
    folder = work / f"model-{args.size}"
    if not (folder / "config.json").exists():
        bench_scale.build_model(args.size, folder)
    gc.collect()
    rows: list[dict] = []

    def phase(name, fn):
        def wrapped(*a, **k):
            gc.collect()
            before = status()["VmRSS"]
            reset_peak()
            try:
                return fn(*a, **k)
            finally:
                after = status()
                rows.append({"phase": name, "rss_before": before, "peak": after["VmHWM"],
                             "rss_after": after["VmRSS"]})
                print(f"{name:14s} before {before / MIB:7.0f}  peak {after['VmHWM'] / MIB:7.0f}"
                      f"  after {after['VmRSS'] / MIB:7.0f} MiB", flush=True)
        return wrapped

    backend = build.get_backend(args.backend)
    type(backend).export = phase("backend", type(backend).export)
    build.torch_reference = phase("reference", build.torch_reference)
    build.fill_initializers = phase("fill", build.fill_initializers)
    stand_ins = build.placeholder_weights

    @contextlib.contextmanager
    def spilled(*a, **k):  # the spill happens on entering the placeholders' context
        context = stand_ins(*a, **k)
        value = phase("spill", context.__enter__)()
        try:
            yield value
        except BaseException:
            if not context.__exit__(*sys.exc_info()):
                raise
        else:
            context.__exit__(None, None, None)

    build.placeholder_weights = spilled
    verify_calls = iter(["verify_fp32", "verify_final"])  # (the precision path's second reference is not run here)
    inner_verify = build._verify
    build._verify = lambda *a, **k: phase(next(verify_calls), inner_verify)(*a, **k)
    build._postprocess = phase("postprocess", build._postprocess)
    build.measure_runtime = phase("measure", build.measure_runtime)
    if args.low_memory:  # as `cwca-export export --low-memory` does before loading
        build.return_large_frees()
    base = status()["VmRSS"]
    model, tokenizer = load_model(folder)
    gc.collect()
    loaded = status()["VmRSS"]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{args.size}: weights {weights / MIB:.0f} MiB; rss before load {base / MIB:.0f},"
          f" after {loaded / MIB:.0f} MiB")
    reset_peak()
    peaks = rows  # each phase resets the mark: the whole call's peak is the largest phase's
    art = work / (f"art-{args.backend}" + ("-low-memory" if args.low_memory else ""))
    api.export(model, None, art, backend=args.backend, quantize=args.quantize,
               tokenizer=tokenizer, overwrite=True, warmup=1, runs=2, low_memory=args.low_memory)
    total = max([status()["VmHWM"], *(r["peak"] for r in peaks)])
    print(f"export peak (whole call) {total / MIB:.0f} MiB = loaded + {(total - loaded) / weights:.2f} x weights")
    print(json.dumps({"size": args.size, "backend": args.backend, "quantize": args.quantize,
                      "low_memory": args.low_memory, "weights": weights,
                      "rss_loaded": loaded, "export_peak": total, "phases": rows}))


if __name__ == "__main__":
    main()
