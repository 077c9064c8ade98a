"""Measured-damage probes against full forwards on the shipped demo model (CPU).

Times ``measure_damage`` (block-alone probes from cached block inputs) next to the same
number of full forwards of the model over the same calibration tokens, in one process.

Usage:
    python benchmarks/bench_damage.py [--method wanda] [--points 0.3,0.5,0.7,0.9] [--samples 32] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--points", default="0.3,0.5,0.7,0.9")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import torch

    from cwca_export.data import calibration_data
    from cwca_export.demo import DEMO_MODEL, TRAIN_TEXT
    from cwca_export.loading import load_model
    from cwca_export.planning.damage import calibration_loss, measure_damage

    model, tokenizer = load_model(DEMO_MODEL)
    model.eval()
    ids = calibration_data(TRAIN_TEXT, tokenizer, num_samples=args.samples, seq_len=args.seq_len, seed=0).input_ids
    calibration_loss(model, ids, batch_size=args.batch_size)  # warm-up
    start = time.perf_counter()
    curves = measure_damage(model, ids, method=args.method, points=args.points, batch_size=args.batch_size)
    probe_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(curves.probes):
        calibration_loss(model, ids, batch_size=args.batch_size)
    full_s = time.perf_counter() - start
    print(f"demo model, {args.samples} x {args.seq_len} tokens, torch threads {torch.get_num_threads()}")
    print(f"measure_damage({args.method}, {curves.probes} probes): {probe_s:.1f} s"
          f" (dense pass and statistics included); forward_fraction {curves.forward_fraction:.3f}")
    print(f"{curves.probes} full forwards: {full_s:.1f} s (one: {full_s / curves.probes:.2f} s)")
    print(f"probes / full forwards: {probe_s / full_s:.2f}")


if __name__ == "__main__":
    main()
