"""Recipes: the whole pipeline as data (YAML), carried out by ``cwca-export run RECIPE``.

A recipe names a model, calibration text, a scoring method, a plan (program, target, rule,
optional refinement), a compression method, and optionally an export budget and a held-out
evaluation. It is validated whole before any step runs (docs/design.md 6.5):

- types: pydantic models with ``extra="forbid"`` and strict types (a bool is not an int, a list
  is not a number); the JSON Schema shipped as ``cwca_export/schemas/recipe.schema.json`` is
  generated from the same models;
- names: the model folder and data files exist, the scoring method, compression method and
  export backend are registered (their options too), the hardware profile exists.

Every error is one line with the key path, what is allowed and a fix written as a
``--set key.path=VALUE`` flag. Relative paths are relative to the recipe file; ``@assets/...``
names a file shipped inside the package (``@assets/demo-llama``, ``@assets/text/train.txt``).
The output folder appears complete or not at all; scores are cached by model fingerprint, data
hash and scorer settings, so a recipe that changes only the plan does not re-score.

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

import difflib
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cwca_export.defaults import EXPORT_SIGNIFICANCE

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "recipe.schema.json"
ASSETS = Path(__file__).resolve().parent / "assets"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ScoreStep(_Strict):
    """How blocks are scored (``cwca-export score``)."""

    method: str = Field("fisher", description="a registered scoring method", examples=["gradnorm"])
    options: dict[str, Any] = Field(default_factory=dict, description="the method's options",
                                    examples=[{"pruner": "wanda"}])
    debias: bool = Field(False, description="subtract the noise floor (fisher, gradnorm)", examples=[True])


class PlanStep(_Strict):
    """Which program is solved, for what target, and whether it is refined on whole plans."""

    program: Literal["prune", "allocate"] = Field("prune", examples=["prune"])
    sparsity: float | None = Field(None, ge=0, le=1, description="prune: global sparsity", examples=[0.5])
    budget_fraction: float | None = Field(None, gt=0, le=1, description="allocate: fraction of block"
                                          " Linear weights kept", examples=[0.6])
    rank_step: int = Field(8, ge=1, description="allocate: rank of one plan unit", examples=[8])
    rule: Literal["auto", "cwca", "damage", "band"] = Field("auto", description="prune: planning rule",
                                                            examples=["damage"])
    kappa: float = Field(1.0, gt=0, description="prune, rule cwca: quality exponent", examples=[0.5])
    band: float | None = Field(None, ge=0, le=1, description="keep every block within S +- band",
                               examples=[0.1])
    lo: float = Field(0.0, ge=0, le=1, description="lower bound of every block", examples=[0.0])
    hi: float = Field(0.95, ge=0, le=1, description="upper bound of every block", examples=[0.9])
    refine: bool = Field(False, description="correct the plan on measured whole-plan losses", examples=[True])
    max_evals: int = Field(40, ge=2, description="refine: whole-plan measurements allowed", examples=[40])

    @model_validator(mode="after")
    def _one_target(self) -> PlanStep:
        if self.program == "prune" and (self.sparsity is None or self.budget_fraction is not None):
            raise ValueError("program prune takes sparsity (not budget_fraction); fix: --set plan.sparsity=0.5")
        if self.program == "allocate" and (self.budget_fraction is None or self.sparsity is not None):
            raise ValueError(
                "program allocate takes budget_fraction (not sparsity); fix: --set plan.budget_fraction=0.6"
            )
        if self.program == "allocate" and self.rule == "band":
            raise ValueError("rule band is a pruning rule; fix: --set plan.rule=auto")
        if self.lo > self.hi:
            raise ValueError(f"lo {self.lo:g} > hi {self.hi:g}; fix: --set plan.lo=0")
        return self


class CompressStep(_Strict):
    """How the plan is applied (``cwca-export compress``)."""

    method: str = Field("wanda", description="a registered compression method", examples=["wanda"])
    options: dict[str, Any] = Field(default_factory=dict, description="the method's options",
                                    examples=[{"nm": "2:4"}])


class ExportStep(_Strict):
    """ONNX export under an optional budget (``cwca-export export``)."""

    backend: str = Field("optimum", description="a registered export backend", examples=["onnx"])
    quantize: Literal["int8", "int4"] | None = Field(None, examples=["int8"])
    hardware: str | None = Field(None, description="a hardware profile name or YAML path",
                                 examples=["cpu-2core-24gb"])
    max_memory: str | int | None = Field(None, description="bytes, or a size such as 300MiB",
                                         examples=["300MiB"])
    max_disk: str | int | None = Field(None, description="the artifact's bytes on disk alone, as --max-disk",
                                       examples=["200MiB"])
    max_latency_ms: Annotated[float, Field(gt=0)] | Literal["int8"] | None = Field(
        None, description="p50 ms per decoded token, or int8: no slower than the model's plain dynamic int8 export",
        examples=[20.0, "int8"])
    max_prefill_ms: Annotated[float, Field(gt=0)] | None = Field(
        None, description="p50 ms for the prefill of the measured prompt, as --max-prefill-ms", examples=[200.0])
    ep: Literal["cpu", "cuda"] | None = Field(None, examples=["cpu"])
    significance: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        EXPORT_SIGNIFICANCE, description="a budget search keeps a plain int8 / int4 storage unless a per-layer or"
        " structured candidate beats it by this many standard errors, as --significance", examples=[2.0])

    @field_validator("max_memory", "max_disk")
    @classmethod
    def _size(cls, value: str | int | None) -> str | int | None:
        if value is not None:
            from cwca_export.budget import parse_size

            if isinstance(value, bool) or parse_size(value) <= 0:
                raise ValueError("expected a positive size such as 300MiB")
        return value


class EvalStep(_Strict):
    """Held-out perplexity of the result (``cwca-export eval``)."""

    data: str = Field(description="held-out text (.txt or .jsonl)", examples=["heldout.txt"])
    seq_len: int = Field(256, ge=2, examples=[256])
    max_tokens: int | None = Field(None, ge=2, examples=[16384])


class Recipe(_Strict):
    """A whole recipe; after :meth:`load` / :meth:`from_dict` its paths are absolute."""

    model: str = Field(description="model folder (config.json + safetensors)", examples=["./my-llama"])
    data: str = Field(description="calibration text (.txt, .jsonl, or a folder saved by datasets' save_to_disk)",
                      examples=["calib.txt"])
    samples: int = Field(32, ge=1, description="calibration sequences", examples=[32])
    seq_len: int = Field(128, ge=2, description="tokens per calibration sequence", examples=[128])
    seed: int = Field(0, ge=0, examples=[0])
    score: ScoreStep = Field(default_factory=ScoreStep)
    plan: PlanStep
    compress: CompressStep
    export: ExportStep | None = None
    eval: EvalStep | None = None
    source: str = Field("", exclude=True, description="where the recipe was read from (not a recipe key)")

    @classmethod
    def load(cls, path: str | os.PathLike, *, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
        """Read, override (``key.path=VALUE`` strings, as ``--set`` takes them) and check a recipe."""
        path = Path(path)
        try:
            body = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}); pass a UTF-8 YAML recipe") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        for item in overrides:
            body = apply_override(body, item, source=str(path))
        return cls.from_dict(body, base=path.parent, source=str(path))

    @classmethod
    def from_dict(cls, body: Any, *, base: Path = Path("."), source: str = "recipe", check_names: bool = True
                  ) -> Recipe:
        """Validate a parsed recipe: types, then (``check_names``) every name it uses."""
        if not isinstance(body, dict):
            raise ValueError(f"{source}: a recipe is a mapping of keys (model, data, score, plan, compress, ...)")
        if "source" in body:
            raise ValueError(f"{source}: source: unknown key; allowed: {', '.join(_keys(cls))}")
        try:
            recipe = cls.model_validate(body)
        except ValidationError as exc:
            raise ValueError(_one_line(exc, source)) from None
        recipe = recipe.model_copy(update={
            "source": source,
            "model": _resolve(base, recipe.model),
            "data": _resolve(base, recipe.data),
            "eval": None if recipe.eval is None else recipe.eval.model_copy(
                update={"data": _resolve(base, recipe.eval.data)}),
            "export": None if recipe.export is None else recipe.export.model_copy(
                update={"hardware": _resolve_profile(base, recipe.export.hardware)}),
        })
        if check_names:
            recipe.check_names()
        return recipe

    def check_names(self) -> None:
        """Every file, registry name and option the recipe uses exists: before any step runs."""
        where = self.source or "recipe"
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"{where}: model: {self.model} is not a local model folder (no config.json);"
                             " fix: --set model=PATH_TO_MODEL_DIR")
        if not Path(self.data).exists():
            raise ValueError(f"{where}: data: {self.data} does not exist; fix: --set data=PATH_TO_CALIB.txt")
        if self.eval is not None and not Path(self.eval.data).is_file():
            raise ValueError(f"{where}: eval.data: {self.eval.data} is not a file;"
                             " fix: --set eval.data=PATH_TO_HELDOUT.txt")
        from cwca_export.compression.registry import METHODS
        from cwca_export.scoring.registry import ESTIMATORS

        estimator = ESTIMATORS.get(self.score.method, None)
        if estimator is None:
            raise ValueError(f"{where}: score.method: {self.score.method!r} is not a scoring method; allowed:"
                             f" {', '.join(sorted(ESTIMATORS))}; fix: --set score.method=gradnorm")
        _check_options(where, "score.options", self.score.options, estimator.options)
        method = METHODS.get(self.compress.method, None)
        if method is None:
            raise ValueError(f"{where}: compress.method: {self.compress.method!r} is not a compression method;"
                             f" allowed: {', '.join(sorted(METHODS))}; fix: --set compress.method=wanda")
        if method.program != self.plan.program:
            fitting = sorted(n for n, m in METHODS.items() if m.program == self.plan.program)
            raise ValueError(f"{where}: compress.method: {self.compress.method!r} applies {method.program} plans,"
                             f" plan.program is {self.plan.program}; allowed: {', '.join(fitting)};"
                             f" fix: --set compress.method={fitting[0]}")
        options = {k: v for k, v in self.compress.options.items() if k != "rank_step"}
        _check_options(where, "compress.options", options, method.options)
        step = self.compress.options.get("rank_step", self.plan.rank_step)
        if self.plan.program == "allocate" and step != self.plan.rank_step:  # it would scale every planned rank
            raise ValueError(f"{where}: compress.options.rank_step: {step!r}, and the plan's units are solved for"
                             f" plan.rank_step {self.plan.rank_step}; fix: --set compress.options.rank_step="
                             f"{self.plan.rank_step}, or --set plan.rank_step={step!r} to plan for it")
        if self.export is not None:
            from cwca_export.backends import available_backends
            from cwca_export.budget import PROFILE_DIR, available_profiles

            backends = available_backends()
            if self.export.backend not in backends:
                raise ValueError(f"{where}: export.backend: {self.export.backend!r} is not registered; allowed:"
                                 f" {', '.join(backends)}; fix: --set export.backend=optimum")
            hardware = self.export.hardware
            known = hardware is None or Path(hardware).is_file() or (PROFILE_DIR / f"{hardware}.yaml").is_file()
            if not known:
                raise ValueError(f"{where}: export.hardware: no profile {hardware!r}; allowed:"
                                 f" {', '.join(available_profiles())} or a YAML path;"
                                 " fix: --set export.hardware=cpu-2core-24gb")
            if hardware is not None:  # its contents too, before any step runs
                from cwca_export.budget import load_profile

                try:
                    load_profile(hardware)
                except ValueError as exc:
                    raise ValueError(f"{where}: export.hardware: {str(exc).removesuffix(' (--hardware)')};"
                                     " fix: --set export.hardware=cpu-2core-24gb") from None

    def describe(self) -> list[str]:
        """The validated steps, one line each (``run --dry-run``)."""
        p = self.plan
        target = f"sparsity {p.sparsity:g}" if p.program == "prune" else (
            f"budget_fraction {p.budget_fraction:g}, rank_step {p.rank_step}")
        lines = [
            f"recipe {self.source or '(in memory)'}: valid",
            f"model {self.model}",
            f"data {self.data}: {self.samples} x {self.seq_len} tokens, seed {self.seed}",
            f"[score] {self.score.method} {json.dumps(self.score.options)}" + (" debias" if self.score.debias else ""),
            f"[plan] {p.program}, {target}, rule {p.rule}, bounds [{p.lo:g}, {p.hi:g}]"
            + (f", band {p.band:g}" if p.band is not None else "")
            + (f", refined within {p.max_evals} forwards" if p.refine else ""),
            f"[compress] {self.compress.method} {json.dumps(self.compress.options)}",
        ]
        if self.export is not None:
            e = self.export
            limits = ", ".join(f"{k} {v}" for k, v in (("hardware", e.hardware), ("max_memory", e.max_memory),
                               ("max_disk", e.max_disk), ("max_latency_ms", e.max_latency_ms),
                               ("max_prefill_ms", e.max_prefill_ms), ("ep", e.ep)) if v is not None)
            lines.append(f"[export] {e.backend}, {e.quantize or 'no quantization'}" + (f", {limits}" if limits else ""))
        if self.eval is not None:
            lines.append(f"[eval] {self.eval.data}, windows of {self.eval.seq_len}"
                         + (f", first {self.eval.max_tokens} tokens" if self.eval.max_tokens else ""))
        return lines


def json_schema() -> dict[str, Any]:
    """The recipe's JSON Schema, generated from the pydantic models (shipped as SCHEMA_PATH)."""
    schema = Recipe.model_json_schema()
    schema["properties"].pop("source", None)
    schema["title"] = "cwca-export recipe"
    return schema


