"""Per-group latency of each storage format, measured in ONNX Runtime (docs/design.md 5.2).

Bytes are exact before an artifact exists; latency is not: which kernel a format gets
(dynamic int8 ``MatMulInteger``, ``MatMulNBits`` at a block size, fp32 ``MatMul``) and what it
costs at the workload's shape depends on the provider, the CPU and the shapes. So, as HAQ's
hardware-aware lookup tables do, each group's weights are timed in each format on the runtime
itself: a small graph holding just that group's weight nodes (every Linear of a block fed
its own input, or the embedding's Gather, or the head's MatMul) is quantized with the same
:func:`~cwca_export.exporter.postprocess.quantize_mixed` pass an artifact gets, and run at
the budget's decode shape (batch B, one token) and prefill shape (B x prompt tokens).

A candidate's latency is then predicted as the reference artifact's measured latency plus,
per group, its format's time minus the reference's fp32 time for that group; the search
corrects the prediction by the errors it sees on the artifacts it builds
(:mod:`cwca_export.exporter.search`). Groups with the same shapes share one measurement, so
a model of identical blocks costs one small graph per format and level of structure.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROUNDS = 3  # timing rounds per graph; the least median of them is kept (robust to a busy machine)
WORKING_SET_CAP = 512 * 2**20  # fp32 bytes of block copies per timed graph (far past any CPU cache)


@dataclass
class LatencyTable:
    """Milliseconds of each group's weight nodes in each format, at decode and prefill.

    Attributes:
        groups: precision group names (``model.layers.0`` ..., ``embed``, ``head``, ``tied``).
        formats: format names, ``fp32`` first.
        decode_ms, prefill_ms: ``[group][format]``; None where the format does not apply.
        settings: the workload and provider timed.
    """

    groups: list[str]
    formats: list[str]
    decode_ms: list[list[float | None]]
    prefill_ms: list[list[float | None]]
    settings: dict[str, Any] = field(default_factory=dict)

    def delta(self, formats: dict[str, str], reference: LatencyTable | None = None,
              phase: str = "decode") -> float:
        """Milliseconds ``formats`` (group -> format; missing groups fp32) add to the fp32 groups
        of ``reference`` (default: this table), summed over groups. A plan holds either ``tied``
        or ``embed`` and ``head``; the reference's fp32 side counts the same groups."""
        reference = reference or self
        used = [g for g in self.groups if g != "tied"] if "tied" not in formats else [
            g for g in self.groups if g not in ("embed", "head")]
        total = 0.0
        for name in used:
            cost = self.cost(name, formats.get(name, "fp32"), reference, phase)
            if cost is None:
                raise ValueError(f"no latency measured for group {name} in {formats.get(name, 'fp32')}")
            total += cost
        return total

    def cost(self, name: str, fmt: str, reference: LatencyTable, phase: str = "decode") -> float | None:
        """Milliseconds group ``name`` in ``fmt`` adds to ``reference``'s fp32 group; None where
        either was not measured."""
        rows = self.decode_ms if phase == "decode" else self.prefill_ms
        ref_rows = reference.decode_ms if phase == "decode" else reference.prefill_ms
        value = rows[self.groups.index(name)][self.formats.index(fmt)] if fmt in self.formats else None
        base = ref_rows[reference.groups.index(name)][reference.formats.index("fp32")]
        return None if value is None or base is None else value - base

    def to_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, "formats": self.formats, "decode_ms": self.decode_ms,
                "prefill_ms": self.prefill_ms, "settings": self.settings}


