"""Time and peak memory of each scoring method against a bare forward+backward (CPU or GPU).

Each measurement runs in its own subprocess so peak resident memory (CPU) or peak allocated
memory (CUDA) belongs to that method alone. The model is a Llama built from a config, so no
download is needed. Peak memory is reported above the loaded model and data, next to what
docs/scoring.md's formulas predict for the method's extra state.

    python benchmarks/bench_scorer.py --layers 8 --hidden 256 --samples 8 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

METHODS = ("fisher", "gradnorm", "obd", "kfac", "owl", "layerif", "uniform")


def _build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
        num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq_len,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, args.vocab, (args.samples + args.samples // 4, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    return model, ids


def _peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _one(args) -> dict:
    import torch

    from cwca_export.blocks import find_blocks
    from cwca_export.scoring import score

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model, ids = _build(args)
    model.to(device)
    blocks = find_blocks(model)
    base = _current_bytes(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    if args.one == "bare":
        for row in ids[: args.samples]:
            seq = row[None].to(device)
            model(input_ids=seq, labels=seq, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
    else:
        held = args.samples // 4 if args.one == "layerif" else 0
        data = ids[: args.samples + held]
        seconds = score(model, data, method=args.one, num_samples=args.samples, seq_len=args.seq_len,
                        held_out=held, progress=False, cpu=args.cpu).wall_time_s
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    linears = [m.weight.shape for b in blocks for m in b.linears.values()]
    return {
        "method": args.one,
        "seconds": seconds,
        "peak_above_model_mb": (_peak_bytes(device) - base) / 2**20,
        "P": sum(p.numel() for p in model.parameters()),
        "P_blocks": sum(b.n_params for b in blocks),
        "kfac_factor_floats": sum(o * o + i * i for o, i in linears),
        "input_floats": sum(i for _, i in linears),
        "largest_linear": max(o * i for o, i in linears),
        "device": str(device),
    }


def _predicted_peak_mb(r: dict, bare: dict) -> float | None:
    """docs/scoring.md's peak for the method, written as the bare peak plus the method's state
    minus the bare pass's parameter gradients (fp32). None for owl: forward-only activations
    are not modelled."""
    pb, one = 4 * r["P_blocks"], 4 * r["largest_linear"]
    extra = {
        "fisher": 2 * pb + one, "gradnorm": 2 * pb + one, "obd": 2 * pb + one,
        "kfac": pb + 4 * r["kfac_factor_floats"] + one, "layerif": 5 * pb + one,
    }
    if r["method"] == "uniform":
        return 0.0
    if r["method"] not in extra:
        return None
    return bare["peak_above_model_mb"] + (extra[r["method"]] - 4 * r["P"]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU when a GPU is present")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args)))
        return
    results = {}
    for method in ("bare", *args.methods.split(",")):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", method],
                             capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    bare = results["bare"]
    print(f"model: Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; P = {bare['P']:,},"
          f" block weights {bare['P_blocks']:,}; {args.samples} x {args.seq_len} tokens; {bare['device']}")
    print("| method | time s | time / bare | peak above model MiB | peak / bare | predicted peak MiB |")
    print("|---|---|---|---|---|---|")
    for method, r in results.items():
        peak = None if method == "bare" else _predicted_peak_mb(r, bare)
        predicted = "" if peak is None else f"{peak:.1f}"
        print(f"| {method} | {r['seconds']:.2f} | {r['seconds'] / bare['seconds']:.2f} |"
              f" {r['peak_above_model_mb']:.1f} | {r['peak_above_model_mb'] / bare['peak_above_model_mb']:.2f} |"
              f" {predicted} |")


if __name__ == "__main__":
    main()
