"""Fitting a budget: the lowest-loss artifact that measurement proves within every limit.

One search per budget (docs/design.md 3.4, 5.2):

1. the model as given is built and measured (the reference); if it meets the budget it ships;
2. candidates are (structure level) x (precision plan). Structure levels t in [0, 1] move the
   plan's global target by the plan's own rule (:mod:`cwca_export.planning.plan_scaling`); at each level
   the precision plans are: the level in fp32, each storage format for every block (with the
   embedding and head in fp32, and with them quantized too), and the byte-budget optimum of
   :func:`cwca_export.planning.precision.solve_precision` on the measured per-group damage;
3. every candidate is priced by predicted bytes (exact weight bytes plus the reference's graph
   overhead; resident memory linear in disk bytes, refitted on every artifact measured) and,
   when predicted to fit, by its measured calibration loss (the whole candidate computed in
   torch exactly as ONNX Runtime will store it);
4. finalists, lowest loss first, are built and measured (disk, resident memory, latency); the
   first that meets every limit ships. A uniform storage, the kind a plain export gives (one
   format everywhere, no structure removed), is built before a per-layer or structured
   candidate that beats it by less than ``significance`` standard errors of the paired
   per-window loss difference on held-out windows of the calibration text where there are
   any (:mod:`cwca_export.exporter.ranking`). The manifest records every candidate and why
   the winner won.

With a latency limit and planned storage, each candidate's latency is predicted from the
per-group latency table (:mod:`cwca_export.exporter.latency_table`): candidates predicted over
a limit are not built, and the precision program is solved with the latency rows too. With
fixed storage, a finalist over the latency limit rules out the untried ones that are not at
least 10% smaller.

A decode limit named by a peer (``--max-latency-ms int8``) is the p50 of the model's plain
dynamic int8 export, built and measured first; a finalist that meets it is then measured again
beside that peer in alternating rounds (:func:`cwca_export.exporter.measure.measure_side_by_side`)
and ships only if it is no slower there too.

A refined plan (``cwca-export refine``) is refined again, with its method and forwards, at
each structure level whose candidates are priced (levels only checked for fit are re-solved).

With ``--quantize`` fixed, or an fp16 artifact, the storage is not searched: candidates are the
structure levels in that storage, priced by the structured model's calibration loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cwca_export.budget import Budget, format_size
from cwca_export.exporter.build import Candidate, ExportSettings, build_candidate
from cwca_export.exporter.latency_table import LatencyModel, LatencyTimer
from cwca_export.exporter.ranking import DEFAULT_SIGMAS, build_order, compare
from cwca_export.progress import bar as progress_bar

MAX_BUILDS = 6  # artifacts built and measured after the reference
REFINE_STEPS = 3  # bisection steps between grid levels for the least structure that fits
LATENCY_SHRINK = 0.9  # after a latency miss, only candidates this much smaller are tried


class BudgetError(ValueError):
    """No candidate meets the budget; the message states the smallest memory and latency measured.

    ``least`` holds the least limits that would have been met, for callers that phrase their own
    fix (a recipe's keys): ``memory`` in bytes (the smallest predicted storage, or the smallest
    measured disk / resident bytes), ``max_latency_ms`` and ``max_prefill_ms`` as measured."""

    def __init__(self, message: str, least: dict[str, float] | None = None) -> None:
        super().__init__(message)
        self.least = dict(least or {})


class Knob(Protocol):
    """A global compression level: ``make(t)`` returns the model (and plan) at t in [0, 1]."""

    name: str

    def make(self, t: float) -> tuple[Any, Any]: ...


class PlanKnob:
    """Moves ``plan`` to the target at level t by its own rule and applies it to a copy.

    Only the latest level's copy is kept (a level asked for again after another is compressed
    again), so the search holds at most the model and one compressed copy (docs/memory.md).

    t = 0 is the model as given; t = 1 the most the plan's bounds allow (pruning: the upper
    bounds' weighted mean; rank plans: the lower unit bounds' kept fraction; unit budgets: the
    lower bounds' cost). Unstructured and N:M methods are refused: ONNX Runtime stores and
    runs their zeros dense, so no level changes bytes or latency.
    """

    def __init__(self, model: Any, plan: Any, method: str, compress_options: dict[str, Any] | None = None) -> None:
        from cwca_export.compression import apply_plan
        from cwca_export.compression.registry import get_method
        from cwca_export.planning.plan_scaling import target_of, target_range

        if plan is None:
            raise ValueError(f"method {method!r} needs a plan; hint: pass --plan plan.json")
        spec = get_method(method)
        if spec.dense_storage:
            raise ValueError(dense_storage_message(method))
        self.model, self.plan, self.method = model, plan, method
        self.compress_options = dict(compress_options or {})
        self._apply = apply_plan
        kind, _ = target_of(plan)
        self.name = {"sparsity": "global sparsity", "kept_fraction": "kept fraction", "budget": "unit budget"}[kind]
        self.start, self.stop = target_range(plan, model)
        self._made: dict[float, tuple[Any, Any]] = {}
        self._refined: dict[float, Any] = {}  # level -> the plan refined again there (kept: plans are small)

    def target(self, t: float) -> float:
        """The global target (sparsity, kept fraction or unit budget) at level t."""
        return self.start + t * (self.stop - self.start)

    def make(self, t: float) -> tuple[Any, Any]:
        from cwca_export.planning.plan_scaling import rescale_plan

        if t == 0:
            return self.model, None
        if t not in self._made:
            plan_t = self._refined.get(t) or rescale_plan(self.plan, self.target(t), shapes=self.model)
            self._made.clear()  # one compressed copy at a time: memory stays at twice the weights
            self._made[t] = (self._apply(self.model, plan_t, self.method, **self.compress_options), plan_t)
        return self._made[t]

    def refine(self, t: float, data: Any) -> bool:
        """Refine level ``t``'s plan again when the plan given was refined (plan_scaling: the
        moved plan records ``refine_with``); whether it was. Later :meth:`make` calls at ``t``
        apply the refined plan."""
        from cwca_export.planning.plan_scaling import rescale_plan
        from cwca_export.planning.refine import refine_again

        if t == 0 or t in self._refined:
            return t in self._refined
        plan_t = self._made[t][1] if t in self._made else rescale_plan(self.plan, self.target(t), shapes=self.model)
        if not plan_t.parameters.get("refine_with"):
            return False
        self._made.clear()  # the dense model is measured in place: no compressed copy beside it
        self._refined[t] = refine_again(self.model, plan_t, data, **self.compress_options)
        return True

    def drop(self, t: float) -> None:
        """Drop the cached compressed copy of level ``t``."""
        self._made.pop(t, None)

    def forget(self) -> None:
        """Drop every cached compressed copy (the search is over)."""
        self._made = {}


def dense_storage_message(method: str) -> str:
    """Why a budget cannot be met by unstructured or N:M sparsity, and what to use instead."""
    return (
        f"--method {method} with a budget: ONNX Runtime stores and runs unstructured and N:M zeros"
        " dense, so the artifact's bytes, memory and latency do not change; hint: shrink it with"
        " --method width (MLP channels / heads) or --method lowrank|asvd (ranks) and a matching --plan,"
        " let the search choose per-layer precision (no --method), or drop --max-memory /"
        " --max-disk / --max-latency-ms to export the sparse model as is"
    )


def _measured(c: Candidate) -> dict[str, Any]:
    latency = c.measurement["latency_ms"]
    return {
        "disk_bytes": c.disk_bytes,
        "resident_bytes": c.measurement["resident_bytes"],
        "decode_p50_ms": latency["decode"]["p50"],
        "prefill_p50_ms": latency["prefill"]["p50"],
    }


@dataclasses.dataclass
class _Option:
    """One candidate: a structure level and a storage (precision plan, or fixed settings)."""

    t: float
    target: float | None
    label: str
    formats: dict[str, str] | None  # group -> format; None: the settings' own storage
    predicted_disk: int
    predicted_resident: int | None = None
    weight_bytes: int = 0
    calib_loss: float | None = None
    losses: Any = None  # per calibration sequence, whose mean is calib_loss
    check_losses: Any = None  # per held-out window (the paired test's input when there are any)
    uniform: bool = False  # one storage for every block: a plain export's (a peer at t = 0)
    predicted_damage: float | None = None
    predicted_ms: dict[str, float] | None = None  # decode / prefill p50, from the latency table
    status: str = "priced"
    measured: dict[str, Any] | None = None
    met: bool | None = None
    side_by_side: dict[str, Any] | None = None  # against the latency peer, alternating rounds

    def record(self) -> dict[str, Any]:
        return {
            "t": self.t, "target": self.target, "storage": self.label, "formats": self.formats,
            "predicted": {"disk_bytes": self.predicted_disk, "resident_bytes": self.predicted_resident,
                          "weight_bytes": self.weight_bytes, "damage_sum": self.predicted_damage,
                          **({f"{k}_p50_ms": v for k, v in self.predicted_ms.items()} if self.predicted_ms else {})},
            "calib_loss": self.calib_loss, "status": self.status, "measured": self.measured, "met": self.met,
            **({"side_by_side": self.side_by_side} if self.side_by_side else {}),
        }


class _ResidentModel:
    """Resident bytes as a + b * disk bytes, fitted on the artifacts measured so far."""

    def __init__(self) -> None:
        self.points: list[tuple[float, float]] = []

    def add(self, disk: int, resident: int | None) -> None:
        if resident is not None:
            self.points.append((float(disk), float(resident)))

    def line(self) -> tuple[float, float] | None:
        """``(a, b)`` of resident = a + b * disk, or None before any measurement."""
        if not self.points:
            return None
        xs = np.array([p[0] for p in self.points])
        ys = np.array([p[1] for p in self.points])
        if len(self.points) == 1 or np.ptp(xs) < 1e-6 * max(xs.max(), 1.0):
            return float(ys[0] - xs[0]), 1.0  # one artifact: runtime overhead constant
        b, a = np.polyfit(xs, ys, 1)
        return float(a), max(float(b), 0.0)

    def __call__(self, disk: int) -> int | None:
        fit = self.line()
        return None if fit is None else int(fit[0] + fit[1] * disk)


def calibration_ids(tokenizer: Any, compress_options: dict[str, Any], calibration: Any, vocab: int) -> tuple[Any, str]:
    """Token ids that price a search's candidates, and where they came from."""
    ids, _, source = calibration_sets(tokenizer, compress_options, calibration, vocab)
    return ids, source


