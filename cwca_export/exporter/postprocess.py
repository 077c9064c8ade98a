"""ONNX Runtime post-processing of an exported graph: optimisation, fp16, int8 / int4, layout.

Each step reads one ``.onnx`` file and writes another (external data allowed throughout, so
models over the 2 GB protobuf limit pass). The final :func:`save_layout` writes
``model.onnx`` with its weights inline, or in ``model.onnx_data`` when they exceed a threshold.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cwca_export.ort import require_onnxruntime

EXTERNAL_DATA_NAME = "model.onnx_data"
PROTOBUF_LIMIT = 2 * 1024**3  # a single ModelProto cannot exceed 2 GiB
OPT_LEVELS = ("basic", "extended", "all")
# ops whose constant weight the quantizers rewrite
_QUANTIZABLE = ("MatMul", "Gemm", "Gather")


def is_block_size(size: int) -> bool:
    """Whether int4 blocks of ``size`` weights are valid: a power of two >= 16 (MatMulNBits)."""
    return size >= 16 and not size & (size - 1)


@dataclass(frozen=True)
class QuantizeConfig:
    """ONNX Runtime weight quantization of the exported graph.

    Attributes:
        method: ``"int8"`` (``quantize_dynamic``: int8 weights, activations quantized per
            call; CPU) or ``"int4"`` (``MatMulNBitsQuantizer``: 4-bit weight-only blocks).
        exclude_nodes: nodes kept in float, by exact node name
            (``/lm_head/MatMul``) or module path (``lm_head``, ``model.layers.0.mlp``).
        exclude_layers: decoder block indices kept in float entirely.
        block_size: int4 only: weights sharing one scale (a power of two >= 16).
        symmetric: int4 only: no zero points.
        per_channel: int8 only: one scale per output channel instead of per tensor.
    """

    method: Literal["int8", "int4"]
    exclude_nodes: tuple[str, ...] = ()
    exclude_layers: tuple[int, ...] = ()
    block_size: int = 32
    symmetric: bool = True
    per_channel: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("int8", "int4"):
            raise ValueError(f"quantize: method {self.method!r}: choose 'int8' or 'int4'")
        if not is_block_size(self.block_size):
            raise ValueError(f"quantize: block_size {self.block_size} must be a power of two >= 16")

    @classmethod
    def coerce(cls, value: QuantizeConfig | str | None) -> QuantizeConfig | None:
        """Accept ``"int8"`` / ``"int4"`` shorthands, a config, or None."""
        if value is None or isinstance(value, QuantizeConfig):
            return value
        return cls(method=value)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _scope(node_name: str) -> str:
    # "/model/layers.0/mlp/down_proj/MatMul" -> ".model.layers.0.mlp.down_proj.MatMul."
    return "." + node_name.strip("/").replace("/", ".") + "."


def resolve_exclusions(model_path: Path, entries: Iterable[str]) -> list[str]:
    """Names of the quantizable nodes that ``entries`` select (node names or module paths).

    A module path selects every node under it, wherever the exporter nests it
    (``model.layers.0`` matches ``/model/layers.0/mlp/up_proj/MatMul``).
    """
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    names = [n.name for n in graph.node if n.op_type in _QUANTIZABLE]
    selected: list[str] = []
    for entry in entries:
        hits = [n for n in names if n == entry or f".{entry.strip('.')}." in _scope(n)]
        if not hits:
            example = next((n for n in names if "layers" in n or ".h." in _scope(n)), names[0] if names else "")
            raise ValueError(
                f"quantize exclusion {entry!r} matches no MatMul/Gemm/Gather node;"
                f" hint: use a module path like 'lm_head' or a node name like {example!r}"
            )
        selected += [h for h in hits if h not in selected]
    return selected


def optimize_graph(src: Path, dst: Path, level: str, *, prepack: bool = True) -> None:
    """Apply ONNX Runtime's offline graph optimisations (``basic`` / ``extended`` / ``all``).

    ``extended`` and ``all`` fuse into ORT-specific operators: the result runs only on ONNX
    Runtime, and ``all`` can be specific to the execution provider it was made for.
    ``prepack=False`` (``--low-memory``): the session that writes the graph does not prepack its
    MatMul weights, a copy of them it never uses (the graph written is the same).
    """
    ort = require_onnxruntime()
    if level not in OPT_LEVELS:
        raise ValueError(f"optimize: level {level!r}: choose one of {OPT_LEVELS}")
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", dst.name + ".data"
    )
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    if not prepack:
        from cwca_export.exporter.session import NO_PREPACKING

        options.add_session_config_entry(*NO_PREPACKING)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


def convert_fp16(src: Path, dst: Path) -> None:
    """Cast weights, activations and the KV cache to float16 (for GPU execution providers)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # constants are clamped to +-1e4, so attention masks built from finfo(float32).min stay finite
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=False)
    save_with_data(model, dst)


