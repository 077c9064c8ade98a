"""Recipes: the whole pipeline as data (YAML), carried out by ``cwca-export run RECIPE``.

A recipe names a model, calibration text, a scoring method, a plan (program, target, rule,
optional refinement), a compression method, and optionally an export budget and a held-out
evaluation. Loading is strict: an unknown key, a missing required key or a wrong type is a
one-line error naming it. Relative paths are relative to the recipe file; ``@assets/...``
names a file shipped inside the package (``@assets/demo-llama``, ``@assets/text/train.txt``).
The output folder appears complete or not at all.

Example recipe::

    model: ./my-llama
    data: calib.txt
    samples: 32
    seq_len: 128
    score: {method: damage, options: {pruner: wanda}}
    plan: {program: prune, sparsity: 0.5, refine: true, max_evals: 40}
    compress: {method: wanda}
    export: {backend: optimum, quantize: int8, max_memory: 300MiB}
    eval: {data: heldout.txt, max_tokens: 16384}
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class ScoreStep:
    method: str = "fisher"
    options: dict[str, Any] = field(default_factory=dict)
    debias: bool = False


@dataclass(frozen=True)
class PlanStep:
    program: str = "prune"
    sparsity: float | None = None  # prune
    budget_fraction: float | None = None  # allocate: fraction of block Linear weights kept
    rank_step: int = 8
    rule: str = "auto"  # prune: auto | cwca | damage | band
    kappa: float = 1.0
    band: float | None = None
    lo: float = 0.0
    hi: float = 0.95
    refine: bool = False  # measured whole-plan refinement (cwca_export.refine)
    max_evals: int = 40


@dataclass(frozen=True)
class CompressStep:
    method: str = "wanda"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportStep:
    backend: str = "optimum"
    quantize: str | None = None
    hardware: str | None = None
    max_memory: str | int | None = None
    max_latency_ms: float | None = None
    ep: str | None = None


@dataclass(frozen=True)
class EvalStep:
    data: str
    seq_len: int = 256
    max_tokens: int | None = None


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe; paths are absolute."""

    model: str
    data: str
    score: ScoreStep
    plan: PlanStep
    compress: CompressStep
    samples: int = 32
    seq_len: int = 128
    seed: int = 0
    export: ExportStep | None = None
    eval: EvalStep | None = None
    source: str = ""

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        """Read and check a recipe file (strict: unknown keys are errors)."""
        path = Path(path)
        try:
            body = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}); pass a UTF-8 YAML recipe") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        return cls.from_dict(body, base=path.parent, source=str(path))

    @classmethod
    def from_dict(cls, body: Any, *, base: Path = Path("."), source: str = "recipe") -> Recipe:
        if not isinstance(body, dict):
            raise ValueError(f"{source}: a recipe is a mapping of keys (model, data, score, plan, compress, ...)")
        steps = {"score": ScoreStep, "plan": PlanStep, "compress": CompressStep, "export": ExportStep, "eval": EvalStep}
        top = {f.name for f in fields(cls)} - {"source"}
        _unknown(body, top, source)
        for key in ("model", "data", "plan", "compress"):
            if key not in body:
                raise ValueError(f"{source}: missing required key {key!r}")
        kwargs: dict[str, Any] = {}
        for key, value in body.items():
            if key in steps:
                if value is None and key in ("export", "eval"):
                    continue
                if not isinstance(value, dict):
                    raise ValueError(f"{source}: {key!r} must be a mapping, got {type(value).__name__}")
                _unknown(value, {f.name for f in fields(steps[key])}, f"{source}: {key}")
                try:
                    kwargs[key] = steps[key](**value)
                except TypeError as exc:
                    raise ValueError(f"{source}: {key}: {exc}") from None
            else:
                kwargs[key] = value
        kwargs.setdefault("score", ScoreStep())
        kwargs["model"] = _resolve(base, kwargs["model"])
        kwargs["data"] = _resolve(base, kwargs["data"])
        if "eval" in kwargs:
            kwargs["eval"] = EvalStep(_resolve(base, kwargs["eval"].data), kwargs["eval"].seq_len, kwargs["eval"].max_tokens)
        recipe = cls(source=source, **kwargs)
        recipe._check(source)
        return recipe

    def _check(self, source: str) -> None:
        plan = self.plan
        if plan.program == "prune":
            if plan.sparsity is None or plan.budget_fraction is not None:
                raise ValueError(f"{source}: plan: program prune takes sparsity (not budget_fraction)")
        elif plan.program == "allocate":
            if plan.budget_fraction is None or plan.sparsity is not None:
                raise ValueError(f"{source}: plan: program allocate takes budget_fraction (not sparsity)")
        else:
            raise ValueError(f"{source}: plan: program {plan.program!r}; choose prune or allocate")
        for name in ("samples", "seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{source}: {name} must be a positive integer")
        if not Path(self.data).is_file():
            raise ValueError(f"{source}: data {self.data} is not a file")


def _unknown(body: dict, known: set[str], where: str) -> None:
    extra = sorted(set(body) - known)
    if extra:
        raise ValueError(f"{where}: unknown key(s) {extra}; known: {sorted(known)}")


def _resolve(base: Path, value: Any) -> str:
    """A path relative to the recipe; ``@assets/...`` names the files shipped in the package."""
    if not isinstance(value, str):
        raise ValueError(f"expected a path or model id, got {value!r}")
    if value.startswith("@assets/"):
        return str(Path(__file__).resolve().parent / "assets" / value.removeprefix("@assets/"))
    candidate = base / value
    return str(candidate.resolve()) if candidate.exists() or value.startswith(".") else value


