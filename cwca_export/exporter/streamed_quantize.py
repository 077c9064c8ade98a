"""Weight quantization a group of nodes at a time: ONNX Runtime's quantizers without the whole
graph in memory (``export --low-memory --quantize``).

ONNX Runtime's quantizers take a ModelProto holding every weight and build the quantized graph
beside it: ``quantize_dynamic`` peaked at 3.04 float32 copies of the weights at 550M, which
projects to 76 GiB for a 7B export (docs/memory.md, "export --low-memory"). Here the graph is read
without its weights and its weight nodes (MatMul, Gemm, Gather or Transpose reading a float
initializer) are split into groups that pass no tensor between them: the q, k and v projections
read one activation, which dynamic int8 quantizes once for the three. Each group becomes a graph of its
own, its weights read from the source's data file, and goes through the same quantizer call with
the same options as the whole graph would
(:func:`~cwca_export.exporter.postprocess.quantize_int8` / ``quantize_int4``). Its nodes take the
group's place and its initializers are appended to the destination's data file at once, so the
process holds one group's weights a few times over (at 7B the largest, the embedding or the
head, is 524 MB in float32; gate and up together 361 MB), never the model's.

The result is the whole-graph quantizer's, node for node and byte for byte
(tests/test_streamed_quantize.py checks it against ONNX Runtime's own pass).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cwca_export.exporter import postprocess as pp
from cwca_export.exporter.placeholders import initializer_tensors

# ops whose float initializer ONNX Runtime's int8 / int4 passes may rewrite; Transpose because
# dynamic int8 moves a quantized table through it as it is
WEIGHT_OPS = ("MatMul", "Gemm", "Gather", "Transpose")


def weight_groups(graph: Any) -> list[list[int]]:
    """Indices into ``graph.node`` of the weight nodes, grouped so that no tensor passes between
    two groups (union of nodes sharing an input, or one reading what another writes), each in
    graph order. A Transpose reading a weight node's output is one too: dynamic int8 hands a
    quantized Gather's rows to the nodes reading them as they are (a MatMul reuses them as its
    quantized input, a Transpose moves them), so those nodes must see the Gather's quantization."""
    import onnx

    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    weights = {t.name for t in graph.initializer if t.data_type in floats}
    members, made = [], set()
    for k, node in enumerate(graph.node):
        reads = set(node.input)
        if node.op_type in WEIGHT_OPS and (reads & weights or (node.op_type == "Transpose" and reads & made)):
            members.append(k)
            made.update(filter(None, node.output))
    parent = {k: k for k in members}

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    reader: dict[str, int] = {}
    for k in members:
        for name in filter(None, (*graph.node[k].input, *graph.node[k].output)):
            if name in reader:
                parent[root(k)] = root(reader[name])
            else:
                reader[name] = k
    groups: dict[int, list[int]] = {}
    for k in members:
        groups.setdefault(root(k), []).append(k)
    return sorted(groups.values())