def quantize_int8(src: Path, dst: Path, config: QuantizeConfig, exclude: Sequence[str]) -> None:
    """int8 dynamic quantization (``onnxruntime.quantization.quantize_dynamic``)."""
    import onnx

    require_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # it rewrites each Gemm into a MatMul named <name>_MatMul before it reads the exclusions
    gemms = {n.name for n in onnx.load(str(src), load_external_data=False).graph.node if n.op_type == "Gemm"}
    exclude = [*exclude, *(f"{name}_MatMul" for name in exclude if name in gemms)]

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it warns on the root logger to run a pre-processing script
    try:
        quantize_dynamic(
            src,
            dst,
            weight_type=QuantType.QInt8,
            per_channel=config.per_channel,
            nodes_to_exclude=list(exclude),
            use_external_data_format=True,
        )
    finally:
        root.setLevel(level)


def quantize_int4(src: Path, dst: Path, config: QuantizeConfig, exclude: Sequence[str]) -> None:
    """int4 weight-only quantization into ``MatMulNBits`` nodes (needs the onnx-ir package)."""
    import onnx

    require_onnxruntime()
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quant_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quant_logger.level
    quant_logger.setLevel(logging.WARNING)  # it logs one INFO line per node
    try:
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(src)),
            block_size=config.block_size,
            is_symmetric=config.symmetric,
            nodes_to_exclude=list(exclude),
        )
        quantizer.process()
    finally:
        quant_logger.setLevel(level)
    save_with_data(quantizer.model.model, dst)


def save_with_data(model: Any, dst: Path) -> None:
    """Save ``model`` with every initializer of 1 KiB or more in ``dst.name + ".data"``.

    onnx appends to a data file that already exists, so one left by an earlier save of ``dst``
    (ONNX Runtime's ``quantize_dynamic`` writes the same name) would keep its tensors as dead
    bytes: it is replaced, once ``model`` is known not to read from it."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    data = dst.parent / (dst.name + ".data")
    if data.exists():
        if any(uses_external_data(t) for t in model.graph.initializer):
            raise ValueError(f"{data} exists and the graph to save still reads external data; load it first")
        data.unlink()
    onnx.save_model(
        model,
        str(dst),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=dst.name + ".data",
        size_threshold=1024,
    )


def external_files(model_path: Path) -> list[Path]:
    """Files holding ``model_path``'s external initializers (none for a self-contained graph)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(model_path), load_external_data=False)
    found: list[Path] = []
    for tensor in model.graph.initializer:  # exporters and ORT put external data only here
        if uses_external_data(tensor):
            location = next(e.value for e in tensor.external_data if e.key == "location")
            path = model_path.parent / location
            if path not in found:
                found.append(path)
    return found


def graph_bytes(model_path: Path) -> int:
    """``model_path`` plus its external data files, in bytes."""
    return model_path.stat().st_size + sum(p.stat().st_size for p in external_files(model_path))


def save_layout(src: Path, dst: Path, threshold: int = PROTOBUF_LIMIT) -> None:
    """Write ``dst`` (``model.onnx``) self-contained, or with ``model.onnx_data`` next to it.

    External data is used when the graph with its weights exceeds ``threshold`` bytes (the
    2 GiB protobuf limit by default; a small value exercises the same path on tiny models).
    The external layout is written one tensor at a time (:func:`stream_external_layout`);
    a self-contained graph is under 2 GiB by construction and is loaded whole.
    """
    import onnx

    if graph_bytes(src) > threshold:
        stream_external_layout(src, dst)
        return
    onnx.save_model(onnx.load(str(src)), str(dst))


