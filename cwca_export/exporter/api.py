"""``export`` and ``Artifact``: a (compressed) torch model -> a verified ONNX artifact, fitted to a budget if given.

Example:
    >>> import cwca_export
    >>> art = cwca_export.export(model, None, "out/tiny-onnx", backend="onnx", quantize="int8")  # doctest: +SKIP
    >>> art.disk_bytes, art.latency_ms["decode"]["p50"], art.parity["rel_rms"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cwca_export.atomic import Staging
from cwca_export.budget import Budget
from cwca_export.compression import apply_plan
from cwca_export.exporter.build import Candidate, ExportSettings, build_candidate, check_backend, prepacks
from cwca_export.exporter.manifest import MANIFEST_NAME, build_manifest
from cwca_export.exporter.measure import MeasureConfig
from cwca_export.exporter.postprocess import PROTOBUF_LIMIT, QuantizeConfig
from cwca_export.exporter.predict import scheme_of
from cwca_export.jsonio import STAMP_KEY, write_json_atomic


@dataclass(frozen=True)
class Artifact:
    """A verified artifact folder and its manifest.

    Attributes:
        path: the artifact folder (``model.onnx``, config, tokenizer, ``cwca_manifest.json``).
        manifest: the parsed ``cwca_manifest.json``.
    """

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, path: str | os.PathLike) -> Artifact:
        """Read an artifact folder written by :func:`export`."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{path}: no {MANIFEST_NAME}; hint: not a cwca-export artifact") from None
        if isinstance(manifest, dict):
            manifest.pop(STAMP_KEY, None)  # the file's content stamp (cwca_export.jsonio), not part of the manifest
        return cls(path, manifest)

    @property
    def model_path(self) -> Path:
        """The ONNX graph (its external data, if any, lies next to it)."""
        return self.path / "model.onnx"

    @property
    def disk_bytes(self) -> int:
        """Bytes of every artifact file except the manifest."""
        return self.manifest["disk_bytes"]

    @property
    def resident_bytes(self) -> int | None:
        """Measured resident memory of the session at the budget's workload."""
        return self.manifest["measurement"]["resident_bytes"]

    @property
    def latency_ms(self) -> dict[str, Any]:
        """``{"prefill": {"p50", "p90", ...}, "decode": {...}}`` in milliseconds."""
        return self.manifest["measurement"]["latency_ms"]

    @property
    def parity(self) -> dict[str, Any]:
        """Logit parity of the final graph against torch."""
        verification = self.manifest["verification"]
        return verification.get("final", verification["fp32"])["parity"]


def _check_model(model: Any, *, widens: bool = False) -> None:
    """``widens``: a low-memory export without compression maps a bfloat16 / float16 model's
    weights to float32 itself (:func:`~cwca_export.exporter.placeholders.map_weights`)."""
    import torch

    # every parameter, not the first: a float32 embedding can stand in front of bfloat16 blocks
    allowed = {torch.float32, torch.bfloat16, torch.float16} if widens else {torch.float32}
    wrong = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype not in allowed})
    if wrong:
        raise ValueError(
            f"export starts from a float32 torch model, got {', '.join(wrong)} parameters; hint: load with"
            " dtype='float32' and pass dtype='fp16' for a half-precision artifact"
        )
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("export traces the model on the CPU; hint: model.to('cpu') first")
    # Per-block head counts (width compression with heads=True) are the backends' business:
    # ``onnx`` sizes each layer's KV cache from its block, ``optimum`` refuses such models.


