"""Per-sequence estimators at batch size 1 against larger batches on the shipped demo model.

fisher (gradnorm, obd, layerif alike) needs each sequence's own gradient; at batch size > 1
the pass splits them from one forward/backward (docs/scoring.md). This times the estimator
(``wall_time_s``, the passes alone) and the process CPU time at each batch size, rounds
interleaved so a busy machine slows them alike, and checks the scores agree.

Usage:
    python benchmarks/bench_score_batch.py [--method fisher] [--batch-sizes 1,8] [--samples 32]
        [--seq-len 128] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="fisher")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    args = parser.parse_args()

    import warnings

    import torch

    from cwca_export.data import calibration_data
    from cwca_export.demo import DEMO_MODEL, TRAIN_TEXT
    from cwca_export.loading import load_model
    from cwca_export.scoring import score

    warnings.simplefilter("ignore")  # the noise-floor warning of a small N is not the point here
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(DEMO_MODEL)
    model.eval()
    data = calibration_data(TRAIN_TEXT, tokenizer, num_samples=args.samples, seq_len=args.seq_len, seed=0)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    times: dict[int, list[tuple[float, float]]] = {b: [] for b in sizes}
    scores = {}
    for _ in range(args.rounds):
        for b in sizes:
            cpu = time.process_time()
            result = score(model, data, method=args.method, batch_size=b, progress=False)
            times[b].append((result.wall_time_s, time.process_time() - cpu))
            scores[b] = result.zeta2
    base = sorted(w for w, _ in times[sizes[0]])[len(times[sizes[0]]) // 2]
    print(f"{args.method} on {DEMO_MODEL.name}: {args.samples} x {args.seq_len} tokens, {args.threads} torch thread(s),"
          f" {args.rounds} rounds (median)")
    for b in sizes:
        wall = sorted(w for w, _ in times[b])[len(times[b]) // 2]
        cpu = sorted(c for _, c in times[b])[len(times[b]) // 2]
        drift = max(abs(x - y) / abs(x) for x, y in zip(scores[sizes[0]], scores[b], strict=True))
        print(f"  batch {b}: passes {wall:.2f} s, process CPU {cpu:.2f} s, speed-up {base / wall:.2f}x,"
              f" max relative score difference {drift:.1e}")


if __name__ == "__main__":
    main()