def stream_external_layout(src: Path, dst: Path, size_threshold: int = 1024) -> None:
    """``onnx.save_model(onnx.load(src), dst, save_as_external_data=True, all_tensors_to_one_file=True,
    location=model.onnx_data, size_threshold=1024)``, byte for byte, holding one tensor's bytes at
    a time instead of every weight: each initializer (subgraphs' too) is read from where ``src``
    keeps it (its external file and offset, or inline) and appended to ``dst``'s data file."""
    import onnx

    from cwca_export.exporter.placeholders import initializer_tensors

    model = onnx.load(str(src), load_external_data=False)
    with DataFileWriter(dst.parent / EXTERNAL_DATA_NAME, size_threshold) as writer:
        for tensor in initializer_tensors(model.graph):
            writer.put(tensor, src.parent)
    load_attribute_tensors(model.graph, src.parent)
    onnx.save_model(model, str(dst))


class DataFileWriter:
    """Appends initializers to one external data file the way ``onnx.save_model(...,
    save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=...)`` lays them out,
    one tensor's bytes at a time.

    Bytes never pass through a proto that lives on (its arena would keep every tensor until the
    end): external data is copied file to file, inline data written and cleared."""

    _COPY_BYTES = 64 * 2**20

    def __init__(self, path: Path, size_threshold: int = 1024) -> None:
        import sys

        self.path, self.size_threshold = path, size_threshold
        self._empty = sys.getsizeof(b"")
        self._out = open(path, "xb")  # noqa: SIM115 - closed by __exit__

    def __enter__(self) -> DataFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._out.close()

    def put(self, tensor: Any, base: Path) -> None:
        """Move ``tensor``'s bytes (external to ``base``, or inline) into the file, or inline
        when shorter than the threshold, as ``onnx.load`` then ``save_model`` would leave it."""
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data

        out = self._out
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            source = base / info.location
            start = int(info.offset or 0)
            length = source.stat().st_size - start if info.length is None else int(info.length)
            if length + self._empty < self.size_threshold:
                with open(source, "rb") as f:
                    f.seek(start)
                    tensor.raw_data = f.read(length)
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
                return
            offset = out.tell()
            with open(source, "rb") as f:
                f.seek(start)
                left = length
                while left:
                    piece = f.read(min(left, self._COPY_BYTES))
                    if not piece:
                        raise ValueError(f"{source}: external data of {tensor.name} ends early")
                    out.write(piece)
                    left -= len(piece)
        elif tensor.HasField("raw_data") and len(tensor.raw_data) + self._empty >= self.size_threshold:
            offset = out.tell()
            out.write(tensor.raw_data)
            length = out.tell() - offset
        else:
            return
        self._point(tensor, offset, length)

    def put_pieces(self, tensor: Any, pieces: Iterable[bytes], length: int) -> None:
        """Write ``tensor``'s data, ``length`` bytes given in ``pieces`` (made as they are
        written, never held together), where :meth:`put` would put it: inline when shorter than
        the threshold, else appended to the file."""
        import onnx

        if length + self._empty < self.size_threshold:
            tensor.raw_data = b"".join(pieces)
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
            return
        offset = self._out.tell()
        for piece in pieces:
            self._out.write(piece)
        if self._out.tell() - offset != length:
            raise ValueError(f"{tensor.name}: {self._out.tell() - offset} bytes written, {length} expected")
        self._point(tensor, offset, length)

    def _point(self, tensor: Any, offset: int, length: int) -> None:
        import onnx

        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", offset), ("length", length)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        tensor.ClearField("raw_data")


def load_attribute_tensors(graph: Any, base: Path) -> None:
    """Attribute tensors kept as external data are read inline, as ``onnx.load`` would."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t") and uses_external_data(attribute.t):
                load_external_data_for_tensor(attribute.t, str(base))
            for tensor in attribute.tensors:
                if uses_external_data(tensor):
                    load_external_data_for_tensor(tensor, str(base))
            if attribute.g.ByteSize():
                load_attribute_tensors(attribute.g, base)
            for sub in attribute.graphs:
                load_attribute_tensors(sub, base)


# ---------------------------------------------------------------- per-node formats (precision plans)

MIXED_OPS = ("MatMulNBits", "GatherBlockQuantized")


def _initializers(graph: Any) -> dict[str, Any]:
    return {init.name: init for init in graph.initializer}


def untie_head(model: Any) -> list[str]:
    """Give every MatMul that reads a transposed initializer its own (transposed) initializer.

    Exporters of tied-embedding models compute the head's weight as ``Transpose(embedding)``
    at run time; weight quantizers only rewrite MatMuls whose weight is an initializer.
    Returns the MatMul node names rewired. Dead nodes are removed by :func:`prune_dead`.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = _initializers(graph)
    producers = {out: node for node in graph.node for out in node.output}
    rewired = []
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        source = producers.get(node.input[1])
        if source is None or source.op_type != "Transpose" or source.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in source.attribute if a.name == "perm"), None)
        value = numpy_helper.to_array(inits[source.input[0]])
        value = value.transpose(perm) if perm else value.T
        name = f"{source.input[0]}.untied_for.{node.name.strip('/').replace('/', '.')}"
        graph.initializer.append(numpy_helper.from_array(value.copy(), name))
        node.input[1] = name
        rewired.append(node.name)
    return rewired


