"""Tracing without the weights: placeholder parameters, then the real initialisers written per tensor.

``torch.onnx.export`` constant-folds every Linear's transposed weight into a new tensor and
encodes them all: with the float32 model beside it, about 2.1 fp32 copies of the weights at
once (docs/memory.md, "export's phases"). Here every parameter of two or more dimensions is
swapped, for the trace only, for a zero-stride stand-in of the same shape and dtype whose
storage is one value per row: the traced graph and its node layout are the same (the
tracer records ops, not values), and the folded transposes of stand-ins cost nothing until
the exporter writes each one. Each stand-in carries a fingerprint, ``v`` in every row but
row 1 which holds ``v - 1``, so an initialiser read back from the written graph names its
parameter (its first element, ``v``) and whether the exporter transposed it (its second
element: ``v`` in row-major order of the parameter, ``v - 1`` of its transpose).
:func:`fill_initializers` then overwrites each such initialiser in place with the real
float32 values, a bounded chunk at a time (external data files at their recorded offsets, or
the inline proto of a graph under 2 GiB). Initialisers the exporter computed from real
tensors (norm weights, rotary tables, folded shapes) are left as written.

Only backends whose export reads no weight values after tracing can take this path (the
``onnx`` backend: ``torch.onnx.export`` alone; Optimum reloads and rewrites the whole graph).
A fingerprint the exporter folded into anything but the parameter or its transpose is an
error, never a silently wrong artifact; the artifact is verified against torch's logits
either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FINGERPRINT_BASE = 2.0**20  # stand-in values: -(2^20 + 4 i), exact in float32 up to ~3.9M parameters
CHUNK_BYTES = 64 * 2**20  # what one write of real values holds at most (plus one transposed block)


class PlaceholderError(ValueError):
    """The exporter turned a stand-in into something :func:`fill_initializers` cannot rebuild."""


@dataclass
class Placeholders:
    """The stand-ins of one trace: fingerprint value -> the real parameter behind it."""

    sources: dict[float, Any] = field(default_factory=dict)
    slots: list[tuple[Any, str, Any]] = field(default_factory=list)  # (module, name, real parameter)

    def match(self, name: str, dims: tuple[int, ...], first: float, second: float | None,
              last: float) -> tuple[Any, bool] | None:
        """(real parameter, transposed) for an initialiser whose first elements are these;
        None for one the exporter wrote from real values."""
        source = self.sources.get(first)
        if source is None:
            if -FINGERPRINT_BASE - 4 * len(self.sources) - 2 < first <= -FINGERPRINT_BASE:
                raise PlaceholderError(f"initializer {name}: a placeholder value the exporter changed")
            return None
        shape = tuple(source.shape)
        rows, cols = shape[0], int(np.prod(shape[1:], dtype=np.int64))
        expected_last = first - 1 if rows == 2 else first
        if dims == shape and (cols == 1 or second == first) and last == expected_last:
            return source, False
        if len(shape) == 2 and dims == shape[::-1] and (rows == 1 or second == first - 1) and last == expected_last:
            return source, True
        raise PlaceholderError(
            f"initializer {name} {list(dims)}: the exporter folded parameter {list(shape)} into something"
            " other than itself or its transpose"
        )


def _stand_in(param: Any, value: float) -> Any:
    import torch

    rows = param.shape[0]
    base = torch.full((rows,), value, dtype=param.dtype, device=param.device)
    if rows > 1:
        base[1] = value - 1
    view = base.view(rows, *([1] * (param.dim() - 1))).expand(param.shape)
    return torch.nn.Parameter(view, requires_grad=False)


@dataclass(frozen=True)
class Spilled:
    """A float32 parameter written to a scratch file: what :func:`fill_initializers` reads
    instead of the tensor once the model no longer holds it."""

    path: Path
    offset: int
    shape: tuple[int, ...]

    def rows_view(self) -> np.memmap:
        """The parameter as a (rows, rest) read-only map; drop it after each block so its pages
        leave the process's resident set."""
        rows = self.shape[0]
        return np.memmap(self.path, dtype="<f4", mode="r", offset=self.offset,
                         shape=(rows, int(np.prod(self.shape[1:], dtype=np.int64))))