def group_graph(kind: str, shapes: Sequence[tuple[int, int]], copies: int = 1, opset: int = 17) -> Any:
    """An ONNX graph of one group's weight nodes: per Linear ``(out, in)`` an input ``x{i}``
    (batch, tokens, in) and ``MatMul(x{i}, W^T)`` for each of ``copies`` distinct weights; an
    embedding a ``Gather`` of ``ids``; a tied table both, the head reading the table through a
    ``Transpose`` as exported graphs do."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inputs, outputs, inits = [], [], [], []

    def weight(name: str, shape: tuple[int, ...]) -> None:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.02).astype(np.float32), name))

    if kind in ("embed", "tied"):
        rows, dim = shapes[0]
        weight("table", (rows, dim))
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "tokens"]))
        nodes.append(helper.make_node("Gather", ["table", "ids"], ["embedded"], name="/embed/Gather"))
        outputs.append(helper.make_tensor_value_info("embedded", TensorProto.FLOAT, None))
        if kind == "tied":
            inputs.append(helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["batch", "tokens", dim]))
            nodes.append(helper.make_node("Transpose", ["table"], ["table_t"], name="/head/Transpose", perm=[1, 0]))
            nodes.append(helper.make_node("MatMul", ["x0", "table_t"], ["y0"], name="/head/MatMul"))
            outputs.append(helper.make_tensor_value_info("y0", TensorProto.FLOAT, None))
    else:
        for i, (out, inp) in enumerate(shapes):
            inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, ["batch", "tokens", inp]))
            for c in range(copies):
                weight(f"w{c}_{i}", (inp, out))
                nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{c}_{i}"], [f"y{c}_{i}"],
                                              name=f"/g{c}/lin{i}/MatMul"))
                outputs.append(helper.make_tensor_value_info(f"y{c}_{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "group", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # what ONNX Runtime 1.16 and later load (onnx's default may be newer)
    return model


def _feeds(session: Any, batch: int, tokens: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    feeds = {}
    for i in session.get_inputs():
        if i.name == "ids":
            feeds[i.name] = rng.integers(0, vocab, (batch, tokens), dtype=np.int64)
        else:
            feeds[i.name] = rng.standard_normal((batch, tokens, i.shape[-1])).astype(np.float32)
    return feeds


def time_session(session: Any, feeds: dict[str, np.ndarray], *, warmup: int, runs: int) -> float:
    """Least over :data:`ROUNDS` rounds of the median of ``runs`` timed calls
    (:func:`cwca_export.exporter.measure.timed`), in ms; warm-up before the first round only."""
    from cwca_export.exporter.measure import timed

    return min(timed(session, feeds, warmup if r == 0 else 0, runs)["p50"] for r in range(ROUNDS))


class LatencyTimer:
    """Times groups in formats, caching by (kind, shapes, format) across structure levels."""

    def __init__(self, measure: Any, formats: Sequence[str], *, runs: int | None = None) -> None:
        from cwca_export.planning.precision import StorageFormat

        self.measure = measure
        self.formats = ["fp32", *[f for f in formats if f != "fp32"]]
        self.parsed = {f: StorageFormat.parse(f) for f in self.formats}
        self.runs = runs if runs is not None else max(20, measure.runs)
        self.cache: dict[tuple, tuple[float | None, float | None]] = {}
        self.seconds = 0.0

    def time_group(self, group: Any, fmt: str, copies: int = 1) -> tuple[float | None, float | None]:
        """(decode ms, prefill ms) of ``group`` stored as ``fmt``; None where it does not apply.

        A block is timed as ``copies`` blocks of distinct weights, divided by ``copies``: a
        real artifact reads every block's weights once per token, so a block's weights are
        not in the CPU's caches when its turn comes, and one block timed alone would be."""
        key = (group.kind, tuple(group.shapes), fmt, copies)
        if key not in self.cache:
            began = time.perf_counter()
            allowed = group.allows(self.parsed[fmt])
            self.cache[key] = self._measure(group, self.parsed[fmt], copies) if allowed else (None, None)
            self.seconds += time.perf_counter() - began
        return self.cache[key]

    def _measure(self, group: Any, fmt: Any, copies: int) -> tuple[float, float]:
        import onnx

        from cwca_export.exporter import postprocess as pp
        from cwca_export.exporter.session import make_session

        graph = group_graph(group.kind, group.shapes, copies)
        with tempfile.TemporaryDirectory() as scratch:
            src, dst = Path(scratch) / "fp32.onnx", Path(scratch) / "group.onnx"
            onnx.save(graph, str(src))
            if fmt.is_float:
                dst = src
            else:
                quantized = [n for n in pp.weight_nodes(graph) if not (group.kind == "head" and "Gather" in n)]
                pp.quantize_mixed(src, dst, {n: fmt for n in quantized}, untie=group.kind != "tied")
            session = make_session(dst, self.measure.ep, threads=self.measure.threads)
            vocab = group.shapes[0][0]
            m = self.measure
            decode = time_session(session, _feeds(session, m.batch, 1, vocab), warmup=m.warmup, runs=self.runs)
            prefill = time_session(session, _feeds(session, m.batch, m.prompt_len, vocab), warmup=m.warmup,
                                   runs=max(5, self.runs // 4))
        return decode / copies, prefill / copies

    def table(self, model: Any) -> LatencyTable:
        """The table of ``model``'s precision groups (its current shapes) in every format."""
        from cwca_export.planning.precision import precision_groups

        groups = precision_groups(model)
        blocks = [g for g in groups if g.kind == "block"]
        block_bytes = sum(4 * o * i for g in blocks for o, i in g.shapes)
        decode, prefill = [], []
        for group in groups:
            copies = 1
            if group.kind == "block":
                own = 4 * sum(o * i for o, i in group.shapes)
                copies = max(1, min(round(block_bytes / max(own, 1)), WORKING_SET_CAP // max(own, 1)))
            row = [self.time_group(group, f, copies) for f in self.formats]
            decode.append([r[0] for r in row])
            prefill.append([r[1] for r in row])
        m = self.measure
        settings = {"ep": m.ep, "batch": m.batch, "prompt_len": m.prompt_len, "threads": m.threads,
                    "runs": self.runs, "rounds": ROUNDS, "statistic": "least median of the rounds"}
        return LatencyTable([g.name for g in groups], list(self.formats), decode, prefill, settings)


class LatencyModel:
    """A candidate's decode and prefill latency, predicted from the reference artifact.

    predicted = the reference's measured p50 + the table's delta of the candidate's formats
    and shapes against the reference's fp32 groups + the mean error seen on the candidates
    built so far (measured minus predicted, per phase): the table times each group alone, so
    what it leaves out (the attention, the KV cache, fusions across groups) is in the
    reference's measurement, and what it gets wrong systematically is corrected as the
    search measures.
    """

    PHASES = ("decode", "prefill")

    def __init__(self, timer: LatencyTimer, model: Any, reference_ms: dict[str, float]) -> None:
        self.timer = timer
        self.reference = timer.table(model)
        self.reference_ms = dict(reference_ms)
        self.errors: dict[str, list[float]] = {p: [] for p in self.PHASES}
        self._tables: dict[int, tuple[Any, LatencyTable]] = {}

    def table(self, model_t: Any) -> LatencyTable:
        """The table of ``model_t``'s shapes (one level of structure at a time is kept)."""
        key = id(model_t)
        if key not in self._tables:
            self._tables = {key: (model_t, self.timer.table(model_t))}  # keeps model_t alive while cached
        return self._tables[key][1]

    def bias(self, phase: str) -> float:
        errors = self.errors[phase]
        return float(np.mean(errors)) if errors else 0.0

    def raw(self, model_t: Any, formats: dict[str, str]) -> dict[str, float]:
        """The prediction before the bias correction."""
        table = self.table(model_t)
        return {p: self.reference_ms[p] + table.delta(formats, self.reference, p) for p in self.PHASES}

    def predict(self, model_t: Any, formats: dict[str, str]) -> dict[str, float]:
        """``{"decode": ms, "prefill": ms}`` for ``model_t`` stored as ``formats``."""
        return {p: v + self.bias(p) for p, v in self.raw(model_t, formats).items()}

    def rows(self, model_t: Any, limits: dict[str, float | None], groups: list[str],
             formats: list[str]) -> list[tuple[list[list[float | None]], float]]:
        """The precision program's latency rows, ``[g][f]`` in the order of ``groups`` and
        ``formats`` (the damage table's): the ms each choice adds to the reference's fp32
        group, capped by each limit minus the reference's measured p50 and the bias."""
        table = self.table(model_t)
        return [([[table.cost(name, f, self.reference, phase) for f in formats] for name in groups],
                 limit - self.reference_ms[phase] - self.bias(phase))
                for phase, limit in limits.items() if limit is not None]

    def observe(self, raw: dict[str, float], measured: dict[str, float]) -> None:
        """Record a built candidate's error: measured minus the raw prediction."""
        for p in self.PHASES:
            self.errors[p].append(measured[p] - raw[p])