def write_schema(path: str | os.PathLike = SCHEMA_PATH) -> Path:
    """Regenerate the shipped schema file (run after changing the recipe models).

    ``python -c 'from cwca_export.recipe import write_schema; write_schema()'``
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def apply_override(body: Any, item: str, *, source: str = "recipe") -> dict[str, Any]:
    """Set ``key.path=VALUE`` (VALUE parsed as YAML) in a recipe mapping; returns the new mapping.

    Example:
        >>> apply_override({"plan": {"sparsity": 0.5}}, "plan.sparsity=0.7")
        {'plan': {'sparsity': 0.7}}
        >>> apply_override({}, "export.quantize=int8")
        {'export': {'quantize': 'int8'}}
    """
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ValueError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set plan.sparsity=0.6")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ValueError(f"--set {item!r}: the value is not valid YAML; quote it, e.g. --set {key}='...'") from None
    if not isinstance(body, dict):
        raise ValueError(f"{source}: a recipe is a mapping of keys (model, data, score, plan, compress, ...)")
    result = dict(body)
    node = result
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
        elif not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ValueError(f"--set {item!r}: {where} is a {type(child).__name__}, not a mapping")
        node[part] = child = dict(child)
        node = child
    node[parts[-1]] = value
    return result


def _keys(model: type[BaseModel]) -> list[str]:
    return [name for name in model.model_fields if name != "source"]


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that holds the key at ``loc`` (for listing the keys allowed there)."""
    model: Any = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            continue  # union / tagged branches pydantic adds to loc
        annotation = field.annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)
                      and issubclass(a, BaseModel)]
        if not candidates:
            return None
        model = candidates[0]
    return model