def export(
    model: Any,
    plan: Any,
    out_dir: str | os.PathLike,
    *,
    backend: str = "optimum",
    quantize: QuantizeConfig | str | None = None,
    budget: Budget | None = None,
    tokenizer: Any = None,
    method: str | None = None,
    optimize: str | None = None,
    backend_options: dict[str, Any] | None = None,
    compress_options: dict[str, Any] | None = None,
    external_data_threshold: int = PROTOBUF_LIMIT,
    overwrite: bool = False,
    warmup: int = 3,
    runs: int = 10,
    threads: int = 0,
    new_tokens: int = 8,
    precision: dict[str, str] | None = None,
    formats: Any = None,
    calibration: Any = None,
    levels: int = 5,
    precision_estimate: str = "measured",
    search_options: dict[str, Any] | None = None,
    rounding: str = "clip",
    low_memory: bool = False,
) -> Artifact:
    """Export ``model`` to ONNX, verify it against torch, measure it, and write it atomically.

    Every export is checked in ONNX Runtime on the budget's execution provider: the fp32 graph
    must match torch's logits (relative RMS <= 1e-4) and greedy tokens (through the raw
    session and, for ``optimum``, through ``ORTModelForCausalLM.generate``); the
    post-processed graph must match at its dtype's tolerance. Disk bytes, resident memory and
    latency are measured and written to ``cwca_manifest.json``. With limits in ``budget``, the
    smallest compression that meets them is searched (:mod:`cwca_export.exporter.search`).

    Args:
        model: a float32 transformers causal LM on the CPU (compressed or not).
        plan: the :class:`~cwca_export.planning.plan.Plan` behind the model, recorded in the manifest;
            with ``method`` it is applied (and re-solved during a budget search). None: none.
        out_dir: the artifact folder; it appears complete or not at all.
        backend: a registered backend, ``"optimum"`` (default) or ``"onnx"``.
        quantize: ``"int8"``, ``"int4"`` or a :class:`QuantizeConfig`; a budget search may
            choose one when this is None.
        budget: limits and workload (batch, prompt length, context, provider, dtype).
        tokenizer: saved into the artifact when given.
        method: compression method that applies ``plan`` (needs ``cwca_export.compress``).
        optimize: offline ONNX Runtime graph optimisation: ``basic``, ``extended`` or ``all``.
        backend_options: extra options for the backend (``{"with_past": False}`` for ``onnx``).
        compress_options: keyword arguments for :func:`cwca_export.compress` when ``method``
            applies the plan, e.g. ``{"data": calibration}`` for ``width`` or ``wanda``.
        external_data_threshold: above these graph bytes, weights go to ``model.onnx_data``.
        overwrite: replace an existing ``out_dir`` (atomically); otherwise it is an error.
        warmup, runs, threads: latency measurement settings.
        new_tokens: greedy tokens compared with torch.
        precision: a per-layer precision plan (group -> format, see :mod:`cwca_export.planning.precision`),
            applied per node and checked in the graph; excludes ``quantize``.
        formats: the storage formats a budget search may plan (default: all CPU formats).
        calibration: token ids pricing a budget search's candidates (default: the ``data`` of
            ``compress_options``, else shipped text through ``tokenizer``); a ``CalibrationData``
            with ``held_out`` windows gives the search's significance test those windows.
        levels: structure levels a budget search tries (with ``method`` and ``plan``).
        precision_estimate: how a budget search prices each layer's formats: ``measured`` probes
            or the ``fisher`` estimate.
        search_options: further keywords for :func:`cwca_export.exporter.search.fit_budget`
            (``precision_damage=`` a table to reuse, ``per_layer=False`` for uniform storage).
        rounding: how per-layer integer formats round: ``clip`` (default; blocks clipped where
            the calibration inputs say it lowers the output error, :mod:`cwca_export.planning.rounding`)
            or ``rtn`` (ONNX Runtime's plain round to nearest). Fixed ``quantize`` is always RTN.
        low_memory: backends with a trace-only export (``onnx``, ``optimum``): the weights
            mapped from a float32 scratch file (a bfloat16 / float16 ``model`` is widened there
            when no ``method`` compresses it), a trace with placeholder weights, the float32
            initialisers written tensor by tensor, ``model``'s weights released once torch's
            reference logits are taken, and every ONNX Runtime session of a float32 graph
            without prepacking (weights read from the artifact's mapped file; a
            ``quantize``-d artifact's final sessions prepack, as it will be deployed). The
            process's own memory stays a fraction of one fp32 copy; the weights are file pages
            (docs/memory.md). The model object cannot compute afterwards. Not with budget
            limits or ``precision``.

    Returns:
        The committed :class:`Artifact`.

    Raises:
        VerificationError: the artifact does not reproduce the model (nothing is written).
        BudgetError: no setting meets the budget; the message gives the smallest reachable.
    """
    budget = budget or Budget()
    if method is not None and budget.has_limits:
        from cwca_export.compression.registry import get_method
        from cwca_export.exporter.search import dense_storage_message

        if get_method(method).dense_storage:
            raise ValueError(dense_storage_message(method))
    _check_model(model, widens=low_memory and not method)
    if low_memory and budget.has_limits:
        raise ValueError("low-memory export builds one artifact from the model, a budget search several;"
                         " hint: drop --low-memory or the limits")
    quantize = QuantizeConfig.coerce(quantize)
    settings = ExportSettings(
        backend=backend,
        backend_options=dict(backend_options or {}),
        quantize=quantize,
        dtype=budget.dtype,
        optimize=optimize,
        external_data_threshold=external_data_threshold,
        measure=MeasureConfig(
            ep=budget.ep, batch=budget.batch, prompt_len=budget.prompt_len, context=budget.context,
            warmup=warmup, runs=runs, threads=threads, prepack=prepacks(low_memory, scheme_of(budget.dtype, quantize)),
        ),
        new_tokens=new_tokens,
        precision=dict(precision) if precision else None,
        rounding=rounding,
        low_memory=low_memory,
    )
    check_backend(settings, model)  # before a plan compresses the model or a budget search prices it
    with Staging(out_dir, overwrite=overwrite) as staging:
        if budget.has_limits:
            from cwca_export.exporter.search import fit_budget

            candidate, search, plan = fit_budget(
                model, plan, tokenizer, settings, budget, staging, method, compress_options=compress_options,
                calibration=calibration, formats=formats, levels=levels, estimator=precision_estimate,
                **(search_options or {}),
            )
        else:
            compressed = apply_plan(model, plan, method, **(compress_options or {})) if method else model
            clipper = None
            if settings.precision and rounding == "clip":
                from cwca_export.exporter.search import calibration_ids
                from cwca_export.planning.rounding import clipper_for

                ids, _ = calibration_ids(tokenizer, compress_options or {}, calibration, model.config.vocab_size)
                clipper = clipper_for(compressed, ids)
            candidate = build_candidate(compressed, tokenizer, staging.new_folder(), settings, clipper)
            search = None
        manifest = _manifest(candidate, plan, budget, search)
        write_json_atomic(candidate.folder / MANIFEST_NAME, manifest)
        path = staging.commit(candidate.folder)
    return Artifact(path, manifest)


def _manifest(candidate: Candidate, plan: Any, budget: Budget, search: dict[str, Any] | None) -> dict[str, Any]:
    settings = candidate.settings
    budget_record = None
    if budget.has_limits:
        latency = candidate.measurement["latency_ms"]
        if budget.latency_peer is not None:  # decode is judged beside the peer, as the search did
            pair = search["chosen"]["side_by_side"]
            budget = replace(budget, max_latency_ms=pair["peer"]["decode_p50_ms"])
            latency = {**latency, "decode": {**latency["decode"], "p50": pair["candidate"]["decode_p50_ms"]}}
        check = budget.check(candidate.disk_bytes, candidate.measurement["resident_bytes"], latency)
        budget_record = {"limits": budget.to_dict(), **check, "search": search}
    return build_manifest(
        model=candidate.model,
        plan=plan,
        backend={"name": settings.backend, "options": settings.backend_options,
                 "traced_without_weights": settings.low_memory},
        postprocess=candidate.postprocess,
        files=candidate.files,
        verification=candidate.verification,
        measurement=candidate.measurement,
        prediction=candidate.prediction,
        budget=budget_record,
        structure=candidate.description,
    )
