"""The tool's budget search against uniform structure plus the best single precision, at byte budgets.

On the shipped model, for each budget (a fraction of the dense fp32 graph's bytes, plus the
config and tokenizer files every artifact carries):
  search          - structure level of a measured-damage plan x per-layer precision (the
                    default `cwca-export export --plan P --method M --max-disk B`); the
                    structure (--structure) is a width plan narrowing MLP channels (`width`),
                    MLP channels and whole KV groups of attention heads (`width-heads`, the
                    width method with heads=True), or a rank plan (`lowrank`, `asvd`);
  uniform         - the same search held to a uniform plan of the same structure (every block
                    the same fraction) and uniform storage (one format for all blocks; embedding
                    and head in it or in fp32), the best by calibration loss;
  precision-only  - the search without a plan (per-layer precision alone), where it fits.
The three share the calibration tokens and the measured per-layer precision table. Each artifact:
disk bytes, resident memory, prefill / decode p50 (as the export measured them, one workload),
held-out perplexity with the eval protocol (all held-out tokens unless --max-tokens).

    python benchmarks/bench_budget_search.py --out benchmarks/results/bench_budget_search.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cwca_export.budget import Budget, latency_limit
from cwca_export.data import calibration_data
from cwca_export.defaults import EXPORT_SAMPLES, EXPORT_SEQ_LEN
from cwca_export.demo import DEMO_MODEL, HELDOUT_TEXT, TRAIN_TEXT
from cwca_export.evaluate import evaluate
from cwca_export.exporter import BudgetError
from cwca_export.exporter.api import export
from cwca_export.loading import load_model
from cwca_export.planning.damage import parse_points
from cwca_export.planning.plan import Plan, plan_by_rule
from cwca_export.planning.precision import default_formats, measure_precision_damage
from cwca_export.planning.rank_plans import linear_shapes, plan_ranks_from_damage, plan_ranks_uniform
from cwca_export.planning.refine import refine_ranks
from cwca_export.planning.rounding import clipper_for
from cwca_export.scores import LayerScores
from cwca_export.scoring import score
from cwca_export.versions import library_versions

BUDGETS = (0.30, 0.20, 0.15, 0.12, 0.10)
# structure -> (compression method, its options, damage scorer's pruner, export backend); blocks
# with their own head counts go through the plain torch.onnx backend (Optimum sizes every
# layer's KV cache from the config and refuses them)
STRUCTURES = {
    "width": ("width", {}, "width", "optimum"),
    "width-heads": ("width", {"heads": True}, "width", "onnx"),
    "lowrank": ("lowrank", {}, "lowrank", "optimum"),
    "asvd": ("asvd", {}, "asvd", "optimum"),
}


def structure_plans(structure: str, model, scores: LayerScores, *, refine: int = 0, calib=None) -> dict:
    """The measured-damage plan (search) and the uniform plan (uniform) of one structure.

    Width plans are sparsity plans (damage rule vs. a zero band, upper bound 0.9); rank plans
    keep a fraction of the weights (exact integer solve on the damage curves vs. every block the
    same rank fraction). The search moves either to each level by its own rule (plan_scaling).
    With ``refine`` (whole-plan forwards; rank structures), the search's plan is
    `cwca-export refine`'s (refine_ranks on ``calib``), which the search refines again at
    every level it prices.
    """
    if structure.startswith("width"):
        if refine:
            raise ValueError("--refine: width plans are refined with a pruner's loss; use a rank structure")
        return {"search": plan_by_rule(scores, 0.3, rule="damage", hi=0.9),
                "uniform": plan_by_rule(scores, 0.3, rule="band", band=0.0, hi=0.9)}
    shapes = linear_shapes(model)
    search = (refine_ranks(model, scores, 0.7, calib, method=STRUCTURES[structure][0], max_evals=refine)
              if refine else plan_ranks_from_damage(scores, 0.7, shapes=shapes))
    return {"search": search, "uniform": plan_ranks_uniform(scores, 0.7, shapes=shapes)}


def damage_scores(path: Path, model, calib, pruner: str, points: str) -> LayerScores:
    """Measured damage curves at ``points``, cached in ``path``: points a cached file lacks are
    probed and added to it (the same calibration, checked by its base loss, so the merged
    curves are the ones one run at all the points would give)."""
    wanted = parse_points(points)
    old = LayerScores.load(path) if path.exists() else None
    have = [] if old is None else [float(k.removeprefix("damage@")) for k in old.stats if k.startswith("damage@")]
    missing = [p for p in wanted if not any(abs(p - h) < 1e-6 for h in have)]
    if old is not None and not missing:
        return old
    new = score(model, calib, method="damage",
                options={"pruner": pruner, "points": ",".join(f"{p:g}" for p in missing),
                         "at": 0.4 if 0.4 in missing else missing[0]})
    if old is None:
        new.save(path)
        return new
    if old.settings.get("options", {}).get("pruner") != pruner or not torch.allclose(
            torch.tensor(old.stats["damage_base_loss"]), torch.tensor(new.stats["damage_base_loss"]), atol=1e-9):
        raise ValueError(f"{path}: measured with another pruner or calibration; delete it to re-measure")
    for key, values in new.stats.items():
        if key.startswith("damage@"):
            old.stats[key] = values
    old.settings["points"] = sorted(set(old.settings.get("points", [])) | set(missing))
    old.settings.setdefault("probe_time_s_added", []).append(new.settings.get("probe_time_s"))
    old.save(path)
    return old


def row(art, heldout_tokens: int | None, seconds: float) -> dict:
    m = art.manifest
    search = (m.get("budget") or {}).get("search") or {}
    chosen = search.get("chosen") or {}
    plan_params = (m.get("plan") or {}).get("parameters", {})
    ev = evaluate(str(art.path), str(HELDOUT_TEXT), max_tokens=heldout_tokens)
    return {
        "disk_bytes": m["disk_bytes"],
        "graph_bytes": sum(f["bytes"] for f in m["files"] if f["path"].startswith("model.onnx")),
        "resident_bytes": m["measurement"]["resident_bytes"],
        "prefill_p50_ms": m["measurement"]["latency_ms"]["prefill"]["p50"],
        "decode_p50_ms": m["measurement"]["latency_ms"]["decode"]["p50"],
        "perplexity": ev["perplexity"], "tokens": ev["tokens"],
        "structure_t": chosen.get("t"), "width_sparsity": chosen.get("target"),
        "storage": chosen.get("storage"), "formats": chosen.get("formats"),
        "calib_loss": chosen.get("calib_loss"),
        "side_by_side": chosen.get("side_by_side"), "latency_peer": search.get("latency_peer"),
        "candidates_priced": sum(1 for c in search.get("candidates", []) if c.get("calib_loss") is not None),
        "built": len(search.get("trials", [])),
        "search_seconds": round(seconds, 1),
        "plan_units": [b.get("units", b.get("x")) for b in (m.get("plan") or {}).get("blocks", [])],
        "plan_refinement": {k: v for k, v in (plan_params.get("refinement") or {}).items()
                            if k in ("start", "calib_loss_start", "calib_loss", "forwards", "moves", "wall_time_s")},
        "refined_levels": search.get("refined_levels"),
        "timings": search.get("timings"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/cwca-bench-budget-search"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_budget_search.json"))
    ap.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    ap.add_argument("--max-tokens", type=int, default=None, help="held-out tokens (default: all)")
    ap.add_argument("--samples", type=int, default=EXPORT_SAMPLES)
    ap.add_argument("--seq-len", type=int, default=EXPORT_SEQ_LEN)
    ap.add_argument("--rounding", choices=["clip", "rtn"], default="clip")
    ap.add_argument("--seed", type=int, default=0,
                    help="calibration sample seed (pricing, precision table, compression)")
    ap.add_argument("--kinds", default="search,uniform")
    ap.add_argument("--structure", choices=sorted(STRUCTURES), default="width",
                    help="structure knob of the plan (width: MLP channels; width-heads: and KV groups of heads;"
                         " lowrank / asvd: ranks)")
    ap.add_argument("--points", default="0.2,0.4,0.6,0.8",
                    help="damage probe points of the structure's curves (rank plans: fractions of rank removed;"
                         " points a cached scores file in --work lacks are probed and added to it)")
    ap.add_argument("--points-only", action="store_true",
                    help="plan on --points alone even when the cached scores hold more")
    ap.add_argument("--refine", type=int, default=0,
                    help="whole-plan forwards: the search's plan is refined (cwca-export refine) and the search"
                         " refines it again at each level it prices (rank structures; 0: not refined)")
    ap.add_argument("--uniform-budgets", default="0.15,0.12,0.1",
                    help="budgets at which the uniform baseline runs (below every peer's smallest artifact)")
    ap.add_argument("--latency-factor", type=float, default=1.5,
                    help="also a budget of 0.2x bytes and this many times the dense decode p50 (0: none)")
    ap.add_argument("--int8-latency", default="",
                    help="budgets (e.g. 0.3) that also get the decode limit `--max-latency-ms int8`: no slower than"
                         " plain int8 (the search builds it, takes its p50, confirms the winner beside it); the"
                         " int8 artifact is also built and evaluated here as a row")
    ap.add_argument("--runs", type=int, default=10, help="timed runs per latency measurement, every artifact")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads in every measurement")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, tok = load_model(DEMO_MODEL)
    calib = calibration_data(TRAIN_TEXT, tok, num_samples=args.samples, seq_len=args.seq_len, seed=args.seed)
    method, method_options, pruner, backend = STRUCTURES[args.structure]
    scores = damage_scores(args.work / f"damage-{pruner}.json", model, calib, pruner, args.points)
    if args.points_only:  # the curves only: points beyond the first ones (e.g. 0.85) are ignored
        keep = parse_points(args.points)
        scores.stats = {k: v for k, v in scores.stats.items()
                        if not k.startswith("damage@") or any(abs(float(k[7:]) - p) < 1e-6 for p in keep)}
    refined_path = args.work / f"plan-refined-{pruner}-{args.refine}-{len(parse_points(args.points))}.json"
    if args.refine and refined_path.exists():
        plans = {"search": Plan.load(refined_path),
                 "uniform": plan_ranks_uniform(scores, 0.7, shapes=linear_shapes(model))}
    else:
        plans = structure_plans(args.structure, model, scores, refine=args.refine, calib=calib)
        if args.refine:
            plans["search"].save(refined_path)
    began = time.perf_counter()
    transform = clipper_for(model, calib.input_ids) if args.rounding == "clip" else None
    formats = default_formats(model)
    if args.int8_latency:  # what a latency-limited search offers by default: 4-bit formats with int8 compute too
        formats += [f"{f}-a8" for f in formats if f.startswith("int4")]
    table = measure_precision_damage(model, calib.input_ids, formats, transform=transform)
    table_seconds = time.perf_counter() - began
    workload = {"prompt_len": 32, "context": 128}
    dense = export(model, None, args.work / "dense", tokenizer=tok, budget=Budget(**workload), overwrite=True,
                   runs=args.runs, threads=args.threads)
    dense_graph = sum(f["bytes"] for f in dense.manifest["files"] if f["path"].startswith("model.onnx"))
    side = dense.disk_bytes - dense_graph  # config and tokenizer files, the same in every artifact
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "torch_threads": torch.get_num_threads()},
               "versions": library_versions(), "settings": {k: str(v) for k, v in vars(args).items()},
               "precision_table_seconds": round(table_seconds, 1), "formats": table.formats,
               "dense": {"graph_bytes": dense_graph, **row(dense, args.max_tokens, 0.0)}, "budgets": {}}
    kinds = args.kinds.split(",")
    dense_decode = dense.latency_ms["decode"]["p50"]
    budgets = [(f"{float(b):g}", float(b), None) for b in args.budgets.split(",")]
    if args.latency_factor:
        budgets.append((f"0.2+latency{args.latency_factor:g}x", 0.2, args.latency_factor * dense_decode))
    if args.int8_latency:
        peer = export(model, None, args.work / "int8-peer", tokenizer=tok, budget=Budget(**workload),
                      quantize="int8", overwrite=True, runs=args.runs, threads=args.threads)
        results["int8_peer"] = row(peer, args.max_tokens, 0.0)
        budgets += [(f"{float(b):g}+int8-latency", float(b), "int8") for b in args.int8_latency.split(",")]
    for name, fraction, latency in budgets:
        limit = int(fraction * dense_graph) + side
        entry: dict = {"graph_budget_bytes": int(fraction * dense_graph), "max_disk": limit,
                       "max_latency_ms": latency}
        for kind in kinds:
            if kind == "uniform" and (latency is not None or name not in args.uniform_budgets.split(",")):
                continue
            plan = plans.get(kind)
            options = {"precision_damage": table, "per_layer": kind != "uniform"}
            began = time.perf_counter()
            try:
                art = export(model, plan, args.work / f"{name}-{kind}", tokenizer=tok,
                             method=method if plan is not None else None, backend=backend,
                             budget=Budget(max_disk=limit, **workload, **latency_limit(latency)),
                             compress_options={"data": calib, **method_options}, calibration=calib.input_ids,
                             overwrite=True, search_options=options, rounding=args.rounding, runs=args.runs,
                             threads=args.threads)
                entry[kind] = row(art, args.max_tokens, time.perf_counter() - began)
            except BudgetError as exc:
                entry[kind] = {"error": str(exc)[:400], "search_seconds": round(time.perf_counter() - began, 1)}
            print(f"{name} {kind}: {json.dumps(entry[kind])[:400]}", flush=True)
        results["budgets"][name] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