def _spill(out: Any, param: Any) -> int:
    """Append ``param``'s values as float32 bytes to ``out`` a chunk at a time (a bfloat16 or
    float16 parameter widened exactly, chunk by chunk); its offset."""
    import torch

    offset = out.tell()
    flat = param.detach().reshape(-1)
    step = max(1, CHUNK_BYTES // 4)
    for start in range(0, flat.numel(), step):
        out.write(memoryview(flat[start:start + step].to(torch.float32).contiguous().numpy()).cast("B"))
    return offset


def map_weights(model: Any, spill: Path) -> dict[int, Spilled]:
    """Make ``model`` a float32 model whose weights live in ``spill``, not in its memory.

    Every floating parameter of two or more dimensions (float32, bfloat16 or float16) is
    written to the scratch file ``spill`` as float32, then replaced by a copy-on-write map of
    those bytes: the model computes exactly as one loaded in float32 would, but its weights
    are file pages the kernel can evict and read again, not memory of the process's own (a
    bfloat16 checkpoint loaded in float32 would be 4P bytes of it: docs/memory.md, "export
    --low-memory"). The other tensors (norms, biases, buffers: small) are copied, widened, into
    memory of their own, so the checkpoint's memory map is released.
    Returns id(mapped parameter) -> where its bytes lie, which :func:`placeholder_weights`
    reuses instead of writing them again."""
    import torch

    slots: list[tuple[Any, str, Any]] = []
    offsets: dict[int, tuple[int, tuple[int, ...]]] = {}
    with open(spill, "xb") as out:
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if param.dim() >= 2 and param.is_floating_point() and param.numel() >= 2:
                    if id(param) not in offsets:
                        offsets[id(param)] = (_spill(out, param), tuple(param.shape))
                    slots.append((module, name, param))
    mapped: dict[int, Any] = {}
    where: dict[int, Spilled] = {}
    # one map of the whole file (one descriptor, however many parameters); each parameter a view
    whole = np.memmap(spill, dtype=np.uint8, mode="c") if slots else None
    for module, name, param in slots:
        if id(param) not in mapped:
            offset, shape = offsets[id(param)]
            count = int(np.prod(shape, dtype=np.int64))
            values = whole[offset:offset + 4 * count].view("<f4").reshape(shape)
            mapped[id(param)] = torch.nn.Parameter(torch.from_numpy(values), requires_grad=False)
            where[id(mapped[id(param)])] = Spilled(spill, offset, shape)
        setattr(module, name, mapped[id(param)])
    del whole, slots
    _own_memory(model, skip=where, widen=True)  # the checkpoint's map goes with its last view
    if getattr(model, "config", None) is not None:
        model.config.dtype = torch.float32  # what a float32 load records (the artifact's config.json)
    return where


@contextlib.contextmanager
def placeholder_weights(model: Any, spill: Path | None = None,
                        mapped: dict[int, Spilled] | None = None) -> Iterator[Placeholders]:
    """Swap every float32 parameter of two or more dimensions for a fingerprinted stand-in
    (one value per row of memory).

    Without ``spill`` the real parameters go back on exit. With ``spill`` (a scratch file
    path) each one is written there and dropped from the model as it is swapped, so the
    trace runs without the weights in memory; the stand-ins stay on exit (the model can no
    longer compute) and :func:`fill_initializers` reads the file. A parameter shared by several
    modules (tied embeddings) gets one stand-in, shared the same way, so the exporter
    deduplicates it as it would the real one. ``mapped`` (from :func:`map_weights`, the same
    ``spill``) names parameters whose bytes are there already: they are not written again."""
    import torch

    found = Placeholders()
    made: dict[int, Any] = {}
    mapped = mapped or {}
    # appended to when map_weights wrote it; closed below, before the trace
    out = open(spill, "ab" if mapped else "xb") if spill is not None else None  # noqa: SIM115
    try:
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if param.dim() < 2 or param.dtype != torch.float32 or param.numel() < 2:
                    continue
                if id(param) not in made:
                    value = -(FINGERPRINT_BASE + 4 * len(made))
                    made[id(param)] = _stand_in(param, value)
                    if out is None:
                        found.sources[value] = param.detach()
                    elif id(param) in mapped:
                        found.sources[value] = mapped[id(param)]
                    else:
                        found.sources[value] = Spilled(spill, _spill(out, param), tuple(param.shape))
                found.slots.append((module, name, param if out is None else None))
                setattr(module, name, made[id(param)])
                del param
        if out is not None:
            out.close()
            if not mapped:  # map_weights gave them their own memory already
                _own_memory(model)
        yield found
    finally:
        if out is not None:
            out.close()
        for module, name, param in reversed(found.slots):
            if param is not None:
                setattr(module, name, param)


def _own_memory(model: Any, *, skip: Container[int] = (), widen: bool = False) -> None:
    """Give the tensors the stand-ins left (norm weights, biases, buffers: small) memory of their
    own: loaded from a safetensors file, every tensor is a view of one memory map, which stays
    mapped (and its touched pages resident) while any of them lives. Stand-ins and parameters whose
    id is in ``skip`` keep theirs; ``widen`` makes the copies of floating tensors float32."""
    import torch

    def own(t: Any) -> Any:
        wider = widen and t.is_floating_point() and t.dtype != torch.float32
        return t.to(torch.float32) if wider else t.clone()  # a dtype change copies too

    copies: dict[int, Any] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if 0 in param.stride() or id(param) in skip:
                continue
            if id(param) not in copies:
                copies[id(param)] = torch.nn.Parameter(own(param.detach()), requires_grad=param.requires_grad)
            setattr(module, name, copies[id(param)])
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None:
                setattr(module, name, copies.setdefault(id(buffer), own(buffer)))


def release_weights(model: Any) -> None:
    """Replace the model's float32 parameters of two or more dimensions by stand-ins for good:
    their shapes stay (predictions and structure read them) but their memory is freed, once
    nothing else holds them. The model cannot compute afterwards."""
    import torch

    made: dict[int, Any] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() < 2 or param.dtype != torch.float32 or param.numel() < 2:
                continue
            if id(param) not in made:
                made[id(param)] = _stand_in(param, float("nan"))
            setattr(module, name, made[id(param)])


def initializer_tensors(graph: Any) -> Iterator[Any]:
    """Every initializer of ``graph`` and of its subgraphs (the tensors onnx writes as external data)."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.g.ByteSize():
                yield from initializer_tensors(attribute.g)
            for sub in attribute.graphs:
                yield from initializer_tensors(sub)


def _external(tensor: Any) -> tuple[str, int, int | None]:
    from onnx.external_data_helper import ExternalDataInfo

    info = ExternalDataInfo(tensor)
    return info.location, int(info.offset or 0), None if info.length is None else int(info.length)


def _write_values(out: Any, source: Any, transposed: bool) -> int:
    """Write ``source`` (a tensor or a :class:`Spilled` parameter), or its transpose, as
    float32 row-major bytes, a bounded block at a time."""
    import torch

    written = 0
    spilled = isinstance(source, Spilled)
    rows = source.shape[0]
    count = int(np.prod(source.shape, dtype=np.int64))
    if not transposed:
        step = max(1, CHUNK_BYTES // 4)
        if spilled:
            with open(source.path, "rb") as f:
                f.seek(source.offset)
                for start in range(0, count, step):
                    written += out.write(f.read(4 * min(step, count - start)))
            return written
        flat = source.reshape(-1)
        with torch.no_grad():
            for start in range(0, count, step):
                piece = flat[start:start + step].contiguous().numpy()
                written += out.write(memoryview(piece).cast("B"))
        return written
    cols = count // rows
    step = max(1, CHUNK_BYTES // (4 * rows))
    for start in range(0, cols, step):  # output rows = source columns
        if spilled:
            view = source.rows_view()
            piece = np.ascontiguousarray(view[:, start:start + step].T)
            del view  # unmapped: its pages leave the resident set
        else:
            with torch.no_grad():
                piece = source[:, start:start + step].t().contiguous().numpy()
        written += out.write(memoryview(piece).cast("B"))
    return written


def fill_initializers(model_path: Path, stand_ins: Placeholders) -> int:
    """Overwrite every initialiser of ``model_path`` traced from a stand-in with the real
    float32 values (transposed where the exporter folded a transpose), in place: external
    data at its recorded file and offset, inline data by rewriting the proto (graphs under
    2 GiB). Returns the number of initialisers filled."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(model_path), load_external_data=False)
    base = model_path.parent
    filled, inline = 0, False
    for tensor in initializer_tensors(model.graph):
        if tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        count = int(np.prod(tensor.dims, dtype=np.int64))
        if count < 2:
            continue
        dims = tuple(int(d) for d in tensor.dims)
        if uses_external_data(tensor):
            location, offset, length = _external(tensor)
            if length is not None and length != 4 * count:
                continue
            with open(base / location, "rb") as f:
                f.seek(offset)
                head = np.frombuffer(f.read(8), dtype="<f4")
                f.seek(offset + 4 * (count - 1))
                tail = np.frombuffer(f.read(4), dtype="<f4")
        elif tensor.HasField("raw_data"):
            head = np.frombuffer(tensor.raw_data[:8], dtype="<f4")
            tail = np.frombuffer(tensor.raw_data[-4:], dtype="<f4")
        else:
            continue
        if len(head) < 2 or len(tail) < 1:
            continue
        hit = stand_ins.match(tensor.name, dims, float(head[0]), float(head[1]), float(tail[0]))
        if hit is None:
            continue
        source, transposed = hit
        if uses_external_data(tensor):
            with open(base / location, "r+b") as f:
                f.seek(offset)
                _write_values(f, source, transposed)
        else:
            import io

            buffer = io.BytesIO()
            _write_values(buffer, source, transposed)
            tensor.raw_data = buffer.getvalue()
            inline = True
        filled += 1
    if inline:
        onnx.save_model(model, str(model_path))
    return filled
