"""One candidate artifact: backend export, fp32 verification, post-processing, final checks, measurement.

Everything happens inside a scratch folder that :class:`~cwca_export.atomic.Staging`
owns; the caller commits the folder or lets it vanish.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cwca_export.backends import UnsupportedModelError, available_backends, get_backend, weightless_export
from cwca_export.blocks import find_blocks
from cwca_export.budget import DTYPES
from cwca_export.exporter import postprocess as pp
from cwca_export.exporter.manifest import describe_model
from cwca_export.exporter.measure import MeasureConfig, file_inventory, measure_runtime
from cwca_export.exporter.placeholders import fill_initializers, map_weights, placeholder_weights, release_weights
from cwca_export.exporter.predict import scheme_of, weight_bytes
from cwca_export.exporter.session import DecoderSession, make_session
from cwca_export.exporter.streamed_fp16 import convert_fp16_streamed
from cwca_export.exporter.streamed_quantize import quantize_streamed
from cwca_export.exporter.verify import (
    TorchReference,
    VerificationError,
    check_generation,
    check_parity,
    check_runtime_generation,
    sample_inputs,
    torch_reference,
)
from cwca_export.planning.rounding import ROUNDINGS, Clipper, clipped_weights


@dataclass(frozen=True)
class ExportSettings:
    """How to turn a torch model into an artifact (everything but the model and the budget).

    Attributes:
        backend: registered backend name.
        backend_options: keyword options for the backend's ``export`` (e.g. ``with_past``).
        quantize: ONNX Runtime weight quantization, or None.
        dtype: ``fp32`` or ``fp16``.
        optimize: offline ORT graph optimisation level (``basic``/``extended``/``all``) or None.
        external_data_threshold: graph bytes above which weights go to ``model.onnx_data``.
        measure: workload and repetitions for memory and latency.
        new_tokens: greedy tokens compared against torch.
        precision: a per-layer precision plan, group name (``model.layers.3``, ``embed``,
            ``head``) -> storage format (``int4-b128``...; see :mod:`cwca_export.planning.precision`),
            applied per node and checked in the final graph. Excludes ``quantize``.
        rounding: how ``precision``'s integer formats round: ``rtn`` (ONNX Runtime's round to
            nearest on the weights as they are) or ``clip`` (each block clipped first where the
            calibration inputs say it lowers the output error, :mod:`cwca_export.planning.rounding`;
            :func:`build_candidate` then needs the inputs' moments).
        low_memory: trace with placeholder weights and write the real initialisers tensor by
            tensor (:mod:`cwca_export.exporter.placeholders`), then release the torch model's
            weights once its reference logits are taken: the host peak is about one fp32 copy
            of the weights. The model cannot compute afterwards. Backends with an export that
            traces alone only (``backends.weightless_export``: ``onnx`` and ``optimum``); not
            with a precision plan, whose final check recomputes torch with quantized weights.
    """

    backend: str = "optimum"
    backend_options: dict[str, Any] = field(default_factory=dict)
    quantize: pp.QuantizeConfig | None = None
    dtype: str = "fp32"
    optimize: str | None = None
    external_data_threshold: int = pp.PROTOBUF_LIMIT
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    new_tokens: int = 8
    precision: dict[str, str] | None = None
    rounding: str = "rtn"
    low_memory: bool = False

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding {self.rounding!r}: choose one of {ROUNDINGS}; hint: --rounding clip")
        if self.dtype == "fp16" and (self.quantize is not None or self.precision):
            raise ValueError("fp16 and int8/int4 quantization do not combine; hint: pick one of them")
        if self.quantize is not None and self.precision:
            raise ValueError("a precision plan and --quantize do not combine; hint: pick one of them")
        if self.optimize is not None and self.optimize not in pp.OPT_LEVELS:
            raise ValueError(f"optimize: level {self.optimize!r}: choose one of {pp.OPT_LEVELS}")
        if self.low_memory and self.precision:
            raise ValueError("low-memory export and a precision plan do not combine (its final check runs torch"
                             " with quantized weights); hint: drop --low-memory")
        if self.low_memory and weightless_export(get_backend(self.backend)) is None:
            raise ValueError(f"low-memory export: backend {self.backend} has no export that leaves the weights"
                             " out of its trace; hint: use --backend onnx")

    @property
    def scheme(self) -> str:
        return "mixed" if self.precision else scheme_of(self.dtype, self.quantize)


def prepacks(low_memory: bool, scheme: str) -> bool:
    """Whether ONNX Runtime sessions on a graph of ``scheme`` (checks, measurement) prepack its weights.

    Not under ``low_memory`` for a float graph: the prepacked copy would be the weights' float32
    bytes as the process's own memory (550M: 1,938 MiB against 22 MiB). A quantized graph's
    prepacked weights are its quantized bytes, and without prepacking it is not measured as it
    will run: at 550M a one-token x 16 forward took 0.099 s against 0.038 s for int8, 1.279 s
    against 0.159 s for int4 (docs/memory.md, "Quantizing a group at a time")."""
    return not low_memory or scheme not in DTYPES


@dataclass
class Candidate:
    """A verified, measured artifact in a scratch folder."""

    folder: Path
    model: Any
    settings: ExportSettings
    verification: dict[str, Any]
    postprocess: dict[str, Any]
    files: list[dict[str, Any]]
    measurement: dict[str, Any]
    prediction: dict[str, Any]
    description: dict[str, Any] | None = None  # the model's manifest record, taken before its weights went

    @property
    def model_path(self) -> Path:
        return self.folder / "model.onnx"

    @property
    def graph_bytes(self) -> int:
        return pp.graph_bytes(self.model_path)

    @property
    def disk_bytes(self) -> int:
        return sum(f["bytes"] for f in self.files)


SPILL_NAME = ".weights.spill"  # a low-memory export's float32 weights while it traces without them


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's ``malloc_trim``),
    so the next phase's peak starts from what is alive, not from what the last one left in
    the allocator's free lists (measured at 550M: 0.25-0.5 of an fp32 copy after the backend export)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl)
        return None


def return_large_frees() -> None:
    """Serve every allocation over 128 KiB from its own memory map, returned to the OS on free,
    and trim the heap's top past 128 KiB (glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD``,
    fixed). glibc otherwise raises both after each large free and serves later blocks from
    its heap, which keeps them: torch.onnx.export's shape inference copies each initialiser
    for a moment, and at 550M its peak rose 0.75-1.14 fp32 copies with 0.5 kept after (with
    the thresholds fixed before the model loads: 0.27, none kept). Set early: blocks already
    in the heap's free lists are reused as before. ``export --low-memory`` calls it first."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)


