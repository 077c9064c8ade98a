"""Time and peak memory of every compression method, layer by layer against whole model.

Each (method, mode) runs in a fresh subprocess so that its peak resident memory
(``ru_maxrss``) is its own; the table reports the peak minus the resident memory just
before ``compress`` (model, data and libraries already loaded), i.e. what compressing cost.

The model is a randomly initialised Llama built from a config (8 blocks, hidden 256, MLP
768, 8 heads / 4 KV heads, vocab 2048) fed random token ids: timing and memory do not
depend on trained weights.

Usage:
    python benchmarks/bench_compress.py [--samples 32] [--seq-len 256] [--device cpu] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

CASES = [  # (method, program, options, modes)
    ("magnitude", "prune", {}, ["layer-by-layer"]),
    ("wanda", "prune", {}, ["layer-by-layer", "whole-model"]),
    ("sparsegpt", "prune", {}, ["layer-by-layer", "whole-model"]),
    ("sparsegpt", "prune", {"nm": "2:4"}, ["layer-by-layer"]),
    ("width", "prune", {"heads": True}, ["layer-by-layer", "whole-model"]),
    ("lowrank", "allocate", {}, ["layer-by-layer"]),
    ("asvd", "allocate", {}, ["layer-by-layer", "whole-model"]),
]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def run_one(
    method: str, program: str, options: dict, mode: str, samples: int, seq_len: int, device: str
) -> dict:
    """Build the model and data, compress once, report seconds and peak-memory growth.

    On a CUDA ``device`` the model stays on the CPU and each block visits the GPU; the
    peak is then the GPU's allocated-memory peak.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import cwca_export
    from cwca_export.blocks import find_blocks

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=2048,
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (samples, seq_len))
    blocks = find_blocks(model)
    k = len(blocks)
    x = [0.5] * k if program == "prune" else [4.0] * k  # rank 4 * 8 = 32
    plan = cwca_export.Plan(
        program,
        x=x,
        q=[1 / k] * k,
        n_params=[b.n_params for b in blocks],
        lo=[0.0] * k,
        hi=[1.0 if program == "prune" else 64.0] * k,
        block_names=[b.name for b in blocks],
        cost=None if program == "prune" else [1.0] * k,
    )
    cuda = device.startswith("cuda")
    before = torch.cuda.memory_allocated(device) if cuda else _rss_bytes()
    start = time.perf_counter()
    cwca_export.compress(
        model,
        plan,
        method=method,
        data=ids,
        batch_size=4,
        device=device,
        sequential=mode == "layer-by-layer",
        **options,
    )
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"seconds": seconds, "peak_growth_mib": (peak - before) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="Where blocks are processed (cpu, cuda).")
    parser.add_argument("--out", default=None, help="Write the markdown table here too.")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one case as JSON
    args = parser.parse_args()
    if args.one:
        case = json.loads(args.one)
        result = run_one(**case, samples=args.samples, seq_len=args.seq_len, device=args.device)
        print(json.dumps(result))
        return
    lines = [
        f"Llama 8 x 256 (MLP 768, 8/4 heads, vocab 2048), {args.samples} x {args.seq_len} tokens,"
        f" batch 4, fp32, device {args.device}; rho 0.5 per block for pruning methods,"
        " rank 32 (4 units x rank_step 8) for low rank.",
        "",
        "| method | options | mode | time (s) | peak memory growth (MiB) |",
        "|---|---|---|---:|---:|",
    ]
    for method, program, options, modes in CASES:
        for mode in modes:
            case = {"method": method, "program": program, "options": options, "mode": mode}
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--samples",
                    str(args.samples),
                    "--seq-len",
                    str(args.seq_len),
                    "--device",
                    args.device,
                    "--one",
                    json.dumps(case),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "-"
            lines.append(
                f"| {method} | {opts} | {mode} | {r['seconds']:.2f} | {r['peak_growth_mib']:.0f} |"
            )
            print(lines[-1], flush=True)
    lines.append("")
    lines.append(f"python {platform.python_version()}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
