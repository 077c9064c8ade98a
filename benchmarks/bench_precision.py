"""Which estimate of per-layer quantization damage predicts the real damage better?

Predictors, both from the same calibration tokens (the shipped train text):
  measured  - the probes of ``measure_precision_damage`` (each group alone in each format, rest of
              the model run from cached inputs);
  fisher    - the HAWQ-style curvature estimate 1/2 sum F_ii (w_i - q(w_i))^2 with the empirical
              diagonal Fisher (``fisher_precision_estimate``).
Truth: the loss increase on held-out tokens (the shipped held-out text) of (a) each group alone
in each format, (b) random whole precision plans (sum of predictions vs measured whole plan).
Reported: Spearman and Pearson correlations, and the time each predictor took.

    python benchmarks/bench_precision.py --out benchmarks/results/bench_precision.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

from cwca_export.data import calibration_data
from cwca_export.demo import DEMO_MODEL, HELDOUT_TEXT, TRAIN_TEXT
from cwca_export.loading import load_model
from cwca_export.planning.damage import calibration_loss
from cwca_export.planning.precision import (
    StorageFormat,
    fisher_precision_estimate,
    measure_precision_damage,
    quantized_weights,
)
from cwca_export.versions import library_versions

FORMATS = ["fp32", "int8", "int4-b128-asym", "int4-b32"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--heldout-samples", type=int, default=32)
    ap.add_argument("--plans", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_precision.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(DEMO_MODEL)
    calib = calibration_data(TRAIN_TEXT, tok, num_samples=args.samples, seq_len=args.seq_len, seed=0).input_ids
    held = calibration_data(HELDOUT_TEXT, tok, num_samples=args.heldout_samples, seq_len=args.seq_len,
                            seed=1).input_ids
    t = time.perf_counter()
    measured = measure_precision_damage(model, calib, FORMATS)
    t_measured = time.perf_counter() - t
    t = time.perf_counter()
    fisher = fisher_precision_estimate(model, calib, FORMATS)
    t_fisher = time.perf_counter() - t
    base = calibration_loss(model, held)
    truth, pred_m, pred_f, labels = [], [], [], []
    for g, group in enumerate(measured.groups):
        for f, fmt in enumerate(FORMATS[1:], start=1):
            if measured.damage[g][f] is None:
                continue
            with quantized_weights(model, {group: StorageFormat.parse(fmt)}):
                truth.append(calibration_loss(model, held) - base)
            pred_m.append(measured.damage[g][f])
            pred_f.append(fisher.damage[g][f])
            labels.append(f"{group}:{fmt}")
    rng = np.random.default_rng(0)
    plan_truth, plan_m, plan_f = [], [], []
    for _ in range(args.plans):
        choice = {}
        for g, group in enumerate(measured.groups):
            allowed = [f for f in range(len(FORMATS)) if measured.damage[g][f] is not None]
            choice[group] = int(rng.choice(allowed))
        with quantized_weights(model, {grp: StorageFormat.parse(FORMATS[f]) for grp, f in choice.items()}):
            plan_truth.append(calibration_loss(model, held) - base)
        plan_m.append(sum(measured.damage[g][choice[grp]] for g, grp in enumerate(measured.groups)))
        plan_f.append(sum(fisher.damage[g][choice[grp]] for g, grp in enumerate(measured.groups)))

    def corr(a, b):
        return {"spearman": float(spearmanr(a, b).statistic), "pearson": float(pearsonr(a, b).statistic)}

    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads()},
        "versions": library_versions(),
        "settings": vars(args) | {"out": str(args.out), "formats": FORMATS},
        "single_group": {"n": len(truth), "measured": corr(pred_m, truth), "fisher": corr(pred_f, truth),
                         "truth_range": [float(min(truth)), float(max(truth))]},
        "whole_plans": {"n": len(plan_truth), "measured": corr(plan_m, plan_truth),
                        "fisher": corr(plan_f, plan_truth),
                        "mean_abs_error_measured": float(np.mean(np.abs(np.array(plan_m) - plan_truth))),
                        "mean_abs_error_fisher": float(np.mean(np.abs(np.array(plan_f) - plan_truth)))},
        "seconds": {"measured": round(t_measured, 1), "fisher": round(t_fisher, 1)},
        "rows": [{"case": c, "truth": t_, "measured": m, "fisher": f}
                 for c, t_, m, f in zip(labels, truth, pred_m, pred_f, strict=True)],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("single_group", "whole_plans", "seconds")}, indent=1))


if __name__ == "__main__":
    main()