def quantize_streamed(src: Path, dst: Path, config: pp.QuantizeConfig, exclude: Sequence[str]) -> None:
    """:func:`~cwca_export.exporter.postprocess.quantize_int8` / ``quantize_int4`` of ``src`` into
    ``dst`` (weights in ``dst.name + ".data"``), one weight group at a time."""
    import onnx

    quantize = pp.quantize_int8 if config.method == "int8" else pp.quantize_int4
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    skip = set(exclude)
    if config.method == "int4":  # MatMulNBitsQuantizer reaches into If / Loop / Scan branches; this pass does not
        inside = [name for name in _branch_matmuls(graph, [graph]) if name not in skip]
        if inside:
            raise ValueError(f"quantize int4: MatMul {inside[0]!r} sits in an If/Loop/Scan subgraph, which the"
                             " group-at-a-time quantizer of --low-memory does not reach; hint: drop --low-memory")
    groups = weight_groups(graph)
    originals = {t.name: t for t in graph.initializer}
    taken = _tensor_names(graph)
    replacements: dict[int, list[Any]] = {}
    added: list[Any] = []
    shared: dict[str, Any] = {}  # name -> initializer an earlier group's quantizer made
    rewritten: set[str] = set()  # names the groups' quantized graphs hold (source weights among them)
    readers: dict[str, set[int]] = {o.name: {-1} for o in graph.output}  # -1: the graph's own output
    for k, node in enumerate(graph.node):
        for name in (*node.input, *_subgraph_reads(node)):
            readers.setdefault(name, set()).add(k)
    opsets = {o.domain: o.version for o in model.opset_import}
    with pp.DataFileWriter(dst.parent / (dst.name + ".data")) as writer, \
            tempfile.TemporaryDirectory(dir=dst.parent, prefix=".group-") as scratch:
        work = Path(scratch)
        for group in groups:
            nodes = [graph.node[k] for k in group]
            outside = {o for k in group for o in graph.node[k].output if readers.get(o, set()) - set(group)}
            alone = _group_model(model, nodes, originals, src.parent, outside)
            pp.save_with_data(alone, work / "group.onnx")
            del alone
            # excluded nodes go through it too, excluded: int8 rewrites every Gemm into MatMul + Add first
            quantize(work / "group.onnx", work / "quantized.onnx", config, [n.name for n in nodes if n.name in skip])
            quantized = onnx.load(str(work / "quantized.onnx"), load_external_data=False)
            own = {i for node in nodes for i in node.input} | {o for node in nodes for o in node.output}
            # a constant the quantizer shares between nodes (opset 10's fixed_zero) is made again, the same
            again = {t.name for t in quantized.graph.initializer if _same_inline(t, shared.get(t.name))}
            new = [n for node in quantized.graph.node for n in node.output]
            new += [t.name for t in quantized.graph.initializer if t.name not in again]
            clash = sorted(n for n in new if n in taken and n not in own)
            if clash:
                raise RuntimeError(f"streamed quantization: the group of {nodes[0].name} makes names the graph has:"
                                   f" {clash[:3]}")
            taken.update(new)
            for tensor in quantized.graph.initializer:
                if tensor.name not in again:
                    # a source weight comes back too: int8 may have rewritten it under its name (an
                    # excluded Gemm's transB weight, transposed in place), so the group's copy replaces it
                    writer.put(tensor, work)
                    added.append(tensor)
                    shared[tensor.name] = tensor
                    rewritten.add(tensor.name)
            replacements[group[0]] = list(quantized.graph.node)
            for opset in quantized.opset_import:
                opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
            for name in ("group.onnx", "quantized.onnx"):
                for path in (work / name, work / (name + ".data")):
                    path.unlink(missing_ok=True)
        _splice(graph, groups, replacements)
        used = _referenced(graph)
        # a weight a group now computes (int8 dequantizes a table an excluded node reads, under its name)
        made = {o for node in graph.node for o in node.output}
        kept = [t for t in graph.initializer if t.name in used and t.name not in rewritten and t.name not in made]
        dropped = {t.name for t in graph.initializer} - {t.name for t in kept} - rewritten
        graph.ClearField("initializer")
        graph.initializer.extend(kept)  # copies: written below through the graph's own
        for tensor in initializer_tensors(graph):
            writer.put(tensor, src.parent)
        graph.initializer.extend(added)
    for field in (graph.input, graph.value_info):
        for value in [v for v in field if v.name in dropped]:
            field.remove(value)
    del model.opset_import[:]
    for domain, version in opsets.items():
        model.opset_import.add(domain=domain, version=version)
    pp.load_attribute_tensors(graph, src.parent)
    onnx.save_model(model, str(dst))


