"""Fitting a budget: the least compression whose measured artifact meets every limit.

Two knobs, searched in this order:

1. the storage ladder, least lossy first: the budget's dtype, then int8 (CPU only: ONNX
   Runtime has no CUDA kernels for dynamic int8), then int4 ``MatMulNBits``; a fixed
   ``quantize`` pins it to one rung;
2. within a rung, when a plan and a structured compression method are given, a global
   compression level t in [0, 1] (t = 0: the model as given; t = 1: the most the plan's
   bounds allow): the plan is re-solved for the global target at t and applied.

Per rung: the t = 0 artifact is built and measured; if it fails, the t = 1 artifact is; if
that fails too, the next rung. Otherwise t is bisected against the memory prediction (disk:
exact weight bytes from shapes plus the graph overhead measured at t = 0; resident: linear in
weight bytes through the two measured artifacts), and then against measured latency and
memory between that t and 1. The chosen artifact is always one that was measured to pass.
If none passes, :class:`BudgetError` states the smallest memory and latency measured.
"""

from __future__ import annotations

import dataclasses
import shutil
from typing import Any, Protocol

import numpy as np

from cwca_export.budget import Budget, format_size
from cwca_export.exporter.build import Candidate, ExportSettings, build_candidate
from cwca_export.exporter.postprocess import QuantizeConfig
from cwca_export.exporter.predict import SizePredictor, weight_bytes

_T_TOLERANCE = 1 / 64  # bisection resolution of the compression level
_MAX_MEASURED_STEPS = 3  # builds spent bisecting on measurement within one rung


class BudgetError(ValueError):
    """No setting meets the budget; the message states the smallest memory and latency measured."""


class Knob(Protocol):
    """A global compression level: ``make(t)`` returns the model (and plan) at t in [0, 1]."""

    name: str

    def make(self, t: float) -> tuple[Any, Any]: ...


class PlanKnob:
    """Re-solves ``plan`` for a global target and applies it with ``cwca_export.compress``.

    Pruning plans move the global sparsity from the plan's lower bounds (t = 0: the model as
    given) to its upper bounds (t = 1); allocation plans move the unit budget from the plan's
    own budget down to the lower bounds.
    """

    def __init__(self, model: Any, plan: Any, method: str, compress_options: dict[str, Any] | None = None) -> None:
        from cwca_export.exporter.api import apply_plan

        if plan is None:
            raise ValueError(f"method {method!r} needs a plan; hint: pass --plan plan.json")
        self.model, self.plan, self.method = model, plan, method
        self.compress_options = dict(compress_options or {})
        self._apply = apply_plan
        self.name = "global sparsity" if plan.program == "prune" else "unit budget"
        n = np.asarray(plan.n_params, dtype=np.float64)
        lo, hi = np.asarray(plan.lo), np.asarray(plan.hi)
        if plan.program == "prune":
            self.start, self.stop = float(n @ lo / n.sum()), float(n @ hi / n.sum())
        else:
            cost = np.asarray(plan.cost)
            self.start, self.stop = float(plan.parameters["budget"]), float(cost @ lo)

    def target(self, t: float) -> float:
        """The global target (sparsity or unit budget) at level t."""
        return self.start + t * (self.stop - self.start)

    def make(self, t: float) -> tuple[Any, Any]:
        from cwca_export import solver

        if t == 0:
            return self.model, None
        p = self.plan
        if p.program == "prune":
            kw = p.parameters
            result = solver.solve_pruning(
                p.q, p.n_params, self.target(t), eta=kw.get("eta", 2.0), kappa=kw.get("kappa", 1.0),
                lo=p.lo, hi=p.hi, psi=kw.get("psi", "quadratic"),
            )
            params = {**kw, "sparsity": self.target(t)}
        else:
            kw = p.parameters
            result = solver.solve_allocation(
                p.q, p.cost, self.target(t), gamma=kw.get("gamma", 0.9), beta=kw.get("beta", 2.0),
                alpha=kw.get("alpha", 0.5), lo=p.lo, hi=p.hi, integer=kw.get("integer", True),
            )
            params = {**kw, "budget": self.target(t)}
        plan_t = dataclasses.replace(
            p, x=[float(v) for v in result.x], parameters=params, dual=result.dual,
            objective=result.objective, iterations=result.iterations,
        )
        return self._apply(self.model, plan_t, self.method, **self.compress_options), plan_t