def run_recipe(
    recipe: Recipe,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Carry out ``recipe`` into ``out_dir``; returns the run summary (also ``run.json``).

    The model folder passes :func:`~cwca_export.loading.check_model_folder` (remote code and
    pickle only when allowed, a causal LM, lengths within its positions) before anything runs.

    The folder is built beside ``out_dir`` and renamed into place only when every step has
    succeeded (an export that misses its budget fails the run and leaves nothing).
    """
    from cwca_export.compression import compress, save_compressed
    from cwca_export.data import calibration_data
    from cwca_export.exporter._atomic import Staging
    from cwca_export.loading import check_model_folder, load_model
    from cwca_export.scoring import score

    where = Path(recipe.source).name if recipe.source else "recipe"
    lengths = {f"{where} seq_len": recipe.seq_len}
    if recipe.eval is not None:
        lengths[f"{where} eval.seq_len"] = recipe.eval.seq_len
    check_model_folder(recipe.model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, lengths=lengths)
    timings: dict[str, float] = {}
    with Staging(out_dir, overwrite=overwrite) as staging:
        work = staging.new_folder()
        began = time.perf_counter()
        echo(f"[score] {recipe.score.method} on {recipe.samples} x {recipe.seq_len} tokens of {recipe.data}")
        model, tokenizer = load_model(recipe.model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        model.eval()
        calib = calibration_data(recipe.data, tokenizer, num_samples=recipe.samples, seq_len=recipe.seq_len,
                                 seed=recipe.seed)
        scores = score(model, calib, method=recipe.score.method, options=recipe.score.options,
                       debias=recipe.score.debias, progress=False)
        scores.save(work / "scores.json")
        timings["score"] = round(time.perf_counter() - began, 1)

        began = time.perf_counter()
        plan = _plan(recipe, model, scores, calib)
        plan.save(work / "plan.json")
        echo(f"[plan] {plan.program}: " + " ".join(f"{x:.3g}" for x in plan.x))
        timings["plan"] = round(time.perf_counter() - began, 1)

        began = time.perf_counter()
        echo(f"[compress] {recipe.compress.method}")
        options = dict(recipe.compress.options)
        if plan.program == "allocate":
            options.setdefault("rank_step", recipe.plan.rank_step)
        compressed = compress(model, plan, method=recipe.compress.method, data=calib, **options)  # data-free methods ignore it
        save_compressed(compressed, work / "compressed", tokenizer=tokenizer)
        timings["compress"] = round(time.perf_counter() - began, 1)

        summary: dict[str, Any] = {"recipe": recipe.source, "timings_s": timings}
        if recipe.export is not None:
            began = time.perf_counter()
            artifact = _export(recipe.export, compressed, plan, tokenizer, work / "artifact", echo)
            summary["artifact"] = {"disk_bytes": artifact.disk_bytes, "resident_bytes": artifact.resident_bytes,
                                   "latency_ms": artifact.latency_ms}
            timings["export"] = round(time.perf_counter() - began, 1)
        if recipe.eval is not None:
            from cwca_export.evaluate import evaluate

            began = time.perf_counter()
            echo(f"[eval] held-out perplexity on {recipe.eval.data}")
            target = work / ("artifact" if recipe.export is not None else "compressed")
            summary["eval"] = evaluate(str(target), recipe.eval.data, seq_len=recipe.eval.seq_len,
                                       max_tokens=recipe.eval.max_tokens)
            timings["eval"] = round(time.perf_counter() - began, 1)
        if recipe.source and Path(recipe.source).is_file():
            shutil.copyfile(recipe.source, work / "recipe.yaml")
        (work / "run.json").write_text(json.dumps(summary, indent=2, default=str))
        from cwca_export.report import build_report

        build_report(work)
        final = staging.commit(work)
    echo(f"[done] {final}")
    return summary


def _plan(recipe: Recipe, model, scores, calib):
    p = recipe.plan
    if p.program == "allocate":
        from cwca_export.rank_plans import plan_ranks_from_damage
        from cwca_export.refine import refine_ranks

        if p.refine:
            return refine_ranks(model, scores, p.budget_fraction, calib, method=recipe.compress.method,
                                rank_step=p.rank_step, max_evals=p.max_evals, lo=p.lo, hi=p.hi)
        return plan_ranks_from_damage(scores, p.budget_fraction, shapes=model, rank_step=p.rank_step, lo=p.lo, hi=p.hi)
    if p.refine:
        from cwca_export.refine import refine_plan

        return refine_plan(model, scores, p.sparsity, calib, method=recipe.compress.method,
                           max_evals=p.max_evals, lo=p.lo, hi=p.hi, band=p.band)
    from cwca_export.plan import plan_by_rule

    return plan_by_rule(scores, p.sparsity, rule=p.rule, band=p.band, lo=p.lo, hi=p.hi, kappa=p.kappa)


def _export(step: ExportStep, model, plan, tokenizer, out: Path, echo):
    from cwca_export.budget import Budget, parse_size
    from cwca_export.exporter.api import export

    limits = {"max_memory": parse_size(step.max_memory) if step.max_memory is not None else None,
              "max_latency_ms": step.max_latency_ms, "ep": step.ep}
    limits = {k: v for k, v in limits.items() if v is not None}
    budget = Budget.from_profile(step.hardware, **limits) if step.hardware else Budget(**limits)
    echo(f"[export] {step.backend}, {step.quantize or 'fp32'}, verified and measured")
    return export(model, plan, out, backend=step.backend, quantize=step.quantize, budget=budget,
                  tokenizer=tokenizer)
