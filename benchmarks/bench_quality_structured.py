"""Structured plan quality on the shipped demo model: matched-bytes width / low rank, and transfer.

Two sections (``--section``), rows to one JSON Lines file each (``--out``; a rerun skips rows
already there), tables with ``--table``. Same demo model, calibration draw (32 x 128 tokens
of ``assets/text/train.txt``, seed 0) and held-out protocol (windows of 256) as
``bench_quality.py``.

``structured``: every allocator gets the same artifact size, 0.5x and 0.7x of the dense fp32
artifact. "Artifact bytes" are the ONNX graph bytes (``model.onnx`` + external data; the
tokenizer and config files, the same for every artifact, are reported in ``disk_bytes`` but
not matched). Per allocator the plan's own global knob is searched against the exact byte
prediction of :mod:`cwca_export.exporter.predict` (weights from the shapes the plan gives:
``kept_width`` per block for width, ``rank = units * rank_step`` per Linear, dense where
factors would not shrink it; plus the graph overhead calibrated on the dense export), taking
the largest predicted size not above the target. Then the plan is applied to a copy
(``compress``, layer by layer, train calibration), exported (fp32, no quantization, verified
against torch), and measured: graph bytes (against the prediction), torch held-out
perplexity (``heldout.txt``, 16,384 tokens) and the export's own ORT latency (prefill of 32
tokens, decode at context 128, batch 1, CPU, one intra-op thread, p50 of ``--runs``).

- width (``method="width"``, MLP channels only, ``multiple=8``, per-block cap hi = 0.95):
  embeddings (tied, 14% of the weights) and attention (21%) stay, so the MLP has to lose
  ~78% of its channels for 0.5x; that is reachable under the 0.95 cap, so heads stay whole
  (``heads=False``). Allocators: ``uniform`` (rho_k = S), ``cwca-gradnorm`` / ``cwca-fisher``
  (:func:`plan_pruning`, eta 2, kappa 1, psi rho^2), ``damage`` (:func:`plan_from_damage`,
  piecewise, on measured single-block damage of the ``width`` pruner at 0.3,0.5,0.7,0.8,0.9),
  ``owl`` (:func:`plan_band`, lambda = 0.08, OWL outlier ratio M = 5).
- low rank (``method="asvd"``, ``rank_step=8``, allocation plans, units in [1, 17]; rank
  136 = 17 units is the last at which the MLP factors still shrink): ``uniform`` (every block
  floor(B / K) units, the remainder to evenly spaced blocks), ``cwca-gradnorm`` /
  ``cwca-fisher`` (:func:`plan_allocation`, gamma 0.9, beta 2, **alpha 0**: with the default
  alpha 0.5 the tiny per-block values gamma q^2 are below the unit penalty and the program
  spends nothing, so the budget would not bind), ``damage`` on measured single-block damage
  of ``asvd`` at rank fraction removed 0.5,0.7,0.8: ``plan_ranks_from_damage`` (each block's
  own curve against its exact kept weights, units up to full rank; knob: the fraction of
  block weights kept) when ``cwca_export.planning.rank_plans`` (or ``cwca_export.planning.plan``) has it,
  else :func:`plan_allocation` with zeta2 = damage@0.7 (knob: the unit budget).

``transfer``: the two domains of the corpus (PROVENANCE.md): ``library`` (the library
reference) and ``guides`` (tutorial, howto, faq, reference, ...). Each domain's held-out file
is split by tokens: the first 16,384 tokens are its evaluation text, 32 x 128 calibration
windows (+ 8 held-out windows for the scorers) are drawn from the rest, so calibration and
evaluation never overlap. Scores (gradnorm, fisher, and measured ``damage`` with the
``wanda`` pruner at 0.3,0.5,0.7,0.9, zeta2 = damage@0.5) are computed on each domain;
pruning plans at S = 0.5 and 0.7 (:func:`plan_pruning`, the same program for every score)
are solved on each. Per (scores, S, source -> target): the predicted regret is
``solver.transfer_regret(q_source, q_target, program="prune", n=..., target=S)`` (delta =
||q_S - q_T||, regret in the program's objective, ratio = regret / delta^2); the measured
regret is the target-domain held-out perplexity of the source plan minus that of the target
plan, both applied with ``wanda`` calibrated on the target domain (also as a loss difference
in nats per token).

Usage:
    python benchmarks/bench_quality_structured.py --section structured --out bqs_structured.jsonl
    python benchmarks/bench_quality_structured.py --section transfer --out bqs_transfer.jsonl
    python benchmarks/bench_quality_structured.py --section structured --out bqs_structured.jsonl \
        --table
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

SCORE_METHODS = {"fisher": {}, "gradnorm": {}, "owl": {"owl_threshold": 5.0}}
WIDTH_ALLOCATORS = ["uniform", "cwca-gradnorm", "cwca-fisher", "damage", "owl"]
RANK_ALLOCATORS = ["uniform", "cwca-gradnorm", "cwca-fisher", "damage"]
WIDTH_POINTS, WIDTH_AT = "0.3,0.5,0.7,0.8,0.9", 0.5
RANK_POINTS, RANK_AT = "0.5,0.7,0.8", 0.7
WANDA_POINTS, WANDA_AT = "0.3,0.5,0.7,0.9", 0.5
WIDTH_HI, WIDTH_MULTIPLE = 0.95, 8
RANK_STEP, UNITS_LO, UNITS_HI = 8, 1, 17
ALLOC_KW = {"gamma": 0.9, "beta": 2.0, "alpha": 0.0}
DOMAINS = ("library", "guides")


def _text(name: str) -> Path:
    from cwca_export.demo import TRAIN_TEXT

    return TRAIN_TEXT.parent / name


class Context:
    """Model, tokenizer, calibration, held-out ids and score caches."""

    def __init__(self, seed: int, samples: int, seq_len: int, eval_tokens: int) -> None:
        import torch

        from cwca_export.data import calibration_data, load_texts
        from cwca_export.demo import DEMO_MODEL, HELDOUT_TEXT, TRAIN_TEXT
        from cwca_export.evaluate import tokenize_text
        from cwca_export.loading import load_model

        torch.manual_seed(seed)
        self.seed, self.samples, self.seq_len = seed, samples, seq_len
        self.model, self.tokenizer = load_model(DEMO_MODEL)
        self.model.eval()
        self.calib = calibration_data(
            TRAIN_TEXT,
            self.tokenizer,
            num_samples=samples,
            seq_len=seq_len,
            seed=seed,
            held_out=max(1, samples // 4),
        )
        self.heldout_ids = tokenize_text(self.tokenizer, "\n\n".join(load_texts(HELDOUT_TEXT)))
        self.eval_tokens = eval_tokens
        self.cache: dict[tuple, object] = {}
        self.cost: dict[str, float] = {}

    def score(
        self,
        method: str,
        calib=None,
        tag: str = "train",
        options: dict | None = None,
        label: str | None = None,
    ):
        """Scores of ``method`` on ``calib`` (default: the train calibration), cached by label."""
        from cwca_export.scoring import score

        label = label or method
        key = (tag, label)
        if key not in self.cache:
            began = time.perf_counter()
            opts = SCORE_METHODS.get(method, {}) if options is None else options
            self.cache[key] = score(
                self.model,
                self.calib if calib is None else calib,
                method=method,
                options=opts,
                progress=False,
                batch_size=8 if method == "damage" else 1,
            )
            self.cost[f"{tag}/{label}"] = round(time.perf_counter() - began, 1)
        return self.cache[key]

    def damage(self, pruner: str, points: str, at: float, calib=None, tag: str = "train"):
        return self.score(
            "damage", calib, tag, {"pruner": pruner, "points": points, "at": at}, f"damage-{pruner}"
        )

    def perplexity(self, model, ids=None) -> float:
        from cwca_export.evaluate import perplexity_from_logits, torch_logits_fn

        ids = self.heldout_ids if ids is None else ids
        return perplexity_from_logits(
            torch_logits_fn(model), ids, seq_len=256, max_tokens=self.eval_tokens
        ).perplexity


# ------------------------------------------------------------------ bytes from plan shapes


class Shapes:
    """Exact fp32 weight bytes of the demo model after a width or rank plan, from shapes only."""

    def __init__(self, model) -> None:
        from cwca_export.blocks import find_blocks, weight_out_in
        from cwca_export.compression import width
        from cwca_export.exporter.predict import weight_bytes

        self.dense = weight_bytes(model, "fp32")
        blocks = find_blocks(model)
        first = blocks[0].module
        self.layout = width.mlp_layout(first)
        self.d_ff = self.layout.width(first)
        hidden = self.layout.down_weight(first).shape[0]
        self.mlp_per_channel = (len(self.layout.up) + 1) * hidden  # gate, up rows + down column
        self.linears = [
            [tuple(weight_out_in(lin).shape) for lin in b.linears.values()] for b in blocks
        ]
        self._kept_width = width.kept_width

    def width_bytes(self, rho) -> int:
        removed = sum(
            self.d_ff - self._kept_width(self.d_ff, float(r), WIDTH_MULTIPLE) for r in rho
        )
        return self.dense - 4 * removed * self.mlp_per_channel

    def rank_bytes(self, units) -> int:
        from cwca_export.compression.lowrank import shrinks

        total = self.dense
        for shapes, u in zip(self.linears, units, strict=True):
            r = int(round(u)) * RANK_STEP
            for m, n in shapes:
                if shrinks(m, n, r):
                    total -= 4 * (m * n - r * (m + n))
        return total


# ------------------------------------------------------------------ plans at matched bytes


def _width_plan(ctx: Context, allocator: str, s: float):
    from cwca_export.planning.plan import plan_band, plan_from_damage, plan_pruning

    if allocator == "uniform":
        return plan_band(ctx.score("gradnorm"), s, width=0.0, hi=WIDTH_HI)
    if allocator == "owl":
        return plan_band(ctx.score("owl"), s, width=0.08, hi=WIDTH_HI)
    if allocator.startswith("cwca-"):
        return plan_pruning(ctx.score(allocator.split("-")[1]), s, hi=WIDTH_HI)
    if allocator == "damage":
        return plan_from_damage(ctx.damage("width", WIDTH_POINTS, WIDTH_AT), s, hi=WIDTH_HI)
    raise ValueError(allocator)


def _uniform_units(k: int, budget: int) -> list[float]:
    base, extra = divmod(budget, k)
    units = [float(base)] * k
    for i in np.unique(np.floor((np.arange(extra) + 0.5) * k / extra).astype(int)) if extra else []:
        units[int(i)] += 1.0
    return units


def _rank_plan(ctx: Context, allocator: str, budget: int):
    from cwca_export.planning.plan import Plan, plan_allocation, plan_band

    k = ctx.model.config.num_hidden_layers
    bounds = {"lo": UNITS_LO, "hi": UNITS_HI, "integer": True}
    if allocator == "uniform":
        base = plan_band(ctx.score("gradnorm"), 0.0, width=0.0)  # only for its block metadata
        units = _uniform_units(k, budget)
        return Plan(
            "allocate",
            x=units,
            q=[1.0 / k] * k,
            n_params=base.n_params,
            lo=[UNITS_LO] * k,
            hi=[UNITS_HI] * k,
            block_names=base.block_names,
            cost=[1.0] * k,
            parameters={"budget": budget, "rule": "uniform", "rank_step": RANK_STEP},
            model=base.model,
        )
    if allocator.startswith("cwca-"):
        plan = plan_allocation(ctx.score(allocator.split("-")[1]), budget, **ALLOC_KW, **bounds)
    elif allocator == "damage":
        plan = plan_allocation(
            ctx.damage("asvd", RANK_POINTS, RANK_AT), budget, **ALLOC_KW, **bounds
        )
    else:
        raise ValueError(allocator)
    plan.parameters["rank_step"] = RANK_STEP
    return plan


def _ranks_from_damage():
    """``plan_ranks_from_damage`` from ``cwca_export.planning.rank_plans`` (or ``.plan``), if present."""
    import importlib

    for module in ("cwca_export.planning.rank_plans", "cwca_export.planning.plan"):
        try:
            found = getattr(importlib.import_module(module), "plan_ranks_from_damage", None)
        except ImportError:
            continue
        if found is not None:
            return found
    return None


def _matched_ranks_from_damage(ctx: Context, shapes: Shapes, target_weights: int):
    """Measured-damage ranks (one knob: the fraction of block weights kept), bisected on bytes."""
    solve = _ranks_from_damage()
    scores = ctx.damage("asvd", RANK_POINTS, RANK_AT)

    def make(fraction: float):
        plan = solve(scores, fraction, shapes=ctx.model, rank_step=RANK_STEP)
        return plan

    lo, hi = 0.0, 1.0  # bytes grow with the fraction kept
    best = None
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        try:
            plan = make(mid)
        except ValueError:  # below the smallest reachable fraction
            lo = mid
            continue
        if shapes.rank_bytes(plan.x) <= target_weights:
            lo, best = mid, plan
        else:
            hi = mid
    if best is None:
        return make(hi), {"reachable": False, "knob": round(hi, 6), "knob_name": "kept"}
    return best, {"reachable": True, "knob": round(lo, 6), "knob_name": "kept"}


def matched_plan(ctx: Context, shapes: Shapes, method: str, allocator: str, target_weights: int):
    """The plan whose predicted weight bytes are the largest not above ``target_weights``."""
    if method == "width":
        lo, hi = 0.0, WIDTH_HI  # bytes fall as S grows; lo fits never (unless target >= dense)
        best = _width_plan(ctx, allocator, hi)
        if shapes.width_bytes(best.x) > target_weights:
            return best, {"reachable": False, "knob": hi, "knob_name": "S"}
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            plan = _width_plan(ctx, allocator, mid)
            if shapes.width_bytes(plan.x) <= target_weights:
                hi, best = mid, plan
            else:
                lo = mid
        return best, {"reachable": True, "knob": round(hi, 6), "knob_name": "S"}
    if allocator == "damage" and _ranks_from_damage() is not None:
        return _matched_ranks_from_damage(ctx, shapes, target_weights)
    k = ctx.model.config.num_hidden_layers
    best, knob = None, None
    for budget in range(UNITS_LO * k, UNITS_HI * k + 1):
        plan = _rank_plan(ctx, allocator, budget)
        if shapes.rank_bytes(plan.x) <= target_weights:
            best, knob = plan, budget
        else:
            break  # bytes never fall as the budget grows
    if best is None:
        return _rank_plan(ctx, allocator, UNITS_LO * k), {
            "reachable": False,
            "knob": UNITS_LO * k,
            "knob_name": "units",
        }
    return best, {"reachable": True, "knob": knob, "knob_name": "units"}


def _export(model, tokenizer, folder: Path, args):
    from cwca_export.budget import Budget
    from cwca_export.exporter.api import export

    art = export(
        model,
        None,
        folder,
        backend=args.backend,
        tokenizer=tokenizer,
        overwrite=True,
        budget=Budget(prompt_len=32, context=128),
        runs=args.runs,
        threads=args.threads,
    )
    lat = art.latency_ms
    return {
        "graph_bytes": art.manifest["prediction"]["graph_bytes"],
        "disk_bytes": art.disk_bytes,
        "resident_bytes": art.resident_bytes,
        "prefill_ms_p50": lat["prefill"]["p50"],
        "decode_ms_p50": lat["decode"]["p50"],
        "rel_rms": art.parity["rel_rms"],
    }


def run_structured(args) -> None:
    from cwca_export.compression import compress
    from cwca_export.exporter.predict import SizePredictor

    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {(r["method"], r["ratio"], r["allocator"]) for r in rows}
    ctx = Context(args.seed, args.samples, args.seq_len, args.eval_tokens)
    shapes = Shapes(ctx.model)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bqs-") as tmp:
        dense_row = next((r for r in rows if r["method"] == "dense"), None)
        if dense_row is None:
            measured = _export(ctx.model, ctx.tokenizer, Path(tmp) / "dense", args)
            dense_row = {
                "method": "dense",
                "ratio": 1.0,
                "allocator": "-",
                "perplexity": ctx.perplexity(ctx.model),
                "predicted_bytes": measured["graph_bytes"],
                "weight_bytes": shapes.dense,
                **measured,
            }
            with out.open("a") as fh:
                fh.write(json.dumps(dense_row) + "\n")
            print(
                f"dense: {dense_row['graph_bytes']:,} bytes, ppl {dense_row['perplexity']:.3f}",
                flush=True,
            )
        predictor = SizePredictor.calibrate(ctx.model, dense_row["graph_bytes"], "fp32")
        for method in args.methods:
            allocators = WIDTH_ALLOCATORS if method == "width" else RANK_ALLOCATORS
            for ratio in args.ratios:
                target = int(ratio * dense_row["graph_bytes"])
                for allocator in allocators:
                    if allocator not in args.allocators or (method, ratio, allocator) in done:
                        continue
                    t0 = time.perf_counter()
                    plan, knob = matched_plan(
                        ctx, shapes, method, allocator, target - predictor.overhead
                    )
                    t1 = time.perf_counter()
                    options = (
                        {"multiple": WIDTH_MULTIPLE}
                        if method == "width"
                        else {"rank_step": RANK_STEP}
                    )
                    model = compress(
                        copy.deepcopy(ctx.model),
                        plan,
                        method=method,
                        data=ctx.calib,
                        check_fingerprint=False,
                        **options,
                    )
                    t2 = time.perf_counter()
                    predicted = predictor.predict(model)
                    planned = predictor.overhead + (
                        shapes.width_bytes(plan.x)
                        if method == "width"
                        else shapes.rank_bytes(plan.x)
                    )
                    measured = _export(
                        model, ctx.tokenizer, Path(tmp) / f"{method}-{ratio}-{allocator}", args
                    )
                    t3 = time.perf_counter()
                    row = {
                        "method": method,
                        "ratio": ratio,
                        "allocator": allocator,
                        "target_bytes": target,
                        "predicted_bytes": predicted,
                        "planned_bytes": planned,
                        **knob,
                        **measured,
                        "bytes_ratio": measured["graph_bytes"] / dense_row["graph_bytes"],
                        "perplexity": ctx.perplexity(model),
                        "dense": dense_row["perplexity"],
                        "x": [round(v, 4) for v in plan.x],
                        "rule": plan.parameters.get("rule"),
                        "seconds": {
                            "plan": round(t1 - t0, 1),
                            "compress": round(t2 - t1, 1),
                            "export": round(t3 - t2, 1),
                            "eval": round(time.perf_counter() - t3, 1),
                        },
                    }
                    with out.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    print(
                        f"{method:5s} {ratio:.1f}x {allocator:14s} bytes {row['bytes_ratio']:.4f}x"
                        f" (pred {predicted:,} / meas {measured['graph_bytes']:,})"
                        f" ppl {row['perplexity']:.3f}"
                        f" decode {measured['decode_ms_p50']:.3f} ms",
                        flush=True,
                    )
    _write_meta(out, ctx, time.perf_counter() - began)


# ------------------------------------------------------------------ transfer


class Domain:
    def __init__(self, ctx: Context, name: str) -> None:
        from cwca_export.data import calibration_data, load_texts
        from cwca_export.evaluate import tokenize_text

        ids = tokenize_text(ctx.tokenizer, "\n\n".join(load_texts(_text(f"heldout-{name}.txt"))))
        self.name = name
        self.eval_ids = ids[: ctx.eval_tokens]
        rest = ids[ctx.eval_tokens :]
        self.calib = calibration_data(
            [rest.tolist()],
            num_samples=ctx.samples,
            seq_len=ctx.seq_len,
            seed=ctx.seed,
            held_out=max(1, ctx.samples // 4),
        )
        self.tokens = int(ids.size)


def _transfer_scores(ctx: Context, dom: Domain, method: str):
    if method == "damage":
        return ctx.damage("wanda", WANDA_POINTS, WANDA_AT, dom.calib, dom.name)
    return ctx.score(method, dom.calib, dom.name)


def run_transfer(args) -> None:
    from cwca_export.compression import compress
    from cwca_export.planning.plan import plan_band, plan_pruning
    from cwca_export.planning.solver import transfer_regret

    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {(r["scores"], r["sparsity"], r["source"], r["target"]) for r in rows}
    ctx = Context(args.seed, args.samples, args.seq_len, args.eval_tokens)
    began = time.perf_counter()
    domains = {d: Domain(ctx, d) for d in DOMAINS}
    ppl_cache: dict[tuple, float] = {}

    def measured(plan, key: tuple, target: Domain) -> float:
        if key not in ppl_cache:
            model = compress(
                copy.deepcopy(ctx.model),
                plan,
                method="wanda",
                data=target.calib,
                check_fingerprint=False,
            )
            ppl_cache[key] = ctx.perplexity(model, target.eval_ids)
        return ppl_cache[key]

    dense = {d: ctx.perplexity(ctx.model, dom.eval_ids) for d, dom in domains.items()}
    for method in args.transfer_scores:
        for s in args.sparsities:
            for src, tgt in ((DOMAINS[0], DOMAINS[1]), (DOMAINS[1], DOMAINS[0])):
                if (method, s, src, tgt) in done:
                    continue
                t0 = time.perf_counter()
                sc_src = _transfer_scores(ctx, domains[src], method)
                sc_tgt = _transfer_scores(ctx, domains[tgt], method)
                p_src, p_tgt = plan_pruning(sc_src, s), plan_pruning(sc_tgt, s)
                pred = transfer_regret(
                    p_src.q, p_tgt.q, program="prune", n=sc_src.n_params, target=s
                )
                uniform = plan_band(sc_tgt, s, width=0.0)
                ppl_src = measured(p_src, (method, s, src, tgt), domains[tgt])
                ppl_tgt = measured(p_tgt, (method, s, tgt, tgt), domains[tgt])
                ppl_uni = measured(uniform, ("uniform", s, tgt), domains[tgt])
                row = {
                    "scores": method,
                    "sparsity": s,
                    "source": src,
                    "target": tgt,
                    "delta": pred.delta,
                    "delta2": pred.delta**2,
                    "regret_pred": pred.regret,
                    "ratio_pred": pred.ratio,
                    "plan_l1": float(np.mean(np.abs(np.asarray(p_src.x) - np.asarray(p_tgt.x)))),
                    "ppl_source_plan": ppl_src,
                    "ppl_target_plan": ppl_tgt,
                    "ppl_uniform": ppl_uni,
                    "ppl_dense": dense[tgt],
                    "regret_ppl": ppl_src - ppl_tgt,
                    "regret_nats": math.log(ppl_src) - math.log(ppl_tgt),
                    "x_source": [round(v, 4) for v in p_src.x],
                    "x_target": [round(v, 4) for v in p_tgt.x],
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                row["measured_over_delta2"] = (
                    row["regret_nats"] / row["delta2"] if row["delta2"] > 0 else None
                )
                with out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(
                    f"{method:8s} S={s:.1f} {src}->{tgt}: delta^2 {row['delta2']:.2e} pred regret"
                    f" {pred.regret:.2e} (ratio {pred.ratio:.2f});"
                    f" measured dppl {row['regret_ppl']:+.3f}"
                    f" ({row['regret_nats']:+.4f} nats)",
                    flush=True,
                )
    extra = {
        "domains": {
            d: {
                "tokens": dom.tokens,
                "eval_tokens": int(dom.eval_ids.size),
                "calib_hash": dom.calib.data_hash,
            }
            for d, dom in domains.items()
        },
        "dense": dense,
    }
    _write_meta(out, ctx, time.perf_counter() - began, extra)


def _write_meta(out: Path, ctx: Context, seconds: float, extra: dict | None = None) -> None:
    from cwca_export.versions import library_versions

    meta = out.with_suffix(".meta.json")
    previous = json.loads(meta.read_text()) if meta.exists() else {}
    runs = previous.get("runs", [])
    runs.append({"seconds": round(seconds, 1), "score_seconds": ctx.cost, **(extra or {})})
    meta.write_text(json.dumps({"versions": library_versions(), "runs": runs}, indent=1))


# ------------------------------------------------------------------ tables


def _mib(b: float) -> str:
    return f"{b / 2**20:.2f}"


def table_structured(rows: list[dict]) -> None:
    dense = next(r for r in rows if r["method"] == "dense")
    print(
        f"dense fp32: graph {_mib(dense['graph_bytes'])} MiB, perplexity {dense['perplexity']:.2f},"
        f" prefill p50 {dense['prefill_ms_p50']:.2f} ms,"
        f" decode p50 {dense['decode_ms_p50']:.3f} ms\n"
    )
    print(
        "| method | target | allocator | graph MiB (x dense) | predicted MiB"
        " | held-out ppl (vs uniform) | prefill p50 ms | decode p50 ms | knob"
        " | per-block rho / units (min-max) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {(r["method"], r["ratio"]): r["perplexity"] for r in rows if r["allocator"] == "uniform"}
    order = {a: i for i, a in enumerate(WIDTH_ALLOCATORS)}
    body = sorted(
        (r for r in rows if r["method"] != "dense"),
        key=lambda r: (r["method"] != "width", -r["ratio"], order[r["allocator"]]),
    )
    for r in body:
        ref = base.get((r["method"], r["ratio"]))
        rel = (
            f" ({100 * (r['perplexity'] / ref - 1):+.1f}%)"
            if ref and r["allocator"] != "uniform"
            else ""
        )
        if r["method"] == "width":
            knob = f"S={r['knob']:.3f}"
        elif r.get("knob_name") == "kept":
            knob = f"kept {r['knob']:.3f} of block weights"
        else:
            knob = f"B={r['knob']} units"
        knob += "" if r["reachable"] else " (unreachable)"
        x = np.asarray(r["x"])
        spread = (
            f"{x.min():.2f}-{x.max():.2f}"
            if r["method"] == "width"
            else f"{x.min():.0f}-{x.max():.0f}"
        )
        exact = (
            ""
            if r["predicted_bytes"] == r["graph_bytes"]
            else f" (off {r['graph_bytes'] - r['predicted_bytes']:+,} B)"
        )
        print(
            f"| {r['method']} | {r['ratio']:.1f}x | {r['allocator']}"
            f" | {_mib(r['graph_bytes'])} ({r['bytes_ratio']:.3f})"
            f" | {_mib(r['predicted_bytes'])}{exact} | {r['perplexity']:.2f}{rel}"
            f" | {r['prefill_ms_p50']:.2f}"
            f" | {r['decode_ms_p50']:.3f} | {knob} | {spread} |"
        )


def table_transfer(rows: list[dict]) -> None:
    print(
        "| scores | S | source -> target | delta | delta^2 | predicted regret"
        " | ratio regret/delta^2 | mean abs rho diff | ppl target plan | ppl source plan"
        " | ppl uniform | measured regret ppl (nats) | measured nats / delta^2 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["measured_over_delta2"]
        print(
            f"| {r['scores']} | {r['sparsity']:.1f} | {r['source']} -> {r['target']}"
            f" | {r['delta']:.4f} | {r['delta2']:.2e} | {r['regret_pred']:.2e}"
            f" | {r['ratio_pred']:.2f} | {r['plan_l1']:.4f}"
            f" | {r['ppl_target_plan']:.2f} | {r['ppl_source_plan']:.2f} | {r['ppl_uniform']:.2f}"
            f" | {r['regret_ppl']:+.3f} ({r['regret_nats']:+.4f})"
            f" | {'-' if m is None else f'{m:+.2f}'} |"
        )
    dense = {r["target"]: r["ppl_dense"] for r in rows}
    print(
        "\ndense held-out perplexity per target domain: "
        + ", ".join(f"{d} {v:.2f}" for d, v in dense.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=["structured", "transfer"], required=True)
    parser.add_argument(
        "--out", default=None, help="JSON Lines rows [default: bqs_<section>.jsonl]"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=16_384)
    parser.add_argument(
        "--ratios", default="0.7,0.5", type=lambda s: [float(v) for v in s.split(",")]
    )
    parser.add_argument("--methods", default="width,asvd", type=lambda s: s.split(","))
    parser.add_argument(
        "--allocators", default=",".join(WIDTH_ALLOCATORS), type=lambda s: s.split(",")
    )
    parser.add_argument("--backend", default="optimum", choices=["optimum", "onnx"])
    parser.add_argument("--runs", type=int, default=20, help="timed ORT runs per latency")
    parser.add_argument(
        "--threads", type=int, default=1, help="ORT intra-op threads (0: ORT's default)"
    )
    parser.add_argument(
        "--sparsities", default="0.5,0.7", type=lambda s: [float(v) for v in s.split(",")]
    )
    parser.add_argument(
        "--transfer-scores", default="gradnorm,fisher,damage", type=lambda s: s.split(",")
    )
    parser.add_argument("--table", action="store_true", help="print the table from --out and exit")
    args = parser.parse_args()
    args.out = args.out or f"bqs_{args.section}.jsonl"
    if args.table:
        rows = [json.loads(line) for line in Path(args.out).read_text().splitlines()]
        (table_structured if args.section == "structured" else table_transfer)(rows)
        return
    (run_structured if args.section == "structured" else run_transfer)(args)


if __name__ == "__main__":
    main()