@contextlib.contextmanager
def fixed_mmap_threshold():
    """:func:`return_large_frees` for the block; on exit both thresholds go to glibc's ceilings
    for them (32 MiB and 64 MiB), about where the dynamic ones end after large frees."""
    return_large_frees()
    try:
        yield
    finally:
        libc = _libc()
        if libc is not None:
            libc.mallopt(-3, 32 * 1024 * 1024)
            libc.mallopt(-1, 64 * 1024 * 1024)


def unknown_options(export: Any, options: dict[str, Any]) -> list[str]:
    """The names in ``options`` that a backend's ``export`` takes no keyword for (none with ``**options``).

    Asked before any work, so that ``--no-kv-cache`` (``with_past``) or ``--opset`` given to a
    backend without them fails at once, not after the model was loaded, spilled and run."""
    import inspect

    try:
        parameters = inspect.signature(export).parameters
    except (TypeError, ValueError):  # a callable without a signature: its own TypeError says it
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return []
    return sorted(set(options) - set(parameters))


def check_backend(settings: ExportSettings, model: Any) -> None:
    """Before any work: the backend's refusal of ``model`` (``refusal(model)``, if it has one)
    and the options its export takes no keyword for (``--no-kv-cache``, ``--opset``), which would
    otherwise fail after the model was loaded, spilled and run."""
    backend = get_backend(settings.backend)
    refusal = getattr(backend, "refusal", None)
    reason = refusal(model) if callable(refusal) else None
    if reason:
        raise UnsupportedModelError(reason)
    unknown = unknown_options(weightless_export(backend) if settings.low_memory else backend.export,
                              settings.backend_options)
    if unknown:
        raise ValueError(f"backend {settings.backend!r} does not take option(s) {unknown};"
                         f" {_other_backends(settings.backend)}")