def storage_ladder(budget: Budget, fixed: QuantizeConfig | None) -> list[tuple[str, QuantizeConfig | None]]:
    """(dtype, quantization) rungs to try, least lossy first."""
    if fixed is not None:
        return [("fp32", fixed)]
    rungs: list[tuple[str, QuantizeConfig | None]] = [(budget.dtype, None)]
    if budget.ep == "cpu":
        rungs.append(("fp32", QuantizeConfig("int8")))
    rungs.append(("fp32", QuantizeConfig("int4")))
    return rungs


def _measured(c: Candidate) -> dict[str, Any]:
    latency = c.measurement["latency_ms"]
    return {
        "disk_bytes": c.disk_bytes,
        "resident_bytes": c.measurement["resident_bytes"],
        "decode_p50_ms": latency["decode"]["p50"],
        "prefill_p50_ms": latency["prefill"]["p50"],
    }


class _Search:
    def __init__(self, tokenizer: Any, budget: Budget, staging: Any, knob: Knob | None) -> None:
        self.tokenizer, self.budget, self.staging, self.knob = tokenizer, budget, staging, knob
        self.trials: list[dict[str, Any]] = []
        self.made: dict[int, tuple[dict[str, Any], Any]] = {}  # id(candidate) -> (trial, plan)

    def build(
        self, model: Any, plan: Any, settings: ExportSettings, t: float, predicted: dict[str, Any] | None = None
    ) -> tuple[Candidate, bool]:
        candidate = build_candidate(model, self.tokenizer, self.staging.new_folder(), settings)
        check = self.budget.check(
            candidate.disk_bytes, candidate.measurement["resident_bytes"], candidate.measurement["latency_ms"]
        )
        trial = {
            "dtype": settings.dtype,
            "quantize": None if settings.quantize is None else settings.quantize.method,
            "t": t,
            "target": None if not isinstance(self.knob, PlanKnob) else self.knob.target(t),
            "predicted": predicted,
            "measured": _measured(candidate),
            "met": check["met"],
        }
        self.trials.append(trial)
        self.made[id(candidate)] = (trial, plan)
        return candidate, check["met"]

    @staticmethod
    def discard(candidate: Candidate) -> None:
        shutil.rmtree(candidate.folder, ignore_errors=True)

    def rung(self, model: Any, settings: ExportSettings) -> Candidate | None:
        """The least compression passing on this storage rung, or None."""
        c0, ok = self.build(model, None, settings, 0.0)
        if ok:
            return c0
        if self.knob is None:
            self.discard(c0)
            return None
        model1, plan1 = self.knob.make(1.0)
        c1, ok = self.build(model1, plan1, settings, 1.0)
        if not ok:
            self.discard(c0)
            self.discard(c1)
            return None
        predicted_t, prediction = 0.5, None
        if self.budget.max_memory is not None:
            predicted_t, prediction = self._predict_t(c0, c1, settings)
        self.discard(c0)
        lo, hi, best = 0.0, 1.0, c1  # lo: measured to fail; hi: measured to pass (best)
        probe = predicted_t
        for _ in range(_MAX_MEASURED_STEPS):
            if hi - lo <= _T_TOLERANCE or not lo < probe < hi:
                break
            model_t, plan_t = self.knob.make(probe)
            from_prediction = prediction if probe == predicted_t else None
            candidate, ok = self.build(model_t, plan_t, settings, probe, from_prediction)
            if ok:
                self.discard(best)
                best, hi = candidate, probe
                if from_prediction is not None:
                    break  # memory was predicted not to fit below this level
            else:
                self.discard(candidate)
                lo = probe
            probe = (lo + hi) / 2
        return best

    def _predict_t(self, c0: Candidate, c1: Candidate, settings: ExportSettings) -> tuple[float, dict[str, Any]]:
        """Smallest t whose predicted disk and resident bytes fit max_memory (bisection)."""
        excluded = (c0.postprocess["quantize"] or {}).get("excluded_node_names", [])
        predictor = SizePredictor.calibrate(c0.model, c0.graph_bytes, settings.scheme, settings.quantize, excluded)
        side_files = c0.disk_bytes - c0.graph_bytes  # config and tokenizer: independent of t
        w0 = weight_bytes(c0.model, settings.scheme, settings.quantize, exclude=excluded)
        w1 = weight_bytes(c1.model, settings.scheme, settings.quantize, exclude=excluded)
        r0, r1 = c0.measurement["resident_bytes"], c1.measurement["resident_bytes"]

        def predict(t: float) -> dict[str, Any]:
            model_t, _ = self.knob.make(t)
            w = weight_bytes(model_t, settings.scheme, settings.quantize, exclude=excluded)
            resident = r0 + (r1 - r0) * (w - w0) / (w1 - w0) if w1 != w0 else r1
            return {"disk_bytes": predictor.predict(model_t) + side_files, "resident_bytes": int(resident)}

        def fits(p: dict[str, Any]) -> bool:
            return max(p["disk_bytes"], p["resident_bytes"]) <= self.budget.max_memory

        lo, hi = 0.0, 1.0
        best = predict(1.0)
        while hi - lo > _T_TOLERANCE:
            mid = (lo + hi) / 2
            p = predict(mid)
            if fits(p):
                hi, best = mid, p
            else:
                lo = mid
        return hi, {**best, "overhead_bytes": predictor.overhead}

    def error(self) -> BudgetError:
        def memory(trial: dict[str, Any]) -> float:
            m = trial["measured"]
            return max(m["disk_bytes"], m["resident_bytes"] or 0)

        def label(trial: dict[str, Any]) -> str:
            return f"{trial['quantize'] or trial['dtype']}, t={trial['t']:g}"

        small = min(self.trials, key=memory)
        fast = min(self.trials, key=lambda tr: tr["measured"]["decode_p50_ms"])
        quick = min(self.trials, key=lambda tr: tr["measured"]["prefill_p50_ms"])
        b = self.budget
        limits = []
        if b.max_memory is not None:
            limits.append(f"memory {format_size(b.max_memory)}")
        if b.max_latency_ms is not None:
            limits.append(f"decode {b.max_latency_ms:g} ms")
        if b.max_prefill_ms is not None:
            limits.append(f"prefill {b.max_prefill_ms:g} ms")
        more = "" if self.knob is not None else " or give a plan and --method to compress further"
        return BudgetError(
            f"no setting meets the budget ({', '.join(limits)} at batch {b.batch}, prompt {b.prompt_len},"
            f" context {b.context}, {b.ep}); smallest reachable: memory {format_size(memory(small))}"
            f" ({label(small)}), decode p50 {fast['measured']['decode_p50_ms']:.3g} ms ({label(fast)}),"
            f" prefill p50 {quick['measured']['prefill_p50_ms']:.3g} ms ({label(quick)});"
            f" hint: relax the budget{more}"
        )