def _group_model(model: Any, nodes: list[Any], originals: dict[str, Any], base: Path, outside: set[str]) -> Any:
    """A graph of ``nodes`` alone: their initializers read from ``base``, their other inputs as
    graph inputs, as graph outputs those they do not consume themselves and those ``outside`` (read
    by the rest of the graph: a quantized one is dequantized for it)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    graph = model.graph
    known = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}
    made = {o for node in nodes for o in node.output}
    read = list(dict.fromkeys(i for node in nodes for i in node.input if i))
    weights = []
    for name in (n for n in read if n in originals):
        tensor = onnx.TensorProto()
        tensor.CopyFrom(originals[name])
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(base))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
        weights.append(tensor)
    element = weights[0].data_type

    def declared(name: str, fallback: int) -> Any:
        if name in known:
            return known[name]
        return onnx.helper.make_tensor_value_info(name, fallback, None)

    indices = {node.input[1] for node in nodes if node.op_type == "Gather" and len(node.input) > 1}
    inputs = [declared(n, onnx.TensorProto.INT64 if n in indices else element)
              for n in read if n not in originals and n not in made]
    consumed = set(read)
    outputs = [declared(o, element) for node in nodes for o in node.output if o and (o not in consumed or o in outside)]
    alone = onnx.helper.make_graph(list(nodes), "group", inputs, outputs, weights)
    return onnx.helper.make_model(alone, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _splice(graph: Any, groups: list[list[int]], replacements: dict[int, list[Any]]) -> None:
    """Each group's quantized nodes where its first node stood (its outputs keep their names), the
    group's other nodes dropped, then put back in topological order: a group's later node may read
    what nodes after its first one make (a weight shared by two layers)."""
    grouped = {k for group in groups for k in group}
    nodes = []
    for k, node in enumerate(graph.node):
        if k in replacements:
            nodes.extend(replacements[k])
        elif k not in grouped:
            nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(_topological(nodes))


def _topological(nodes: list[Any]) -> list[Any]:
    """``nodes`` in an order where each comes after the nodes making what it reads (its subgraphs'
    outer reads too), otherwise as given (the order itself when it already is one)."""
    import heapq

    made = {o: k for k, node in enumerate(nodes) for o in node.output if o}
    needs = []
    for k, node in enumerate(nodes):
        reads = set(node.input) | _subgraph_reads(node)
        needs.append({made[n] for n in reads if n in made and made[n] != k})
    if all(j < k for k, before in enumerate(needs) for j in before):
        return nodes
    waiting = [len(before) for before in needs]
    after: list[list[int]] = [[] for _ in nodes]
    for k, before in enumerate(needs):
        for j in before:
            after[j].append(k)
    ready = [k for k, n in enumerate(waiting) if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for m in after[k]:
            waiting[m] -= 1
            if not waiting[m]:
                heapq.heappush(ready, m)
    order += [k for k in range(len(nodes)) if waiting[k]]  # a cycle: left as it was, for ONNX Runtime to name
    return [nodes[k] for k in order]


def _tensor_names(graph: Any) -> set[str]:
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    return names | {o for node in graph.node for o in node.output}


def _same_inline(tensor: Any, other: Any) -> bool:
    """Both tensors held inline with the same type, shape and values."""
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    if other is None or uses_external_data(tensor) or uses_external_data(other):
        return False
    if tensor.data_type != other.data_type or list(tensor.dims) != list(other.dims):
        return False
    return numpy_helper.to_array(tensor).tobytes() == numpy_helper.to_array(other).tobytes()


def _branch_matmuls(graph: Any, scope: list[Any]) -> list[str]:
    """Names of the MatMuls in ``graph``'s subgraphs whose weight is an initializer of their own
    graph or one enclosing it (ONNX Runtime's int4 pass quantizes those)."""
    import onnx

    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    found = []
    for node in graph.node:
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.g.ByteSize() else []) + list(attribute.graphs):
                inner = [*scope, sub]
                weights = {t.name for g in inner for t in g.initializer if t.data_type in floats}
                found += [n.name for n in sub.node
                          if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in weights]
                found += _branch_matmuls(sub, inner)
    return found


def _subgraph_reads(node: Any) -> set[str]:
    """Names the subgraphs of ``node`` (If, Loop, Scan) read."""
    reads: set[str] = set()
    for attribute in node.attribute:
        for sub in ([attribute.g] if attribute.g.ByteSize() else []) + list(attribute.graphs):
            reads |= _referenced(sub)
    return reads


def _referenced(graph: Any) -> set[str]:
    """Names read by ``graph``'s nodes, its subgraphs' nodes, or its outputs."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.g.ByteSize() else []) + list(attribute.graphs):
                used |= _referenced(sub)
    return used
