"""Float16 conversion a tensor at a time: ONNX Runtime's converter without the whole graph's
weights in memory (``export --low-memory --dtype float16``).

``onnxruntime.transformers.float16.convert_float_to_float16`` takes a ModelProto holding every
weight, converts each float32 initializer in place beside the others and, first of all, runs ONNX
shape inference on the model serialised whole, which fails outright above protobuf's 2 GiB. Of
a weight it needs only the data type and its readers: whether a node that stays float32 (its op
block list, or the inputs it keeps float for Resize / GroupNorm) or one converted to float16
reads it decides whether it is converted; its values only ever go through the per-tensor
clamping function ``convert_np_to_float16``.

So the converter runs here on the graph without its external float32 weights: shape inference
first, as the converter does, on the graph whose weights are still references to the data file
(ONNX Runtime's own path for graphs above 2 GiB infers shapes the same way), then the converter
with the weights swapped for empty stand-ins. A stand-in that comes back float16 is converted
from the source's data file by ``convert_np_to_float16`` a slice at a time (the function is
elementwise: the same bytes) straight into the destination's data file; one that stays float32
is copied file to file. Weights that a float32-keeping node reads, weights stored inline (a graph
under 2 GiB, already in memory) and attribute tensors are loaded and left to the converter itself.

The result is the whole-graph converter's, node for node and byte for byte
(tests/test_streamed_fp16.py checks it against ``convert_float_to_float16(onnx.load(src))``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cwca_export.exporter import postprocess as pp
from cwca_export.exporter.placeholders import initializer_tensors

SLICE_ELEMENTS = 1 << 22  # float32 values converted per call: 16 MiB in, a few times that in temporaries


def convert_fp16_streamed(src: Path, dst: Path) -> None:
    """:func:`~cwca_export.exporter.postprocess.convert_fp16` of ``src`` into ``dst`` (weights in
    ``dst.name + ".data"``), holding one slice of one weight at a time instead of the graph's."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data
    from onnx.shape_inference import infer_shapes
    from onnxruntime.transformers import float16

    model = onnx.load(str(src), load_external_data=False)
    pp.load_attribute_tensors(model.graph, src.parent)
    kept_float = _read_by_float32_nodes(model.graph, float16)
    streamed = set()
    for tensor in initializer_tensors(model.graph):
        if not uses_external_data(tensor):
            continue
        if tensor.data_type == onnx.TensorProto.FLOAT and tensor.name not in kept_float:
            streamed.add(tensor.name)
        else:  # what shape inference or the converter may read as values, as onnx.load gives it
            load_external_data_for_tensor(tensor, str(src.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    model = infer_shapes(model)  # the converter's first step, before the weights become stand-ins
    sources: dict[str, tuple[list[int], list[tuple[str, str]]]] = {}
    for tensor in initializer_tensors(model.graph):
        if tensor.name in streamed:
            sources[tensor.name] = (list(tensor.dims), [(e.key, e.value) for e in tensor.external_data])
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.dims[:]
            tensor.dims.append(0)  # no values: the converter only retypes it
    model = float16.convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
    with pp.DataFileWriter(dst.parent / (dst.name + ".data")) as writer:
        for tensor in initializer_tensors(model.graph):
            if tensor.name not in sources:
                writer.put(tensor, src.parent)
                continue
            dims, external = sources[tensor.name]
            del tensor.dims[:]
            tensor.dims.extend(dims)
            for key, value in external:
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            if tensor.data_type == onnx.TensorProto.FLOAT:  # the converter kept it float32
                writer.put(tensor, src.parent)
                continue
            path, offset, count = _location(tensor, src.parent)
            writer.put_pieces(tensor, _float16_slices(path, offset, count, float16.convert_np_to_float16), 2 * count)
    onnx.save_model(model, str(dst))


def _read_by_float32_nodes(graph: Any, float16: Any) -> set[str]:
    """Names that a node of an op the converter keeps float32 (or whose inputs it partly keeps
    float32) reads, in ``graph`` or any subgraph: their value infos carry the weight's shape."""
    ops = set(float16.DEFAULT_OP_BLOCK_LIST) | set(float16.ALWAYS_FLOAT_INPUTS)
    names = set()
    for node in graph.node:
        if node.op_type in ops:
            names.update(node.input)
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.g.ByteSize() else []) + list(attribute.graphs):
                names |= _read_by_float32_nodes(sub, float16)
    return names


def _location(tensor: Any, base: Path) -> tuple[Path, int, int]:
    """The file, offset and float32 element count of an external tensor's data."""
    import numpy as np
    from onnx.external_data_helper import ExternalDataInfo

    info = ExternalDataInfo(tensor)
    path, offset = base / info.location, int(info.offset or 0)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    length = path.stat().st_size - offset if info.length is None else int(info.length)
    if length != 4 * count:
        raise ValueError(f"{path}: {tensor.name} holds {length} bytes; float32 {list(tensor.dims)} takes {4 * count}")
    return path, offset, count


def _float16_slices(path: Path, offset: int, count: int, convert: Any) -> Iterator[bytes]:
    """The float16 bytes of ``count`` float32 values at ``offset`` in ``path``, converted by
    ``convert`` (the converter's ``convert_np_to_float16``) a slice at a time."""
    import numpy as np

    with open(path, "rb") as f:
        f.seek(offset)
        left = count
        while left:
            n = min(left, SLICE_ELEMENTS)
            values = np.frombuffer(f.read(4 * n), dtype="float32")
            if values.size != n:
                raise ValueError(f"{path}: external data ends early")
            yield convert(values).tobytes()
            left -= n