def _other_backends(name: str) -> str:
    others = [b for b in available_backends() if b != name]
    return f"hint: try another backend ({', '.join(others)})" if others else "hint: export with CWCA_DEBUG=1 and report the model type"


def _fail(what: str, settings: ExportSettings) -> VerificationError:
    return VerificationError(f"{settings.backend} artifact: {what}; nothing was written; {_other_backends(settings.backend)}")


def _verify(reference: TorchReference, model_path: Path, folder: Path, settings: ExportSettings, dtype: str,
            generation: bool, backend: Any) -> dict[str, Any]:
    ids, mask = reference.ids, reference.mask
    prepack = prepacks(settings.low_memory, dtype)
    try:
        decoder = DecoderSession(make_session(model_path, settings.measure.ep, threads=settings.measure.threads,
                                              prepack=prepack))
        # the torch side was taken before any session opened (the model may hold no weights now)
        report = {"parity": check_parity(reference, decoder, dtype, ids, mask)}
        if generation:
            report["generation"] = check_generation(reference, decoder, ids, mask, settings.new_tokens)
        # one ONNX Runtime session at a time: the raw session's weights go before the
        # runtime loader opens its own session on the same graph
        del decoder
        release_memory()
        if generation and callable(getattr(backend, "generate", None)):
            def runtime(i, m, n):
                return backend.generate(folder, i, m, n, settings.measure.ep, **({} if prepack else {"prepack": False}))
            report["generation"] = check_runtime_generation(
                reference, ids, mask, settings.new_tokens, runtime, report["generation"])
    except (ValueError, TypeError) as exc:
        if "execution provider" in str(exc) or "--ep" in str(exc):
            raise
        raise _fail(f"failed in ONNX Runtime ({str(exc).splitlines()[0]})", settings) from exc
    except Exception as exc:  # onnxruntime raises its own exception types
        raise _fail(f"failed in ONNX Runtime ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})", settings) from exc
    parity = report["parity"]
    if not parity["passed"]:
        raise _fail(
            f"{dtype} logits differ from torch (relative RMS {parity['rel_rms']:.3g} > tolerance {parity['tolerance']:g})",
            settings,
        )
    if generation and not report["generation"]["passed"]:
        raise _fail("greedy tokens differ from torch's in fp32", settings)
    return report


def _postprocess(model: Any, folder: Path, settings: ExportSettings) -> dict[str, Any]:
    raw = folder / "model.onnx"
    work = folder / ".work"
    work.mkdir()
    current, steps, excluded = raw, [], []
    if settings.optimize:
        pp.optimize_graph(current, work / "optimized.onnx", settings.optimize, prepack=not settings.low_memory)
        current = work / "optimized.onnx"
        steps.append(f"optimize:{settings.optimize}")
    if settings.dtype == "fp16":
        # one weight at a time, never the whole graph's weights; also the ordinary export's way
        # above 2 GiB, where the whole-graph converter's first step (serialising the model for
        # shape inference) fails: protobuf's limit (550M: EncodeError after 6 GiB)
        if settings.low_memory or pp.graph_bytes(current) > pp.PROTOBUF_LIMIT:
            convert_fp16_streamed(current, work / "fp16.onnx")
        else:
            pp.convert_fp16(current, work / "fp16.onnx")
        current = work / "fp16.onnx"
        steps.append("fp16")
    q = settings.quantize
    if q is not None:
        blocks = find_blocks(model)
        bad = [i for i in q.exclude_layers if not -len(blocks) <= i < len(blocks)]
        if bad:
            raise ValueError(f"quantize: exclude_layers {bad} out of range; the model has {len(blocks)} blocks")
        entries = [*q.exclude_nodes, *(blocks[i].name for i in q.exclude_layers)]
        excluded = pp.resolve_exclusions(current, entries)
        # a group of weight nodes at a time: never the whole graph's weights; and the way through a
        # graph ONNX Runtime's optimiser fused (--optimize extended / all), where the whole-graph
        # pass stops at shape inference of the fused ops ("Unable to find data type")
        if settings.low_memory or settings.optimize in ("extended", "all"):
            quantize_streamed(current, work / f"{q.method}.onnx", q, excluded)
        else:
            quantize = pp.quantize_int8 if q.method == "int8" else pp.quantize_int4
            quantize(current, work / f"{q.method}.onnx", q, excluded)
        current = work / f"{q.method}.onnx"
        if all(f == "fp32" for f in pp.graph_formats(current).values()):
            raise ValueError(f"quantize {q.method}: the exclusions leave no weight node to quantize; hint: narrow"
                             " --exclude / --exclude-layers, or drop --quantize")
        steps.append(q.method)
    precision = None
    if settings.precision:
        precision = apply_precision(model, current, work / "mixed.onnx", settings.precision)
        current = work / "mixed.onnx"
        steps.append("mixed")
    raw_external = pp.external_files(raw)
    external = pp.graph_bytes(current) > settings.external_data_threshold
    if steps or raw_external or external:
        pp.save_layout(current, work / "model.onnx", settings.external_data_threshold)
        for path in (raw, *raw_external):
            path.unlink()
        for name in ("model.onnx", pp.EXTERNAL_DATA_NAME):
            if (work / name).exists():
                (work / name).rename(folder / name)
    shutil.rmtree(work)
    return {
        "steps": steps,
        "optimize": settings.optimize,
        "dtype": settings.dtype,
        "quantize": None if q is None else {**q.to_dict(), "excluded_node_names": excluded},
        "precision": precision,
        "external_data": external,
        "external_data_threshold": settings.external_data_threshold,
    }


