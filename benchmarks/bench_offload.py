"""Scoring with accelerate offload against the same model resident (CPU): peak RSS, time, scores.

Builds a Llama from a config (16 layers, hidden 512, MLP 1376, vocab 8192) into a temporary
folder, then scores it in a fresh subprocess per (method, placement) so each peak resident set
(``ru_maxrss``, libraries included) is its own. Offloaded: ``device_map="auto"`` with
``max_memory={"cpu": CAP}``, which sends most blocks to disk. Both with gradient checkpointing.

Usage:
    python benchmarks/bench_offload.py [--methods fisher,kfac,owl] [--cap 60MiB]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _one(folder: str, method: str, cap: str | None) -> dict:
    import torch

    from cwca_export.scoring import score

    ids = torch.randint(0, 8192, (8, 256), generator=torch.Generator().manual_seed(0))
    kwargs = dict(method=method, num_samples=8, seq_len=256, progress=False, gradient_checkpointing=True)
    if cap:
        kwargs.update(device_map="auto", max_memory={"cpu": cap})
    start = time.perf_counter()
    scores = score(folder, ids, **kwargs)
    return {"seconds": time.perf_counter() - start, "zeta2": scores.zeta2,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="fisher,kfac,owl")
    parser.add_argument("--cap", default="60MiB")
    parser.add_argument("--one", nargs=3, metavar=("FOLDER", "METHOD", "CAP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        folder, method, cap = args.one
        print(json.dumps(_one(folder, method, None if cap == "-" else cap)))
        return

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=16,
                             num_attention_heads=16, num_key_value_heads=16)
        LlamaForCausalLM(config).save_pretrained(tmp)
        size = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors")) / 2**20
        print(f"model: 16 layers, hidden 512, {size:.0f} MiB of safetensors; cap {args.cap}")
        print("| method | resident: peak RSS MiB / s | offloaded: peak RSS MiB / s | max |zeta2 diff| / max zeta2 |")
        print("|---|---|---|---|")
        for method in args.methods.split(","):
            runs = {}
            for placement, cap in (("resident", "-"), ("offloaded", args.cap)):
                out = subprocess.run([sys.executable, __file__, "--one", tmp, method, cap],
                                     capture_output=True, text=True, check=True)
                runs[placement] = json.loads(out.stdout.strip().splitlines()[-1])
            a, b = runs["resident"]["zeta2"], runs["offloaded"]["zeta2"]
            diff = max(abs(x - y) for x, y in zip(a, b, strict=True)) / max(abs(x) for x in a)
            print(f"| {method} | {runs['resident']['peak_rss_mib']:.0f} / {runs['resident']['seconds']:.1f}"
                  f" | {runs['offloaded']['peak_rss_mib']:.0f} / {runs['offloaded']['seconds']:.1f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