def calibration_sets(tokenizer: Any, compress_options: dict[str, Any], calibration: Any,
                     vocab: int) -> tuple[Any, Any, str]:
    """``(ids, held_out, source)``: the ids that price a search's candidates, further windows of
    the same source disjoint from them (``CalibrationData.held_out``; None when there are none)
    for the significance test (:mod:`cwca_export.exporter.ranking`), and where they came from."""
    import torch

    data = calibration if calibration is not None else compress_options.get("data")
    if data is not None:
        return getattr(data, "input_ids", data), getattr(data, "held_out", None), "--data"
    if tokenizer is not None:
        from importlib.resources import files

        from cwca_export.data import ShortCalibrationError, calibration_data
        from cwca_export.defaults import EXPORT_SAMPLES, EXPORT_SEQ_LEN

        text = (files("cwca_export") / "assets" / "text" / "train.txt").read_text(encoding="utf-8")[:400_000]
        try:  # the held-out windows leave the calibration windows as they are (data.calibration_data)
            data = calibration_data([text], tokenizer, num_samples=EXPORT_SAMPLES, seq_len=EXPORT_SEQ_LEN, seed=0,
                                    held_out=EXPORT_SAMPLES)
        except ShortCalibrationError:
            data = calibration_data([text], tokenizer, num_samples=EXPORT_SAMPLES, seq_len=EXPORT_SEQ_LEN, seed=0,
                                    allow_fewer=True)
        return data.input_ids, data.held_out, "shipped Python documentation text (pass --data for your domain)"
    ids = torch.randint(0, vocab, (8, 64), generator=torch.Generator().manual_seed(0))
    return ids, None, "random tokens (no tokenizer and no --data: losses rank candidates only roughly)"


