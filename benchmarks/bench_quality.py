"""Side-by-side plan quality on the shipped demo model: held-out perplexity per allocator.

Every allocator gets the same global sparsity, the same pruner and the same calibration
sequences (drawn from ``assets/text/train.txt`` with the seed); each plan is applied with
:func:`cwca_export.compress` (layer by layer) to a fresh copy of the demo model and scored on
held-out text the plans never saw (``assets/text/heldout.txt``, 32,768 tokens in windows of
256). Scores are computed once per seed; measured-damage probes once per (seed, pruner).

Allocators (``--allocators``, comma-separated; default: all):

- ``uniform``: rho_k = S.
- ``cwca-<method>-k<kappa>``: the MDL program of docs/design.md 2.2 on ``method`` scores (fisher,
  kfac, exact with CG capped at 10 iterations, gradnorm, obd), psi = rho^2, hi 0.95: the paper's recipe.
- ``cwca-debiased128-k0.25``: the same on debiased diagonal-Fisher scores from 128 sequences.
- ``owl``: OWL's outlier ratio (M = 5) through the band map, lambda = 0.08.
- ``layerif``: LayerIF influence through the linear min-max map, epsilon = 0.3.
- ``oracle``: the MDL program fed the measured loss increase of pruning each block alone at S.
- ``damage-power`` / ``damage-piecewise``: measured single-block curves, one-dual solve.
- ``refined``: ``damage-piecewise`` corrected by measured exchange on whole plans
  (:func:`cwca_export.planning.refine.refine_exchange`, ``--max-evals`` calibration forwards).
- ``default``: what ``cwca-export`` recommends (see README), :func:`cwca_export.planning.refine.refine_plan`:
  the start chosen by calibration loss among uniform and ``damage-piecewise`` with bands
  none / 0.2 / 0.1 / 0.05, then refined; ``--max-evals`` forwards in all.

Rows go to a JSON Lines file as they finish (``--out``); a rerun skips rows already there.

Usage:
    python benchmarks/bench_quality.py --out bench_quality.jsonl [--seeds 0,1,2]
        [--pruners magnitude,wanda,sparsegpt] [--sparsities 0.3,0.5,0.7] [--allocators ...]
    python benchmarks/bench_quality.py --out bench_quality.jsonl --table   # print the tables
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np

SCORE_METHODS = {"fisher": {}, "kfac": {}, "exact": {"cg_max_iter": 10}, "gradnorm": {}, "obd": {},
                 "owl": {"owl_threshold": 5.0}, "layerif": {}}
POINTS = (0.1, 0.3, 0.5, 0.7, 0.9)
ALL = ["uniform", "owl", "layerif", "cwca-fisher-k1", "cwca-fisher-k0.25", "cwca-kfac-k1", "cwca-kfac-k0.25",
       "cwca-exact-k1", "cwca-exact-k0.25", "cwca-gradnorm-k1", "cwca-obd-k1", "cwca-debiased128-k0.25", "oracle",
       "damage-power", "damage-piecewise", "refined", "default"]


def _needs(allocator: str) -> str | None:
    if allocator.startswith("cwca-"):
        return allocator.split("-")[1]
    return {"owl": "owl", "layerif": "layerif"}.get(allocator)


class Context:
    """Model, tokenizer, data and caches for one seed."""

    def __init__(self, seed: int, samples: int, seq_len: int, eval_tokens: int) -> None:
        import torch

        from cwca_export.data import calibration_data, load_texts
        from cwca_export.demo import DEMO_MODEL, HELDOUT_TEXT, TRAIN_TEXT
        from cwca_export.evaluate import tokenize_text
        from cwca_export.loading import load_model

        torch.manual_seed(seed)
        self.seed = seed
        self.model, self.tokenizer = load_model(DEMO_MODEL)
        self.model.eval()
        self.calib = calibration_data(TRAIN_TEXT, self.tokenizer, num_samples=samples, seq_len=seq_len,
                                      seed=seed, held_out=max(1, samples // 4))
        self.heldout_ids = tokenize_text(self.tokenizer, "\n\n".join(load_texts(HELDOUT_TEXT)))
        self.eval_tokens = eval_tokens
        self.scores: dict[str, object] = {}
        self.damage: dict[str, object] = {}
        self.cost: dict[str, dict] = {}

    def score(self, method: str):
        from cwca_export.scoring import score

        if method not in self.scores:
            start = time.perf_counter()
            self.scores[method] = score(self.model, self.calib, method=method, options=SCORE_METHODS[method],
                                        progress=False)
            self.cost[method] = {"seconds": round(time.perf_counter() - start, 1)}
        return self.scores[method]

    def debiased128(self):
        """Debiased diagonal-Fisher scores from 128 calibration sequences (the issue's N = 128 row)."""
        from cwca_export.data import calibration_data
        from cwca_export.demo import TRAIN_TEXT
        from cwca_export.scoring import score

        if "debiased128" not in self.scores:
            start = time.perf_counter()
            calib = calibration_data(TRAIN_TEXT, self.tokenizer, num_samples=128, seq_len=self.calib.seq_len,
                                     seed=self.seed)
            self.scores["debiased128"] = score(self.model, calib, method="fisher", debias=True, progress=False)
            self.cost["debiased128"] = {"seconds": round(time.perf_counter() - start, 1)}
        return self.scores["debiased128"]

    def damage_scores(self, pruner: str):
        from cwca_export.scoring import score

        if pruner not in self.damage:
            start = time.perf_counter()
            self.damage[pruner] = score(
                self.model, self.calib, method="damage", progress=False,
                options={"pruner": pruner, "points": ",".join(f"{p:g}" for p in POINTS), "at": 0.5},
            )
            s = self.damage[pruner]
            self.cost[f"damage-{pruner}"] = {"seconds": round(time.perf_counter() - start, 1),
                                             "probes": s.settings.get("probes")}
        return self.damage[pruner]

    def perplexity(self, model) -> float:
        from cwca_export.evaluate import perplexity_from_logits, torch_logits_fn

        return perplexity_from_logits(torch_logits_fn(model), self.heldout_ids, seq_len=256,
                                      max_tokens=self.eval_tokens).perplexity


def make_plan(ctx: Context, allocator: str, pruner: str, sparsity: float, max_evals: int):
    """The plan's ratios and what it cost beyond scoring: (x, extra)."""
    from cwca_export.planning.plan import plan_band, plan_from_damage, plan_pruning
    from cwca_export.planning.plan_probe import PlanLoss
    from cwca_export.planning.refine import refine_exchange, refine_plan
    from cwca_export.scores import LayerScores

    k = ctx.model.config.num_hidden_layers
    if allocator == "uniform":
        return [sparsity] * k, {}
    if allocator == "owl":
        return plan_band(ctx.score("owl"), sparsity, width=0.08, hi=0.95).x, {}
    if allocator == "layerif":
        return plan_band(ctx.score("layerif"), sparsity, width=0.3, hi=0.95).x, {}
    if allocator == "cwca-debiased128-k0.25":
        return plan_pruning(ctx.debiased128(), sparsity, kappa=0.25).x, {}
    if allocator.startswith("cwca-"):
        _, method, kappa = allocator.split("-")
        return plan_pruning(ctx.score(method), sparsity, kappa=float(kappa[1:])).x, {}
    damage = ctx.damage_scores(pruner)
    if allocator == "oracle":
        at = LayerScores("damage", zeta2=np.maximum(damage.stats[f"damage@{sparsity:g}"], 0.0),
                         n_params=damage.n_params)
        return plan_pruning(at, sparsity).x, {}
    if allocator == "damage-power":
        return plan_from_damage(damage, sparsity, form="power").x, {}
    if allocator == "damage-piecewise":
        return plan_from_damage(damage, sparsity).x, {}
    if allocator == "default":
        plan = refine_plan(ctx.model, damage, sparsity, ctx.calib, method=pruner, max_evals=max_evals)
        record = plan.parameters["refinement"]
        return plan.x, {"evaluations": record["forwards"], "accepted": len(record["moves"]),
                        "start": record["start"], "refine_seconds": record["wall_time_s"],
                        "calib_loss_start": record["calib_loss_start"], "calib_loss": record["calib_loss"]}
    if allocator == "refined":
        lo, hi = 0.0, 0.95
        start = plan_from_damage(damage, sparsity, lo=lo, hi=hi).x
        began = time.perf_counter()
        measure = PlanLoss(ctx.model, ctx.calib.input_ids, method=pruner)
        try:
            result = refine_exchange(start, damage.n_params, measure, lo=lo, hi=hi, max_evals=max_evals)
        finally:
            measure.close()
        return list(result.x), {"evaluations": result.evaluations, "accepted": len(result.accepted),
                                "refine_seconds": round(time.perf_counter() - began, 1),
                                "calib_loss_start": result.start_loss, "calib_loss": result.loss}
    raise ValueError(f"unknown allocator {allocator!r}; choose from {ALL}")


def run(args) -> None:
    from cwca_export.blocks import find_blocks
    from cwca_export.compression import compress
    from cwca_export.planning.plan import Plan

    out = Path(args.out)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            row = json.loads(line)
            done.add((row["seed"], row["pruner"], row["sparsity"], row["allocator"]))
    for seed in args.seeds:
        ctx = Context(seed, args.samples, args.seq_len, args.eval_tokens)
        dense = None
        for pruner in args.pruners:
            for sparsity in args.sparsities:
                for allocator in args.allocators:
                    if (seed, pruner, sparsity, allocator) in done:
                        continue
                    began = time.perf_counter()
                    x, extra = make_plan(ctx, allocator, pruner, sparsity, args.max_evals)
                    plan_seconds = time.perf_counter() - began
                    model = copy.deepcopy(ctx.model)
                    blocks = find_blocks(ctx.model)
                    plan = Plan("prune", x=list(map(float, x)), q=[1.0 / len(x)] * len(x),
                                n_params=[b.n_params for b in blocks], lo=[0.0] * len(x), hi=[1.0] * len(x),
                                block_names=[b.name for b in blocks])
                    compress(model, plan, method=pruner, data=ctx.calib, check_fingerprint=False)
                    if dense is None:
                        dense = ctx.perplexity(ctx.model)
                    row = {"seed": seed, "pruner": pruner, "sparsity": sparsity, "allocator": allocator,
                           "perplexity": ctx.perplexity(model), "dense": dense, "x": [round(v, 4) for v in x],
                           "plan_seconds": round(plan_seconds, 1), **extra}
                    with out.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    print(f"seed {seed} {pruner:9s} S={sparsity:.1f} {allocator:18s} ppl {row['perplexity']:.3f}",
                          flush=True)
        noise = {m: s.stats.get("zeta2_noise_ratio") for m, s in ctx.scores.items()
                 if m in ("fisher", "kfac", "exact", "gradnorm", "obd", "debiased128")}
        meta = out.with_suffix(".meta.json")
        previous = json.loads(meta.read_text()) if meta.exists() else {}
        entry = previous.setdefault(str(seed), {"noise_ratio": {}, "cost": {}})
        entry["noise_ratio"].update(noise)  # a rerun adding allocators keeps what earlier runs found
        entry["cost"].update(ctx.cost)
        meta.write_text(json.dumps(previous, indent=1))


def table(args) -> None:
    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines()]
    rows = [r for r in rows if r["allocator"] in args.allocators and r["pruner"] in args.pruners
            and r["sparsity"] in args.sparsities and r["seed"] in args.seeds]
    by = {}
    for r in rows:
        by.setdefault((r["pruner"], r["sparsity"], r["allocator"]), []).append(r["perplexity"])
    pruners = sorted({r["pruner"] for r in rows}, key=["magnitude", "wanda", "sparsegpt"].index)
    sparsities = sorted({r["sparsity"] for r in rows})
    allocators = [a for a in ALL if any(r["allocator"] == a for r in rows)]
    cols = [(p, s) for s in sparsities for p in pruners]
    print("| allocator | " + " | ".join(f"S={s:g} {p}" for p, s in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for a in allocators:
        cells = []
        for p, s in cols:
            vals = by.get((p, s, a))
            base = by.get((p, s, "uniform"))
            if not vals:
                cells.append("")
                continue
            mean = float(np.mean(vals))
            spread = f" ±{np.std(vals):.2f}" if len(vals) > 1 else ""
            rel = f" ({100 * (mean / np.mean(base) - 1):+.1f}%)" if base and a != "uniform" else ""
            cells.append(f"{mean:.2f}{spread}{rel}")
        print(f"| {a} | " + " | ".join(cells) + " |")
    meta = Path(args.out).with_suffix(".meta.json")
    if meta.exists():
        info = json.loads(meta.read_text())
        first = info[min(info, key=int)]
        print("\nzeta2 x N / n_k per block (the diagonal-Fisher noise floor is about 1), seed", min(info, key=int))
        for method, ratios in first["noise_ratio"].items():
            if ratios:
                print(f"| {method} | " + " | ".join(f"{v:.3g}" for v in ratios) + " |")
        print("\nscoring and probing cost:", json.dumps(first["cost"]))
    extra = [r for r in rows if "evaluations" in r]
    for a in ("refined", "default"):
        mine = [r for r in extra if r["allocator"] == a]
        if mine:
            print(f"{a}: {np.mean([r['evaluations'] for r in mine]):.1f} whole-plan forwards and"
                  f" {np.mean([r['refine_seconds'] for r in mine]):.1f} s per plan on average")
    seeds = sorted({r["seed"] for r in rows})
    print(f"\nseeds {seeds}; dense perplexity {rows[0]['dense']:.2f}; machine {platform.machine()}"
          f" {platform.processor() or ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_quality.jsonl")
    parser.add_argument("--seeds", default="0", type=lambda s: [int(v) for v in s.split(",")],
                        help="calibration seeds to run (with --table: to show)")
    parser.add_argument("--pruners", default="magnitude,wanda,sparsegpt", type=lambda s: s.split(","))
    parser.add_argument("--sparsities", default="0.3,0.5,0.7", type=lambda s: [float(v) for v in s.split(",")])
    parser.add_argument("--allocators", default=",".join(ALL), type=lambda s: s.split(","))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=32_768)
    parser.add_argument("--max-evals", type=int, default=40)
    parser.add_argument("--table", action="store_true", help="print the tables from --out and exit")
    args = parser.parse_args()
    unknown = sorted(set(args.allocators) - set(ALL))
    if unknown:
        parser.error(f"unknown allocators {unknown}; choose from {ALL}")
    table(args) if args.table else run(args)


if __name__ == "__main__":
    main()