def apply_precision(model: Any, src: Path, dst: Path, groups: dict[str, str]) -> dict[str, Any]:
    """Quantize each group's weight nodes to its planned format; check the graph got them.

    Returns the record the manifest keeps: groups, every planned node's format, verified."""
    import onnx

    from cwca_export.planning.precision import StorageFormat, precision_groups

    known = {g.name: g for g in precision_groups(model)}
    unknown = sorted(set(groups) - set(known))
    if unknown:
        raise ValueError(f"precision plan: unknown group(s) {unknown}; the model has {sorted(known)}")
    graph = onnx.load(str(src), load_external_data=False)
    pp.untie_head(graph)
    nodes = pp.weight_nodes(graph)
    planned: dict[str, Any] = {}
    for name, fmt in groups.items():
        group = known[name]
        path = group.name if group.kind == "block" else group.modules[0]
        hits = pp.nodes_of_module(nodes, path)
        if not hits and fmt != "fp32":
            raise ValueError(f"precision plan: group {name} ({path}) matches no weight node in the exported graph")
        for node in hits:
            planned[node] = StorageFormat.parse(fmt)
    pp.quantize_mixed(src, dst, planned, untie="tied" not in groups)
    found = pp.graph_formats(dst)
    expected = {node: pp.canonical_format(f.name) for node, f in planned.items()}
    wrong = {n: (f, found.get(n)) for n, f in expected.items() if found.get(n) != f}
    if wrong:
        first = next(iter(wrong.items()))
        raise VerificationError(
            f"precision plan not applied: {len(wrong)} node(s) differ, e.g. {first[0]} planned {first[1][0]},"
            f" found {first[1][1]}; nothing was written"
        )
    return {"groups": dict(groups), "nodes": expected, "verified_in_graph": True}


def build_candidate(model: Any, tokenizer: Any, folder: Path, settings: ExportSettings,
                    clipper: Clipper | None = None) -> Candidate:
    """Export ``model`` into ``folder`` and prove it: fp32 parity and greedy tokens first, then
    the post-processed graph's parity at its dtype tolerance, then disk, memory and latency.

    With ``settings.rounding == "clip"`` and a precision plan, the weights are clipped for the
    export and its checks (``clipper``: :func:`cwca_export.planning.rounding.clipper_for`)
    and restored after."""
    if settings.low_memory:
        with fixed_mmap_threshold():
            return _build(model, tokenizer, folder, settings)
    if not (settings.precision and settings.rounding == "clip"):
        return _build(model, tokenizer, folder, settings)
    if clipper is None:
        raise ValueError("rounding clip needs calibration statistics; hint: pass --data, or --rounding rtn")
    from cwca_export.planning.precision import StorageFormat

    assignment = {g: StorageFormat.parse(f) for g, f in settings.precision.items()}
    with clipped_weights(model, assignment, clipper) as ratios:
        candidate = _build(model, tokenizer, folder, settings)
    candidate.postprocess["precision"]["rounding"] = {"method": "clip", "mean_clip_ratio": ratios}
    return candidate