class _Search:
    def __init__(self, model, plan, tokenizer, settings, budget, staging, knob, calib, calib_source, formats, levels):
        self.model, self.plan, self.tokenizer = model, plan, tokenizer
        self.settings, self.budget, self.staging, self.knob = settings, budget, staging, knob
        self.calib, self.calib_source = calib, calib_source
        self.formats, self.levels = formats, levels
        self.options: list[_Option] = []
        self.trials: list[dict[str, Any]] = []
        self.resident = _ResidentModel()
        self.plans: dict[float, Any] = {0.0: None}
        self.table = None
        self.per_layer = True
        self.node_overhead = 0.0  # graph bytes each quantized weight node adds (scales' names, attributes)
        self.timings: dict[str, float] = {}
        self.clippers: dict[float, Any] = {}
        self.latency: Any = None  # a LatencyModel when the budget limits latency and storage is planned
        self.peer: Candidate | None = None  # the latency peer's artifact (--max-latency-ms int8)
        self.peer_record: dict[str, Any] | None = None
        self.pricing = progress_bar(desc="search: pricing", unit="candidate", show=False)  # run() shows one
        self.refined: dict[str, str] = {}  # level -> "refined" or why it was not refined again
        self.sigmas = DEFAULT_SIGMAS  # a plain export's storage is passed over only beyond this (module ranking)
        self.check: Any = None  # held-out windows (N, L) the paired test reads; None: the calibration sequences
        self.peer_predicted: bool | None = None  # whether a plain export's storage is predicted to fit (run)
        self.held: dict[int, dict[int, Any]] = {}  # option id -> peer id -> (the peer built before it, why)

    # -------------------------------------------------------------- building
    def build(self, model: Any, settings: ExportSettings, option: _Option) -> tuple[Candidate | None, bool]:
        from cwca_export.exporter.verify import VerificationError

        clipper = self.clipper_at(option.t, model) if settings.precision else None
        try:
            candidate = build_candidate(model, self.tokenizer, self.staging.new_folder(), settings, clipper)
        except VerificationError as exc:  # a candidate that fails verification is recorded, not fatal
            option.status = f"failed verification: {str(exc).split(';')[0]}"
            return None, False
        # with a peer, decode is judged beside it (confirm_beside_peer), not on this one measurement
        budget = self.budget if self.budget.latency_peer is None else dataclasses.replace(
            self.budget, max_latency_ms=None, latency_peer=None)
        check = budget.check(
            candidate.disk_bytes, candidate.measurement["resident_bytes"], candidate.measurement["latency_ms"]
        )
        option.measured, option.met = _measured(candidate), check["met"]
        option.status = "built: met the budget" if check["met"] else "built: " + ", ".join(
            f"{c['name']} {c['measured']:.4g} > {c['limit']:.4g}" for c in check["checks"] if not c["met"])
        self.resident.add(candidate.disk_bytes, candidate.measurement["resident_bytes"])
        self.trials.append(option.record())
        return candidate, check["met"]

    # -------------------------------------------------------------- pricing
    def memory_cap(self) -> float:
        """Largest predicted disk bytes that fit every memory limit (resident through its model)."""
        b = self.budget
        caps = [float(v) for v in (b.max_disk, b.max_memory) if v is not None]
        fit = self.resident.line() if b.max_memory is not None else None
        if fit is not None:
            a, slope = fit
            if slope > 0:
                caps.append((b.max_memory - a) / slope)
            elif a > b.max_memory:
                caps.append(-1.0)
        return min(caps) if caps else float("inf")

    def storage_options(self, model_t: Any, t: float, target: float | None, ref: Candidate) -> list[_Option]:
        from cwca_export.exporter.predict import weight_bytes
        from cwca_export.planning.precision import (
            artifact_weight_bytes,
            other_weight_bytes,
            precision_groups,
            rescale_bytes,
            solve_precision,
        )

        overhead = ref.prediction["overhead_bytes"]
        side = ref.disk_bytes - ref.graph_bytes
        if self.table is None:  # fixed storage
            weights = weight_bytes(model_t, self.settings.scheme, self.settings.quantize,
                                   exclude=(ref.postprocess["quantize"] or {}).get("excluded_node_names", []))
            label = self.settings.quantize.method if self.settings.quantize else self.settings.dtype
            return [_Option(t, target, label, None, overhead + weights + side, weight_bytes=weights, uniform=True)]
        fp32_overhead = ref.prediction["fp32_overhead_bytes"]
        table = rescale_bytes(self.table, model_t)
        nodes = {g.name: len(g.modules) for g in precision_groups(model_t)}
        plans: dict[str, dict[str, str]] = {"fp32": {}}

        def usable(group: str, fmt: str) -> bool:
            return (group in table.groups and fmt in table.formats
                    and table.damage[table.groups.index(group)][table.formats.index(fmt)] is not None)

        for f in self.formats:
            if f == "fp32":
                continue
            plans[f"blocks {f}"] = {g: f for g in table.groups if g not in ("embed", "head", "tied")}
            embed_f = next((e for e in (f, f.removesuffix("-a8"), "int4-b32") if usable("embed", e)), "fp32")
            plans[f"all {f}"] = {**plans[f"blocks {f}"], "embed": embed_f, "head": f}
            if usable("tied", "int8"):  # the head reads the embedding's uint8 table, as plain int8 does
                plans[f"blocks {f}, tied table int8"] = {**plans[f"blocks {f}"], "tied": "int8"}
        others = other_weight_bytes(model_t)
        cap = self.memory_cap()
        full = artifact_weight_bytes(model_t, {})
        caps = [cap * s for s in (0.995, 0.9, 0.8)] if np.isfinite(cap) else [full * s for s in (0.4, 0.25, 0.18, 0.14)]
        limits = self.latency_limits()
        rows = self.latency.rows(model_t, limits, table.groups, table.formats) if self.latency and limits else []
        # the graph bytes every quantized node adds (scales' names, attributes), as the prediction
        # below counts them: at most every block's nodes and the shared table are quantized
        node_bytes = self.node_overhead * sum(n for g, n in nodes.items() if g not in ("embed", "head"))
        for c in caps if self.per_layer else ():
            for label, extra in ((f"planned for {format_size(c)}", []),
                                 (f"planned for {format_size(c)} within the latency limits", rows)):
                if label.endswith("limits") and not extra:
                    continue
                try:
                    solved = solve_precision(table, c - fp32_overhead - side - others - node_bytes,
                                             allowed=self.formats, limits=extra)
                except ValueError:
                    continue
                plans[label] = solved.formats
        options, seen = [], set()
        for label, formats in plans.items():
            formats = {g: f for g, f in formats.items() if f != "fp32"}
            key = tuple(sorted(formats.items()))
            if key in seen:
                continue
            seen.add(key)
            weights = artifact_weight_bytes(model_t, formats)
            damage = sum(table.damage[table.groups.index(g)][table.formats.index(f)] for g, f in formats.items())
            graph = self.planned_graph_bytes(ref, formats, weights, nodes)
            predicted_ms = self.latency.predict(model_t, formats) if self.latency else None
            options.append(_Option(t, target, label, formats or None, int(graph) + side,
                                   weight_bytes=weights, predicted_damage=float(damage), predicted_ms=predicted_ms,
                                   uniform=not label.startswith("planned")))
        return options

    def planned_graph_bytes(self, ref: Candidate, formats: dict[str, str], weights: int,
                            nodes: dict[str, int] | None = None) -> float:
        """The graph bytes a storage plan predicts (``formats``: group -> format, fp32 groups left
        out; ``weights``: their exact bytes): the reference's overhead, the quantized nodes' own
        (``nodes``: group -> node count; None counts none, a lower bound) and the tied head's copy
        where the plan keeps one table."""
        if not formats:
            return ref.prediction["overhead_bytes"] + weights
        one_table = "tied" in formats or (formats.get("embed", "fp32") == "fp32"
                                          and formats.get("head", "fp32") == "fp32")
        return (ref.prediction["fp32_overhead_bytes"] + weights
                + (self.node_overhead * sum(nodes[g] for g in formats) if nodes is not None else 0)
                + (ref.prediction.get("head_copy_bytes", 0) if one_table else 0))

    def smallest_storage(self, ref: Candidate) -> tuple[int, float] | None:
        """Predicted disk bytes of the most compact storage the formats allow, at the level of
        most structure, and that level; as :meth:`storage_options` predicts (node overhead 0),
        so no option of the search is predicted smaller. Exact from shapes: no forward, no
        damage table. None when the most compressed level cannot be made."""
        from cwca_export.planning.precision import StorageFormat, artifact_weight_bytes, precision_groups

        t = 1.0 if self.knob is not None else 0.0
        try:
            model_t = self.knob.make(t)[0] if self.knob is not None else self.model
        except ValueError:
            return None
        formats = [StorageFormat.parse(n) for n in self.formats] or [StorageFormat.parse("fp32")]
        groups = precision_groups(model_t)

        def least(group: Any) -> str:
            return min((group.bytes(f), f.name) for f in formats if group.allows(f))[1]

        blocks = {g.name: least(g) for g in groups if g.kind == "block"}
        plans = [{**blocks, **{g.name: least(g) for g in groups if g.kind in ("embed", "head")}}]
        if any(g.kind == "tied" for g in groups):
            plans.append({**blocks, **{g.name: least(g) for g in groups if g.kind == "tied"}})
        side = ref.disk_bytes - ref.graph_bytes
        sizes = []
        for plan in plans:
            plan = {g: f for g, f in plan.items() if f != "fp32"}
            sizes.append(int(self.planned_graph_bytes(ref, plan, artifact_weight_bytes(model_t, plan))) + side)
        return min(sizes), t

    def limits_text(self) -> str:
        """The limits and workload, as the errors state them."""
        b = self.budget
        limits = []
        if b.max_memory is not None:
            limits.append(f"memory {format_size(b.max_memory)}")
        if b.max_disk is not None:
            limits.append(f"disk {format_size(b.max_disk)}")
        if b.max_latency_ms is not None:
            peer = f" (plain {b.latency_peer}'s, measured here)" if b.latency_peer else ""
            limits.append(f"decode {b.max_latency_ms:.4g} ms{peer}")
        if b.max_prefill_ms is not None:
            limits.append(f"prefill {b.max_prefill_ms:g} ms")
        return f"{', '.join(limits)} at batch {b.batch}, prompt {b.prompt_len}, context {b.context}, {b.ep}"

    def unreachable(self, ref: Candidate) -> BudgetError | None:
        """The error for a memory or disk limit below the smallest storage the search could
        predict (before the damage table, the costliest step, is measured); None otherwise."""
        caps = [v for v in (self.budget.max_disk, self.budget.max_memory) if v is not None]
        smallest = self.smallest_storage(ref) if caps else None
        if smallest is None or smallest[0] <= min(caps):
            return None
        size, t = smallest
        where = f" at the plan's most compressed level (t={t:g})" if self.knob is not None else ""
        more = "" if self.knob is not None else (
            " or give --plan and --method width|lowrank|asvd to compress structure too")
        return BudgetError(
            f"no setting meets the budget ({self.limits_text()}): the most compact storage of --formats"
            f" {','.join(self.formats) or 'fp32'}{where} is predicted at {format_size(size)} on disk (the model as"
            f" given measured {format_size(ref.disk_bytes)}); nothing else was priced or built;"
            f" hint: a limit of at least {format_size(size)}, smaller --formats (e.g. int4-b128-asym){more}",
            least={"memory": size},
        )

    def latency_limits(self) -> dict[str, float | None]:
        return {"decode": self.budget.max_latency_ms, "prefill": self.budget.max_prefill_ms}

    def calibrate_node_overhead(self, ref: Candidate) -> None:
        """Graph bytes per quantized node beyond the weights, from quantizing the reference's
        graph with every group in the most compact format (no export, no measurement)."""
        import tempfile

        from cwca_export.exporter import postprocess as pp
        from cwca_export.exporter.build import apply_precision
        from cwca_export.planning.precision import artifact_weight_bytes, precision_groups

        groups = precision_groups(self.model)
        table = self.table
        formats = {}
        for g, name in enumerate(table.groups):
            if name == "tied":
                continue  # the untied embedding and head calibrate more nodes
            sizes = [(b, f) for b, f in zip(table.bytes[g], table.formats, strict=True) if b is not None]
            formats[name] = min(sizes)[1]
        formats = {g: f for g, f in formats.items() if f != "fp32"}
        if not formats:
            return
        with tempfile.TemporaryDirectory(dir=ref.folder.parent) as scratch:
            out = Path(scratch) / "calibrate.onnx"
            apply_precision(self.model, ref.model_path, out, formats)
            graph = pp.graph_bytes(out)
        n = sum(len(g.modules) for g in groups if g.name in formats)
        extra = graph - artifact_weight_bytes(self.model, formats) - ref.prediction["fp32_overhead_bytes"]
        self.node_overhead = max(0.0, extra / n)
        self.timings["node_overhead_bytes"] = round(self.node_overhead, 1)

    def fits_corrected(self, option: _Option) -> bool:
        """Whether ``option`` still fits once its prediction is shifted by the largest error seen
        on a built artifact of the same kind (per-layer precision or not)."""
        errors = [t["measured"]["disk_bytes"] - t["predicted"]["disk_bytes"] for t in self.trials[1:]
                  if bool(t["formats"]) == bool(option.formats)]
        if not errors:
            return True
        shifted = dataclasses.replace(option, predicted_disk=option.predicted_disk + max(0, max(errors)))
        return self.fits_predicted(shifted)

    def fits_predicted(self, option: _Option) -> bool:
        option.predicted_resident = self.resident(option.predicted_disk)
        b = self.budget
        if b.max_disk is not None and option.predicted_disk > b.max_disk:
            return False
        if b.max_memory is not None:
            worst = max(option.predicted_disk, option.predicted_resident or 0)
            if worst > b.max_memory * 1.05:  # resident is a model: keep near misses for measurement
                return False
        return not self.over_latency_predicted(option)

    def over_latency_predicted(self, option: _Option) -> bool:
        """Whether the latency table puts ``option`` over a latency limit (5% over: near misses
        are measured, the table being a model)."""
        if option.predicted_ms is None:
            return False
        return any(limit is not None and option.predicted_ms[phase] > limit * 1.05
                   for phase, limit in self.latency_limits().items())

    def price(self, option: _Option, model_t: Any, structure_losses: Any) -> None:
        from cwca_export.planning.precision import StorageFormat, quantized_weights

        if not option.formats:
            losses = structure_losses
        else:
            assignment = {g: StorageFormat.parse(f) for g, f in option.formats.items()}
            with self.rounded(model_t, option.t, assignment), quantized_weights(model_t, assignment):
                losses = self.sequence_losses(model_t)
        option.losses, option.check_losses = losses
        option.calib_loss = float(option.losses.mean())

    def sequence_losses(self, model_t: Any) -> tuple[Any, Any]:
        """Per-sequence losses of ``model_t`` on the calibration ids, and on the held-out windows."""
        from cwca_export.planning.damage import sequence_losses

        held = None if self.check is None else sequence_losses(model_t, self.check, batch_size=8).numpy()
        return sequence_losses(model_t, self.calib, batch_size=8).numpy(), held

    def test_losses(self, option: _Option) -> Any:
        """What the significance test compares: held-out windows where there are any."""
        return option.losses if self.check is None else option.check_losses

    def test_source(self) -> str:
        if self.peer_predicted is None:  # run() sets it: the model as given met the limits
            return "nothing: the model as given met the limits (no candidates)"
        if self.table is None:
            return "nothing: the storage is fixed (--quantize / --dtype), no plain storage competes with it"
        if not self.peer_predicted:
            return "nothing: no plain export's storage is predicted within the limits (held-out windows not read)"
        if self.check is None:
            return "the calibration sequences (no held-out windows: the plans were fitted on them too)"
        return f"{self.check.shape[0]} held-out windows of {self.check.shape[1]} tokens beside the calibration ones"

    def clipper_at(self, t: float, model_t: Any) -> Any:
        """The clipping of structure level ``t`` (clip rounding only; None otherwise)."""
        from cwca_export.planning.rounding import clipper_for

        if self.settings.rounding != "clip":
            return None
        if t not in self.clippers:
            self.clippers = {t: clipper_for(model_t, self.calib)}  # one level at a time, as the knob
        return self.clippers[t]

    def rounded(self, model_t: Any, t: float, assignment: dict[str, Any]) -> Any:
        """The weights of ``model_t`` as the settings' rounding exports them, for pricing."""
        from cwca_export.planning.rounding import clipped_weights

        clipper = self.clipper_at(t, model_t)
        return contextlib.nullcontext() if clipper is None else clipped_weights(model_t, assignment, clipper)

    # -------------------------------------------------------------- the search
    def run(self, ref: Candidate) -> tuple[Candidate | None, _Option | None]:
        began = time.perf_counter()
        self.pricing = progress_bar(desc="search: pricing", unit="candidate")
        levels = [0.0] if self.knob is None else [i / (self.levels - 1) for i in range(self.levels)]
        # which levels have a storage that fits (bytes are exact: no forward, no export)
        fits_at = {t: self.add_level(t, ref, price=False) for t in levels}
        if not self.peer_predicted or self.table is None:  # nothing to test against: no held-out forwards
            self.check = None
        # the least structure whose most compact storage fits: bisect between grid levels
        if self.knob is not None and np.isfinite(self.memory_cap()):
            lo = max((t for t in levels if not fits_at[t]), default=None)
            hi = min((t for t in levels if fits_at[t] and (lo is None or t > lo)), default=None)
            if lo is not None and hi is not None:
                for _ in range(REFINE_STEPS):
                    mid = round((lo + hi) / 2, 6)
                    fits_at[mid] = self.add_level(mid, ref, price=False)
                    lo, hi = (lo, mid) if fits_at[mid] else (mid, hi)
        # price from the least structure up; a uniform storage already priced at a lower level is
        # not priced again higher up (more structure removed, same storage: no lower loss); the
        # byte-budget plans are priced at every level (more structure leaves them more bytes)
        priced_labels: set[str] = set()
        for t in sorted(t for t, ok in fits_at.items() if ok or t in levels):
            if fits_at[t] and isinstance(self.knob, PlanKnob):
                self.refine_level(t)
            self.add_level(t, ref, skip=priced_labels)
        self.pricing.close()
        self.timings["pricing_s"] = round(time.perf_counter() - began, 2)
        builds_bar = progress_bar(total=MAX_BUILDS, desc="search: builds (at most)", unit="build")
        priced = sorted((o for o in self.options if o.calib_loss is not None),
                        key=lambda o: (o.calib_loss, o.predicted_disk))
        priced, self.held = build_order(priced, losses=self.test_losses, is_peer=self.is_peer, sigmas=self.sigmas)
        latency_ceiling = None
        builds = 0
        for option in priced:
            if option.t == 0.0 and not option.formats:
                option.status = "the model as given: built first (the reference), over the budget"
                continue
            if self.latency is None and latency_ceiling is not None and option.predicted_disk > latency_ceiling:
                option.status = "not built: not 10% smaller than a candidate over the latency limit"
                continue
            if builds >= MAX_BUILDS:
                option.status = "not built: build limit reached"
                continue
            if not self.fits_corrected(option):
                option.status = "not built: over the limits once corrected by the artifacts measured so far"
                continue
            builds += 1
            model_t, _ = self.knob.make(option.t) if (self.knob is not None and option.t) else (self.model, None)
            settings = dataclasses.replace(self.settings, precision=option.formats) if option.formats else self.settings
            raw = self.latency.raw(model_t, option.formats or {}) if self.latency else None
            candidate, ok = self.build(model_t, settings, option)
            builds_bar.update()
            if raw is not None and option.measured:
                self.latency.observe(raw, {"decode": option.measured["decode_p50_ms"],
                                           "prefill": option.measured["prefill_p50_ms"]})
            if ok and self.peer is not None:
                ok = self.confirm_beside_peer(candidate, option)
            if ok:
                for other in priced:
                    if other.status != "priced":
                        continue
                    peer, comparison = self.held.get(id(other), {}).get(id(option), (None, None))
                    other.status = ("not built: a lower-loss candidate met the budget" if peer is None else
                                    f"not built: not proven better than {peer.label} (t=0), which met the budget:"
                                    f" {comparison.text()}; --significance {self.sigmas:g} asks more")
                builds_bar.close()
                return candidate, option
            if candidate is not None:
                if option.measured and self._over_latency(option.measured):
                    latency_ceiling = LATENCY_SHRINK * option.measured["disk_bytes"]
                shutil.rmtree(candidate.folder, ignore_errors=True)
        builds_bar.close()
        return None, None

    def build_peer(self) -> None:
        """Build the latency peer (the model's plain dynamic int8 export). Its decode p50
        measured beside the reference becomes the decode limit the latency table plans to."""
        from cwca_export.exporter.postprocess import QuantizeConfig

        settings = dataclasses.replace(self.settings, quantize=QuantizeConfig("int8"), precision=None)
        option = _Option(0.0, None, "latency peer: plain dynamic int8 (--quantize int8)", None, 0)
        candidate, _ = self.build(self.model, settings, option)
        if candidate is None:
            raise BudgetError(f"--max-latency-ms {self.budget.latency_peer}: the peer does not export: {option.status}")
        self.trials.pop()  # not a candidate: its bytes must not correct the candidates' predictions
        self.peer = candidate
        self.peer_record = {"name": self.budget.latency_peer, "export": "--quantize int8", **option.measured}

    def confirm_beside_peer(self, candidate: Candidate, option: _Option) -> bool:
        """Whether ``candidate`` decodes no slower than the latency peer, both measured again in
        alternating rounds (a limit taken from one measurement minutes earlier is only as good
        as the machine was quiet then)."""
        from cwca_export.exporter.measure import measure_side_by_side

        peer, mine = measure_side_by_side([self.peer.model_path, candidate.model_path], self.settings.measure)
        option.side_by_side = {"peer": peer, "candidate": mine}
        if self.budget.max_latency_ms is None:  # the first pair (the reference's) sets the planned limit
            self.budget = dataclasses.replace(self.budget, max_latency_ms=peer["decode_p50_ms"])
            self.peer_record["beside_reference"] = peer
        ok = mine["decode_p50_ms"] <= peer["decode_p50_ms"]
        if not ok:
            note = (f"decode p50 {mine['decode_p50_ms']:.4g} ms > the {self.budget.latency_peer} peer's"
                    f" {peer['decode_p50_ms']:.4g} ms, measured side by side")
            option.status = f"{option.status}, {note}" if option.met is False else f"built: {note}"
            option.met = False
        self.trials[-1] = option.record()
        return ok

    def refine_level(self, t: float) -> None:
        """A refined plan is refined again at each level priced (issue 11: refined plans are
        re-refined); a level it cannot be refined at keeps the re-solved plan, and says why."""
        began = time.perf_counter()
        try:
            if self.knob.refine(t, self.calib):
                self.refined[f"{t:g}"] = "refined"
                self.timings["refine_s"] = round(self.timings.get("refine_s", 0.0) + time.perf_counter() - began, 2)
        except ValueError as exc:
            self.refined[f"{t:g}"] = f"not refined: {exc}"

    def add_level(self, t: float, ref: Candidate, *, price: bool = True,
                  skip: set[str] | None = None) -> bool:
        """Add (and price) the storage options of structure level ``t``; whether any fits.

        With ``price=False`` nothing is recorded: only whether one fits. Options whose storage
        label is in ``skip`` are recorded unpriced; the labels priced here are added to it."""
        try:
            model_t, plan_t = self.knob.make(t) if self.knob is not None else (self.model, None)
        except ValueError as exc:
            if t == 0.0:
                self.peer_predicted = False
            if price:
                self.options.append(_Option(t, None, "unreachable", None, 0, status=f"skipped: {exc}"))
            return False
        target = self.knob.target(t) if isinstance(self.knob, PlanKnob) else None
        options = self.storage_options(model_t, t, target, ref)
        fits = [o for o in options if self.fits_predicted(o)]
        if t == 0.0:
            self.peer_predicted = any(self.is_peer(o) for o in fits)
        if not price:
            if isinstance(self.knob, PlanKnob) and not fits:
                self.knob.drop(t)
            return bool(fits)
        self.plans[t] = plan_t
        structure_losses = None
        for option in options:
            self.options.append(option)
            if option not in fits:
                option.status = ("predicted over the latency limits" if self.over_latency_predicted(option)
                                 else "predicted over the memory limits")
                continue
            uniform = not option.label.startswith("planned")  # one storage for every level
            if skip is not None and uniform and option.label in skip:
                option.status = "not priced: the same storage fits with less structure removed"
                continue
            if skip is not None and uniform:
                skip.add(option.label)
            if structure_losses is None:
                structure_losses = self.sequence_losses(model_t)
            self.price(option, model_t, structure_losses)
            self.pricing.update()
        return bool(fits)

    def is_peer(self, option: _Option) -> bool:
        """Whether ``option`` stores the model as a plain export would (no structure, one storage)."""
        return option.t == 0 and option.uniform and bool(option.formats)

    def significance_text(self, chosen: _Option) -> str:
        """How ``chosen`` stands against the plain-export storages priced beside it (module ranking)."""
        if self.sigmas <= 0:
            return "; ranked by calibration loss alone (--significance 0)"
        if self.is_peer(chosen):
            passed = [o for o in self.options if id(chosen) in self.held.get(id(o), {})
                      and o.calib_loss is not None and o.calib_loss < chosen.calib_loss]
            if not passed:
                return ""
            best = min(passed, key=lambda o: o.calib_loss)
            return (f"; a plain export's storage, kept over {len(passed)} candidate(s) with lower calibration loss"
                    f" that were not better by {self.sigmas:g} standard errors (the best, {best.label} at"
                    f" t={best.t:g}: {self.held[id(best)][id(chosen)][1].text()})")
        peers = [o for o in self.options if self.is_peer(o) and o.losses is not None and o.met is not False]
        if not peers:
            return ""
        peer = min(peers, key=lambda o: o.calib_loss)
        diff = compare(self.test_losses(chosen), self.test_losses(peer)).text()
        return f"; better than {peer.label} (a plain export's storage) by {diff}"

    def drop_peer(self) -> None:
        if self.peer is not None:
            shutil.rmtree(self.peer.folder, ignore_errors=True)

    def _over_latency(self, measured: dict[str, Any]) -> bool:
        b = self.budget
        return bool((b.max_latency_ms is not None and measured["decode_p50_ms"] > b.max_latency_ms)
                    or (b.max_prefill_ms is not None and measured["prefill_p50_ms"] > b.max_prefill_ms))

    def record(self, chosen: _Option | None) -> dict[str, Any]:
        options = sorted(self.options, key=lambda o: (o.calib_loss is None, o.calib_loss or 0.0))
        why = None
        if chosen is not None and chosen.calib_loss is not None:
            built = [o for o in self.options if o.calib_loss is not None and o.calib_loss < chosen.calib_loss
                     and o.measured is not None]
            why = (f"lowest calibration loss ({chosen.calib_loss:.5g}) among the candidates measured to meet the"
                   f" budget; {len(built)} candidate(s) with lower loss were built and missed a limit")
            why += self.significance_text(chosen)
            if self.peer_record is not None:
                why += (f"; decode no slower than plain {self.peer_record['name']} ("
                        f"{chosen.side_by_side['candidate']['decode_p50_ms']:.4g} against"
                        f" {chosen.side_by_side['peer']['decode_p50_ms']:.4g} ms), measured side by side")
            slow = [o for o in self.options if o.status == "predicted over the latency limits"]
            if slow:
                why += (f"; {len(slow)} candidate(s) predicted over the latency limits by the per-layer latency"
                        " table were not built")
        elif chosen is not None:
            why = "the model as given meets the budget"
        return {
            "knob": None if self.knob is None else self.knob.name,
            "calibration": self.calib_source,
            "calibration_tokens": int(self.calib.shape[0] * self.calib.shape[1]),
            "rounding": self.settings.rounding,
            "precision_damage": None if self.table is None else self.table.to_dict(),
            "latency_peer": self.peer_record,
            "latency_table": None if self.latency is None else {
                "reference": self.latency.reference.to_dict(), "reference_ms": self.latency.reference_ms,
                "errors_ms": self.latency.errors, "seconds": round(self.latency.timer.seconds, 2)},
            "candidates": [o.record() for o in options],
            "trials": self.trials,
            "refined_levels": self.refined,
            "significance_sigmas": self.sigmas,
            "significance_tested_on": None if self.sigmas <= 0 else self.test_source(),
            "chosen": None if chosen is None else chosen.record(),
            "why": why,
            "timings": self.timings,
        }

    def error(self) -> BudgetError:
        def memory(trial: dict[str, Any]) -> float:
            m = trial["measured"]
            return max(m["disk_bytes"], m["resident_bytes"] or 0)

        def label(trial: dict[str, Any]) -> str:
            return f"{trial['storage']}, t={trial['t']:g}"

        small = min(self.trials, key=memory)
        fast = min(self.trials, key=lambda tr: tr["measured"]["decode_p50_ms"])
        quick = min(self.trials, key=lambda tr: tr["measured"]["prefill_p50_ms"])
        more = "" if self.knob is not None else (
            " or give --plan and --method width|lowrank|asvd to compress structure too")
        priced = sum(1 for o in self.options if o.calib_loss is not None)
        return BudgetError(
            f"no setting meets the budget ({self.limits_text()}); {len(self.options)} candidate(s) considered,"
            f" {priced} predicted"
            f" to fit, {len(self.trials)} built; smallest measured: memory {format_size(memory(small))}"
            f" ({label(small)}), decode p50 {fast['measured']['decode_p50_ms']:.3g} ms ({label(fast)}),"
            f" prefill p50 {quick['measured']['prefill_p50_ms']:.3g} ms ({label(quick)});"
            f" hint: relax the budget{more}",
            least={"memory": memory(small), "max_latency_ms": fast["measured"]["decode_p50_ms"],
                   "max_prefill_ms": quick["measured"]["prefill_p50_ms"]},
        )