def stored_head_copy_bytes(model_path: Path) -> int:
    """Bytes of a head weight stored as its own initializer holding an embedding table's
    transpose (the ``onnx`` backend writes a tied head that way; Optimum's graph reads the table
    through a ``Transpose`` node instead, 0 bytes)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    inits = _initializers(graph)
    tables = {tuple(inits[n.input[0]].dims) for n in graph.node
              if n.op_type == "Gather" and n.input and n.input[0] in inits and len(inits[n.input[0]].dims) == 2}
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
            dims = tuple(inits[node.input[1]].dims)
            if len(dims) == 2 and dims[::-1] in tables:
                size = onnx.helper.tensor_dtype_to_np_dtype(inits[node.input[1]].data_type).itemsize
                return size * dims[0] * dims[1]
    return 0


def prune_dead(model: Any) -> None:
    """Remove nodes whose outputs nothing reads, then initializers nothing reads (in place)."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for node in graph.node for i in node.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for node in graph.node for i in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    for value in [v for v in graph.input if v.name not in used and v.name in {i.name for i in graph.initializer}]:
        graph.input.remove(value)


def weight_nodes(model: Any) -> dict[str, str]:
    """Node name -> op type of every MatMul / Gather whose weight is an initializer."""
    graph = model.graph
    inits = _initializers(graph)
    found = {}
    for node in graph.node:
        matmul = node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits
        table = node.op_type == "Gather" and bool(node.input) and node.input[0] in inits
        if matmul or (table and len(inits[node.input[0]].dims) == 2):
            found[node.name] = node.op_type
    return found


def nodes_of_module(node_names: Iterable[str], module_path: str) -> list[str]:
    """Of ``node_names``, those the exporter nested under ``module_path``
    (``model.layers.0`` matches ``/model/layers.0/mlp/up_proj/MatMul``)."""
    key = f".{module_path.strip('.')}."
    return [n for n in node_names if key in _scope(n)]