def _build(model: Any, tokenizer: Any, folder: Path, settings: ExportSettings) -> Candidate:
    backend = get_backend(settings.backend)
    check_backend(settings, model)  # again: a plan applied since may have changed what it refuses
    spill, mapped = folder / SPILL_NAME, None
    if settings.low_memory:  # the weights become float32 pages of a scratch file, not the heap's
        mapped = map_weights(model, spill)
    # torch's side of every check, before any ONNX Runtime session opens
    ids, mask = sample_inputs(model.config.vocab_size)
    reference = torch_reference(model, ids, mask, settings.new_tokens,
                                generate=callable(getattr(backend, "generate", None)))
    description = describe_model(model) if settings.low_memory else None
    try:
        if settings.low_memory:
            # the weights leave memory before the trace: spilled to a scratch file as each is
            # swapped for its stand-in, then written into the traced graph's initialisers
            try:
                with placeholder_weights(model, spill, mapped) as stand_ins:
                    release_memory()
                    weightless_export(backend)(model, tokenizer, folder, **settings.backend_options)
                fill_initializers(folder / "model.onnx", stand_ins)
            finally:
                spill.unlink(missing_ok=True)
            del stand_ins
            release_weights(model)  # the artifact holds them now; the torch model is only shapes
        else:
            backend.export(model, tokenizer, folder, **settings.backend_options)
    except TypeError as exc:
        if "unexpected keyword" not in str(exc):
            raise
        raise ValueError(
            f"backend {settings.backend!r} does not take option(s) {sorted(settings.backend_options)}"
        ) from None
    release_memory()  # the exporter's traced graph and serialised proto
    raw = folder / "model.onnx"
    raw_bytes = pp.graph_bytes(raw)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and getattr(head, "weight", None) is embed.weight
    head_copy = pp.stored_head_copy_bytes(raw) if tied else 0
    verification = {"fp32": _verify(reference, raw, folder, settings, "fp32", True, backend)}
    release_memory()
    postprocess = _postprocess(model, folder, settings)
    release_memory()
    if settings.precision:
        from cwca_export.planning.precision import StorageFormat, quantized_weights

        assignment = {g: StorageFormat.parse(f) for g, f in settings.precision.items()}
        kind = "mixed-dynamic" if any(f.dynamic for f in assignment.values()) else "mixed"
        with quantized_weights(model, assignment):
            quantized = torch_reference(model, ids, mask)
        verification["final"] = _verify(quantized, raw, folder, settings, kind, False, backend)
    elif postprocess["steps"]:  # the same torch model: the same reference
        verification["final"] = _verify(reference, raw, folder, settings, settings.scheme, False, backend)
    files = file_inventory(folder)
    measurement = measure_runtime(raw, settings.measure)
    scheme = settings.scheme
    excluded = (postprocess["quantize"] or {}).get("excluded_node_names", [])
    if settings.precision:
        from cwca_export.planning.precision import artifact_weight_bytes

        weights = artifact_weight_bytes(model, settings.precision)
    else:
        weights = weight_bytes(model, scheme, settings.quantize, exclude=excluded)
    graph = pp.graph_bytes(raw)
    prediction = {
        "scheme": scheme,
        "weights_bytes": weights,
        "graph_bytes": graph,
        "overhead_bytes": graph - weights,
        "fp32_export_bytes": raw_bytes,
        # a tied head the backend stored as its own copy: not overhead, a second table (precision
        # plans that keep one table count it back, :mod:`cwca_export.exporter.search`)
        "head_copy_bytes": head_copy,
        "fp32_overhead_bytes": raw_bytes - weight_bytes(model, "fp32") - head_copy,
    }
    return Candidate(folder, model, settings, verification, postprocess, files, measurement, prediction, description)