def _example(loc: tuple) -> str:
    model = _model_at(loc)
    field = model.model_fields.get(loc[-1]) if model is not None and isinstance(loc[-1], str) else None
    examples = getattr(field, "examples", None) or ["VALUE"]
    value = examples[0]
    return value if isinstance(value, str) else json.dumps(value)


def _one_line(exc: ValidationError, source: str) -> str:
    """The first validation error as one line: key path, what is allowed, and a --set fix."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = tuple(p for p in err["loc"] if isinstance(p, str))
    # keys only: pydantic adds union branches to loc ("str", "constrained-float", "literal['int8']")
    loc = tuple(p for p in loc if p.isidentifier() and p not in ("str", "int", "float", "bool", "dict"))
    path = ".".join(loc) or "(top level)"
    kind = err["type"]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if kind == "extra_forbidden":
        model = _model_at(loc)
        keys = _keys(model) if model is not None else []
        close = difflib.get_close_matches(loc[-1], keys, n=1)
        fix = f"; fix: --set {'.'.join((*loc[:-1], close[0]))}={_example((*loc[:-1], close[0]))}" if close else ""
        allowed = ", ".join(keys) or "see recipes/README.md"
        return f"{source}: {path}: unknown key; allowed here: {allowed}{fix}{more}"
    if kind == "missing":
        return f"{source}: {path}: missing required key; fix: --set {path}={_example(loc)}{more}"
    if kind == "value_error":
        return f"{source}: {path}: {err['msg'].removeprefix('Value error, ')}{more}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        model = _model_at((*loc, "_"))
        keys = _keys(model) if model is not None else []
        mapping = f"{{{keys[0]}: {_example((*loc, keys[0]))}}}" if keys else "{}"
        return (
            f"{source}: {path}: must be a mapping, got {type(err['input']).__name__} {err['input']!r};"
            f" fix: --set '{path}={mapping}'{more}"
        )
    got = err.get("input")
    got_text = f"{got!r} ({type(got).__name__})" if not isinstance(got, dict) else "a mapping"
    return f"{source}: {path}: {err['msg']}, got {got_text}; fix: --set {path}={_example(loc)}{more}"


def _check_options(where: str, path: str, given: dict[str, Any], accepted: dict[str, Any]) -> None:
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        allowed = ", ".join(sorted(accepted)) or "none"
        raise ValueError(f"{where}: {path}: unknown option(s) {', '.join(unknown)}; allowed: {allowed}")


def _resolve_profile(base: Path, value: str | None) -> str | None:
    """A hardware profile: a shipped name as it is, a YAML path relative to the recipe."""
    from cwca_export.budget import PROFILE_DIR

    if value is None or (PROFILE_DIR / f"{value}.yaml").is_file():
        return value
    path = _resolve(base, value)
    return path if Path(path).is_file() else value  # neither: refused by its name (check_names)


def _resolve(base: Path, value: str) -> str:
    """A path relative to the recipe; ``@assets/...`` names the files shipped in the package."""
    if value.startswith("@assets/"):
        return str(ASSETS / value.removeprefix("@assets/"))
    return str((base / value).resolve())


# ---------------------------------------------------------------- score cache


def default_cache_dir() -> Path:
    """``$CWCA_CACHE_DIR``, else ``$XDG_CACHE_HOME/cwca-export``, else ``~/.cache/cwca-export``."""
    if os.environ.get("CWCA_CACHE_DIR"):
        return Path(os.environ["CWCA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cwca-export"


def score_cache_key(fingerprint: str, data_hash: str, recipe: Recipe) -> str:
    """sha256 of what determines a scores file: model fingerprint, data hash, scorer settings."""
    settings = {
        "fingerprint": fingerprint,
        "data_hash": data_hash,
        "method": recipe.score.method,
        "options": recipe.score.options,
        "debias": recipe.score.debias,
        "samples": recipe.samples,
        "seq_len": recipe.seq_len,
        "seed": recipe.seed,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _check_inputs(recipe: Recipe, out_dir: str | os.PathLike, *, overwrite: bool, trust_remote_code: bool,
                  allow_pickle: bool) -> None:
    """Refuse an output that is not ours to replace and a model folder the tool does not accept."""
    from cwca_export.loading import check_model_folder
    from cwca_export.outputs import check_output

    check_output(out_dir, overwrite=overwrite, flag="--out", inputs=[
        ("model", recipe.model), ("data", recipe.data),
        ("recipe", recipe.source if recipe.source and Path(recipe.source).is_file() else None),
        ("eval data", recipe.eval.data if recipe.eval is not None else None),
    ])
    where = Path(recipe.source).name if recipe.source else "recipe"
    lengths = {f"{where} seq_len": recipe.seq_len}
    if recipe.eval is not None:
        lengths[f"{where} eval.seq_len"] = recipe.eval.seq_len
    check_model_folder(recipe.model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, lengths=lengths)
    if recipe.export is not None:  # a model type the backend cannot take: before the scoring, not after
        from cwca_export.backends import check_config

        check_config(recipe.export.backend, recipe.model, trust_remote_code=trust_remote_code)


def _scores(recipe: Recipe, model: Any, calib: Any, cache_dir: str | os.PathLike | None,
            echo: Callable[[str], None]) -> Any:
    """The recipe's scores: from ``cache_dir`` when a run with the same key made them, else scored (and cached)."""
    from cwca_export import scoring
    from cwca_export.blocks import model_fingerprint
    from cwca_export.scores import LayerScores

    cached = None
    if cache_dir is not None:
        key = score_cache_key(model_fingerprint(model), calib.data_hash, recipe)
        cached = Path(cache_dir) / "scores" / f"{key}.json"
    if cached is not None and cached.is_file():
        echo(f"[score] cached: {cached}")
        return LayerScores.load(cached)
    scores = scoring.score(model, calib, method=recipe.score.method, options=recipe.score.options,
                           debias=recipe.score.debias, progress=False)
    if cached is not None:
        scores.save(cached)
    return scores