def quantize_mixed(src: Path, dst: Path, node_formats: dict[str, Any], *, untie: bool = True) -> dict[str, str]:
    """Store each node's weight in its own format (``MatMulNBits``, ``GatherBlockQuantized``,
    dynamic int8 ``MatMulInteger`` / uint8 ``Gather``).

    Args:
        src, dst: graph in and out (``src`` must already be untied where the plan needs it:
            :func:`untie_head`).
        node_formats: node name -> :class:`cwca_export.planning.precision.StorageFormat` (fp32 nodes
            may be listed or left out).
        untie: give a head that reads the embedding through a Transpose its own copy first
            (:func:`untie_head`); False keeps one table: with the embedding in dynamic int8 the
            head then reads the uint8 table through Transpose and DequantizeLinear.

    One ONNX Runtime ``MatMulNBitsQuantizer`` pass per distinct block format quantizes exactly
    the nodes planned for it (every other weight node excluded), then one ``quantize_dynamic``
    pass the dynamic int8 nodes. Returns the planned node -> format name map that
    :func:`graph_formats` must find in ``dst``.
    """
    import tempfile

    import onnx

    require_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    before = weight_nodes(model)
    # untie only when a tied head or its table changes format (an fp32 pair stays one tensor)
    if untie and any(not f.is_float and before.get(n, "Gather") == "Gather" for n, f in node_formats.items()):
        untie_head(model)
        prune_dead(model)
    candidates = weight_nodes(model)
    node_formats = {n: f for n, f in node_formats.items() if n in candidates or not f.is_float}
    unknown = sorted(set(node_formats) - set(candidates))
    if unknown:
        raise ValueError(f"precision plan names nodes without a constant weight: {unknown[:3]}")
    blockwise: dict[Any, list[str]] = {}
    dynamic: list[str] = []
    for name, fmt in node_formats.items():
        if fmt.dynamic:
            dynamic.append(name)
        elif not fmt.is_float:
            blockwise.setdefault(fmt, []).append(name)
    quant_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    root = logging.getLogger()
    levels = quant_logger.level, root.level
    quant_logger.setLevel(logging.ERROR)  # one INFO line per node; an opset warning per pass
    root.setLevel(logging.ERROR)  # quantize_dynamic asks for a pre-processing script on the root logger
    try:
        for fmt, names in blockwise.items():
            gathers = [n for n in names if candidates[n] == "Gather"]
            if gathers and fmt.bits != 4:
                raise ValueError(f"{fmt.name}: embeddings take int8 or 4-bit formats only (ONNX Runtime's quantizers)")
            if gathers and fmt.int8_compute:
                raise ValueError(f"{fmt.name}: int8 compute is for MatMuls; an embedding computes nothing")
            exclude = [n for n in weight_nodes(model) if n not in names]
            quantizer = MatMulNBitsQuantizer(
                model, bits=fmt.bits, block_size=fmt.block_size, is_symmetric=fmt.symmetric,
                accuracy_level=4 if fmt.int8_compute else None,
                nodes_to_exclude=exclude, op_types_to_quantize=("MatMul", "Gather") if gathers else ("MatMul",),
            )
            with np.errstate(divide="ignore", invalid="ignore"):  # its np.where divides by zero scales
                quantizer.process()
            model = quantizer.model.model
        prune_dead(model)
        if dynamic and not untie:  # the Transpose feeding a tied head moves the uint8 table as it is
            tables = {model.graph.node[i].input[0] for i, node in enumerate(model.graph.node)
                      if node.name in dynamic and node.op_type == "Gather"}
            dynamic += [n.name for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in tables]
        if dynamic:
            with tempfile.TemporaryDirectory(dir=dst.parent) as scratch:
                step = Path(scratch) / "blockwise.onnx"
                save_with_data(model, step)
                quantize_dynamic(
                    step, dst, weight_type=QuantType.QInt8, nodes_to_quantize=dynamic,
                    op_types_to_quantize=["MatMul", "Gather"], use_external_data_format=True,
                    extra_options={"WeightSymmetric": True},
                )
                # it saves the shapes it inferred for every tensor (value_info): bytes that the other
                # formats' graphs do not carry and ONNX Runtime infers again at load
                quantized = onnx.load(str(dst))
                quantized.graph.ClearField("value_info")
                save_with_data(quantized, dst)
        else:
            save_with_data(model, dst)
    finally:
        quant_logger.setLevel(levels[0])
        root.setLevel(levels[1])
    return {name: fmt.name for name, fmt in node_formats.items()}


def graph_formats(model_path: Path) -> dict[str, str]:
    """Original node name -> storage format of every weight node in a final graph, read from
    the graph itself: ``MatMulNBits`` / ``GatherBlockQuantized`` attributes (bits, block size,
    zero points), ``MatMulInteger`` and Gathers of 8-bit tables (dynamic ``int8``), or fp32."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    inits = _initializers(graph)
    eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    found = {}
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in MIXED_OPS:
            base = re.sub(r"_Q\d+$", "", node.name)
            bits = int(attrs.get("bits", 4))
            asym = len(node.input) > 3 and bool(node.input[3])  # zero points: input 3 of both ops
            found[base] = (f"int{bits}-b{int(attrs['block_size'])}" + ("-asym" if asym else "")
                           + ("-a8" if int(attrs.get("accuracy_level", 0)) == 4 else ""))
        elif node.op_type == "MatMulInteger" and node.input[1] in inits:
            found[re.sub(r"_quant$", "", node.name)] = "int8"
        elif node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
            found[node.name] = "fp32"
        elif node.op_type == "Gather" and node.input and node.input[0] in inits and len(inits[node.input[0]].dims) == 2:
            found[node.name] = "int8" if inits[node.input[0]].data_type in eight_bit else "fp32"
    return found


def canonical_format(name: str) -> str:
    """``int4`` -> ``int4-b32``: the name :func:`graph_formats` reports for a format."""
    if name in ("fp32", "int8"):
        return name
    match = re.match(r"^int(\d)(?:-b(\d+))?(-asym)?(-a8)?$", name)
    if not match:
        return name
    return f"int{match.group(1)}-b{match.group(2) or 32}{match.group(3) or ''}{match.group(4) or ''}"