def search_formats(
    budget: Budget, settings: ExportSettings, formats: Any = None, model: Any = None
) -> list[str] | None:
    """The storage formats a search may plan, or None when storage is fixed (``--quantize``,
    fp16). Dynamic int8 and int8 compute (``-a8``) have CPU kernels only. By default, a budget
    with a latency limit on the CPU also offers each 4-bit format with int8 compute: the same
    bytes, a little more damage, and (BENCHMARKS.md) decode as fast as dynamic int8."""
    from cwca_export.planning.precision import default_formats, parse_formats

    if settings.quantize is not None or budget.dtype != "fp32" or settings.precision:
        return None
    names = [f.name for f in parse_formats(formats if formats is not None else default_formats(model))]
    limited = budget.limits_latency
    if formats is None and limited and budget.ep == "cpu":
        names += [f"{n}-a8" for n in names if n.startswith("int4") and not n.endswith("-a8")]
    if budget.ep != "cpu":  # dynamic int8 and MatMulNBits' int8 compute are CPU kernels
        names = [n for n in names if n != "int8" and not n.endswith("-a8")]
    return names


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
    calibration: Any = None,
    formats: Any = None,
    levels: int = 5,
    precision_damage: Any = None,
    estimator: str = "measured",
    per_layer: bool = True,
    significance: float = DEFAULT_SIGMAS,
) -> tuple[Candidate, dict[str, Any], Any]:
    """The lowest-loss measured candidate that meets ``budget`` (module doc).

    Args:
        model, plan, tokenizer: as for :func:`~cwca_export.exporter.api.export`.
        settings: export settings; storage is the search's to choose unless ``settings.quantize``
            is fixed or the budget's dtype is fp16.
        budget: limits and workload.
        staging: the :class:`~cwca_export.atomic.Staging` that owns scratch folders.
        method: compression method applying ``plan``; with a plan it makes a :class:`PlanKnob`.
        knob: any other global compression level (overrides ``method``).
        compress_options: for ``method`` (``data=`` calibration ids are also the search's).
        calibration: token ids ``(N, L)`` that price candidates (default: ``compress_options["data"]``,
            else the shipped text through ``tokenizer``).
        formats: storage formats to plan (default :data:`cwca_export.planning.precision.DEFAULT_FORMATS`).
        levels: structure levels tried, evenly spaced in [0, 1] (with a knob).
        precision_damage: a measured :class:`~cwca_export.planning.precision.PrecisionDamage` to reuse.
        estimator: per-group damage for the precision program: ``measured`` (probes) or
            ``fisher`` (the Fisher-weighted quantization error, no probe forwards).
        per_layer: False keeps every candidate's storage uniform (one format for all blocks,
            the embedding and head in it or in fp32): the baseline the per-layer plans must beat.
        significance: standard errors of the paired per-sequence loss difference by which a
            per-layer or structured candidate must beat a plain export's storage to be built
            before it (:mod:`cwca_export.exporter.ranking`); 0 ranks by calibration loss alone.

    Returns:
        ``(candidate, search record for the manifest, plan of the chosen candidate)``.
    """
    from cwca_export.planning.precision import fisher_precision_estimate, measure_precision_damage
    from cwca_export.planning.precision_table import EXPORT_BATCH_SIZE

    if estimator not in ("measured", "fisher"):
        raise ValueError(f"precision estimator {estimator!r}: choose measured or fisher; hint: --precision-estimate")

    compress_options = dict(compress_options or {})
    if knob is None and method is not None:
        knob = PlanKnob(model, plan, method, compress_options)
    if levels < 2:
        raise ValueError(f"levels {levels}: a structure search needs at least 2; hint: --levels 9")
    calib, check, source = calibration_sets(tokenizer, compress_options, calibration, model.config.vocab_size)
    names = search_formats(budget, settings, formats, model)
    if names is not None and precision_damage is not None:  # a table measured before: its formats only
        names = [n for n in names if n in precision_damage.formats]
    search = _Search(model, plan, tokenizer, settings, budget, staging, knob, calib, source, names or [], levels)
    search.per_layer = per_layer
    if not (significance >= 0 and np.isfinite(significance)):
        raise ValueError(f"significance {significance}: must be a finite number >= 0; hint: --significance 2")
    search.sigmas = float(significance)
    search.check = check if significance > 0 else None
    began = time.perf_counter()
    fixed = settings.quantize.method if settings.quantize else settings.dtype
    reference_option = _Option(0.0, knob.target(0.0) if isinstance(knob, PlanKnob) else None,
                               "as given" if names is not None else fixed, None, 0, status="reference")
    if budget.latency_peer is not None:
        search.build_peer()
    reference, ok = search.build(model, settings, reference_option)
    if reference is None:
        raise BudgetError(f"the model as given does not export: {reference_option.status}")
    search.options.append(reference_option)
    if search.peer is not None:  # always: the pair anchors the latency table and sets the limit
        ok = search.confirm_beside_peer(reference, reference_option) and ok
    if ok:
        search.drop_peer()
        return reference, search.record(reference_option), plan
    if names is not None:
        hopeless = search.unreachable(reference)
        if hopeless is not None:
            shutil.rmtree(reference.folder, ignore_errors=True)
            search.drop_peer()
            if isinstance(knob, PlanKnob):
                knob.forget()
            raise hopeless
        t0 = time.perf_counter()
        transform = search.clipper_at(0.0, model)
        if precision_damage is not None:
            search.table = precision_damage
        elif estimator == "fisher":
            search.table = fisher_precision_estimate(model, calib, names, transform=transform)
        else:
            search.table = measure_precision_damage(model, calib, names, batch_size=EXPORT_BATCH_SIZE,
                                                    transform=transform)
        search.calibrate_node_overhead(reference)
        search.timings["precision_damage_s"] = round(time.perf_counter() - t0, 2)
        if budget.limits_latency:
            t0 = time.perf_counter()
            measured = _measured(reference)
            if reference_option.side_by_side:  # measured beside the peer: the same load as the limit's
                measured = reference_option.side_by_side["candidate"]
            search.latency = LatencyModel(LatencyTimer(settings.measure, names), model,
                                          {"decode": measured["decode_p50_ms"], "prefill": measured["prefill_p50_ms"]})
            search.timings["latency_table_s"] = round(time.perf_counter() - t0, 2)
    chosen_candidate, chosen = search.run(reference)
    search.timings["total_s"] = round(time.perf_counter() - began, 2)
    shutil.rmtree(reference.folder, ignore_errors=True)
    search.drop_peer()
    if isinstance(knob, PlanKnob):
        knob.forget()
    if chosen_candidate is None:
        raise search.error()
    chosen_plan = search.plans.get(chosen.t, plan) if chosen.t else plan
    return chosen_candidate, search.record(chosen), chosen_plan