def run_recipe(
    recipe: Recipe,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
    cache_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Carry out ``recipe`` into ``out_dir``; returns the run summary (also ``run.json``).

    The model folder passes :func:`~cwca_export.loading.check_model_folder` (remote code and
    pickle only when allowed, a causal LM, lengths within its positions) before anything runs.

    The folder is built beside ``out_dir`` and renamed into place only when every step has
    succeeded (an export that misses its budget fails the run and leaves nothing). With
    ``cache_dir``, scores are read from and written to ``cache_dir/scores/<key>.json``, the
    key being :func:`score_cache_key`: a recipe that changes only the plan does not re-score.
    """
    from cwca_export.atomic import Staging
    from cwca_export.compression import compress, save_compressed
    from cwca_export.loading import load_model

    _check_inputs(recipe, out_dir, overwrite=overwrite, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    timings: dict[str, float] = {}
    with Staging(out_dir, overwrite=overwrite) as staging:
        work = staging.new_folder()
        began = time.perf_counter()
        echo(f"[score] {recipe.score.method} on {recipe.samples} x {recipe.seq_len} tokens of {recipe.data}")
        model, tokenizer = load_model(recipe.model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        model.eval()
        calib = _calibration(recipe, tokenizer)
        scores = _scores(recipe, model, calib, cache_dir, echo)
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
        # data-free methods ignore data
        compressed = compress(model, plan, method=recipe.compress.method, data=calib, progress=True, **options)
        save_compressed(compressed, work / "compressed", tokenizer=tokenizer)
        timings["compress"] = round(time.perf_counter() - began, 1)

        summary: dict[str, Any] = {"recipe": recipe.source, "timings_s": timings}
        if recipe.export is not None:
            began = time.perf_counter()
            try:
                artifact = _export(recipe.export, compressed, plan, tokenizer, work / "artifact", echo, calib)
            except ValueError as exc:  # the budget search's messages name export's flags
                from cwca_export.exporter.search import BudgetError

                least = exc.least if isinstance(exc, BudgetError) else None
                message = as_recipe_keys(str(exc), recipe, least)
                raise (ValueError(message) if least is None else BudgetError(message, least)) from None
            summary["artifact"] = {"disk_bytes": artifact.disk_bytes, "resident_bytes": artifact.resident_bytes,
                                   "latency_ms": artifact.latency_ms}
            timings["export"] = round(time.perf_counter() - began, 1)
        if recipe.eval is not None:
            from cwca_export.evaluate import evaluate

            began = time.perf_counter()
            echo(f"[eval] held-out perplexity on {recipe.eval.data}")
            target = work / ("artifact" if recipe.export is not None else "compressed")
            summary["eval"] = evaluate(str(target), recipe.eval.data, seq_len=recipe.eval.seq_len,
                                       max_tokens=recipe.eval.max_tokens, progress=True)
            timings["eval"] = round(time.perf_counter() - began, 1)
        if recipe.source and Path(recipe.source).is_file():
            shutil.copyfile(recipe.source, work / "recipe.yaml")
        (work / "run.json").write_text(json.dumps(summary, indent=2, default=str))
        from cwca_export.report import build_report

        build_report(work)
        final = staging.commit(work)
    echo(f"[done] {final}")
    return summary


def _calibration(recipe: Recipe, tokenizer: Any) -> Any:
    """The recipe's calibration samples; too little text is refused with the recipe's keys."""
    from cwca_export.data import ShortCalibrationError, calibration_data

    try:
        return calibration_data(recipe.data, tokenizer, num_samples=recipe.samples, seq_len=recipe.seq_len,
                                seed=recipe.seed)
    except ShortCalibrationError as exc:
        fix = (f"--set samples={exc.windows}" if exc.windows >= 1
               else f"--set samples=1 --set seq_len={max(2, exc.tokens)}")
        raise exc.with_hint(f"add text to data, or lower samples or seq_len; fix: {fix}") from None


#: export's flags as a recipe spells them: the export step's errors come from export's code
RECIPE_KEYS = {
    "--max-memory": "export.max_memory", "--max-disk": "export.max_disk", "--max-latency-ms": "export.max_latency_ms",
    "--max-prefill-ms": "export.max_prefill_ms", "--hardware": "export.hardware", "--ep": "export.ep",
    "--quantize": "export.quantize", "--backend": "export.backend",
    "--data": "data", "--samples": "samples", "--seq-len": "seq_len",
}
_FLAG = re.compile(r"--[a-z][a-z-]*")


def as_recipe_keys(message: str, recipe: Recipe, least: dict[str, float] | None = None) -> str:
    """An export-step error as a recipe spells it: export's flags as the recipe's keys, and a
    budget search's miss (``least``: :attr:`cwca_export.exporter.search.BudgetError.least`) as
    fixes a recipe can make, written as ``--set`` flags.

    Example:
        >>> r = Recipe.from_dict({"model": "m", "data": "d.txt", "plan": {"sparsity": 0.5},
        ...     "compress": {"method": "width"}, "export": {"max_disk": "1KiB"}}, check_names=False)
        >>> print(as_recipe_keys("no setting meets the budget; hint: a larger --max-disk", r, {"memory": 1536})[29:])
        fix: --set export.max_disk=2KiB, or compress more before the export: --set plan.sparsity=0.6
    """
    from cwca_export.budget import format_size, parse_size

    def keys(text: str) -> str:
        return _FLAG.sub(lambda m: RECIPE_KEYS.get(m.group(), m.group()), text)

    body, _, hint = message.partition("; hint: ")
    body = keys(body.replace("--formats ", "the formats "))  # the search's own formats: no recipe key
    step = recipe.export
    if step is None or not least:
        return f"{body}; hint: {keys(hint)}" if hint else body
    limits = [k for k in ("max_memory", "max_disk", "max_latency_ms", "max_prefill_ms") if getattr(step, k) is not None]
    limits = limits or ["max_memory"]  # the hardware profile's memory
    fixes = []
    for key in limits:
        kind = "memory" if key in ("max_memory", "max_disk") else key
        if kind not in least:
            continue
        given = getattr(step, key)
        if kind == "memory":
            if given is not None and least["memory"] <= parse_size(given):
                continue  # not the limit that was missed
            number, unit = format_size(least["memory"]).split()
            value = f"{math.ceil(float(number))}{unit}"  # rounded up in its unit
        else:
            if isinstance(given, float) and least[kind] <= given:
                continue
            value = f"{least[kind]:.3g}"  # as the message states it
        fixes.append(f"--set export.{key}={value}")
    fix = " ".join(fixes) or f"--set export.{limits[0]}=VALUE"
    return f"{body}; fix: {fix}, or {_structure_fix(recipe)}"


def _structure_fix(recipe: Recipe) -> str:
    """How a recipe compresses more before its export (its export step searches no structure)."""
    from cwca_export.compression.registry import get_method

    p = recipe.plan
    if get_method(recipe.compress.method).dense_storage:
        return (f"shrink the structure before the export: --set compress.method=width (ONNX Runtime stores"
                f" {recipe.compress.method}'s zeros dense)")
    if p.program == "prune":
        target = max(p.sparsity, min(0.95, round(p.sparsity + 0.1, 2)))
        bound = f" --set plan.hi={min(0.99, target + 0.04):g}" if target > p.hi - 0.04 else ""  # room above it
        return f"compress more before the export: --set plan.sparsity={target:g}{bound}"
    return ("compress more before the export: --set"
            f" plan.budget_fraction={max(0.05, round(p.budget_fraction - 0.1, 2)):g}")


def _plan(recipe: Recipe, model, scores, calib):
    p = recipe.plan
    if p.program == "allocate":
        from cwca_export.planning.rank_plans import plan_ranks_from_damage
        from cwca_export.planning.refine import refine_ranks

        if p.refine:
            return refine_ranks(model, scores, p.budget_fraction, calib, method=recipe.compress.method,
                                rank_step=p.rank_step, max_evals=p.max_evals, lo=p.lo, hi=p.hi)
        return plan_ranks_from_damage(scores, p.budget_fraction, shapes=model, rank_step=p.rank_step, lo=p.lo, hi=p.hi)
    if p.refine:
        from cwca_export.planning.refine import refine_plan

        return refine_plan(model, scores, p.sparsity, calib, method=recipe.compress.method,
                           max_evals=p.max_evals, lo=p.lo, hi=p.hi, band=p.band)
    from cwca_export.planning.plan import plan_by_rule

    return plan_by_rule(scores, p.sparsity, rule=p.rule, band=p.band, lo=p.lo, hi=p.hi, kappa=p.kappa)


def _export(step: ExportStep, model, plan, tokenizer, out: Path, echo, calib):
    """The export step; a budget search prices its candidates on the recipe's calibration data
    (``calib``), not the shipped text it would fall back to."""
    from cwca_export.budget import Budget, latency_limit, parse_size
    from cwca_export.exporter.api import export

    limits = {"max_memory": parse_size(step.max_memory) if step.max_memory is not None else None,
              "max_disk": parse_size(step.max_disk) if step.max_disk is not None else None,
              **latency_limit(step.max_latency_ms), "max_prefill_ms": step.max_prefill_ms, "ep": step.ep}
    limits = {k: v for k, v in limits.items() if v is not None}
    budget = Budget.from_profile(step.hardware, **limits) if step.hardware else Budget(**limits)
    echo(f"[export] {step.backend}, {step.quantize or 'fp32'}, verified and measured")
    return export(model, plan, out, backend=step.backend, quantize=step.quantize, budget=budget,
                  tokenizer=tokenizer, calibration=calib,
                  search_options={"significance": step.significance} if budget.has_limits else None)