def fit_budget(
    model: Any,
    plan: Any,
    tokenizer: Any,
    settings: ExportSettings,
    budget: Budget,
    staging: Any,
    method: str | None = None,
    *,
    knob: Knob | None = None,
    compress_options: dict[str, Any] | None = None,
) -> tuple[Candidate, dict[str, Any], Any]:
    """The least-compressed measured candidate that meets ``budget``.

    Args:
        model, plan, tokenizer: as for :func:`~cwca_export.exporter.api.export`.
        settings: export settings; ``dtype`` and ``quantize`` are the search's to choose
            unless ``settings.quantize`` is fixed.
        budget: limits and workload.
        staging: the :class:`~cwca_export.exporter._atomic.Staging` that owns scratch folders.
        method: compression method applying ``plan``; with a plan it makes a :class:`PlanKnob`.
        knob: any other global compression level (overrides ``method``).

    Returns:
        ``(candidate, search record for the manifest, plan of the chosen candidate)``.
    """
    if knob is None and method is not None:
        knob = PlanKnob(model, plan, method, compress_options)
    search = _Search(tokenizer, budget, staging, knob)
    for dtype, quantize in storage_ladder(budget, settings.quantize):
        chosen = search.rung(model, dataclasses.replace(settings, dtype=dtype, quantize=quantize))
        if chosen is not None:
            trial, chosen_plan = search.made[id(chosen)]
            record = {"knob": None if knob is None else knob.name, "trials": search.trials, "chosen": trial}
            return chosen, record, chosen_plan if chosen_plan is not None else plan
    raise search.error()
