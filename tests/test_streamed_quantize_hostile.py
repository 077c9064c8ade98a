"""A hostile user of the streamed quantizer (``export --low-memory --quantize``): graphs that break
the grouping's assumptions, and models whose layout the tiny families do not have.

The reference throughout is ONNX Runtime's own quantizer on the whole graph
(``postprocess.quantize_int8`` / ``quantize_int4``): the streamed graph must hold its nodes and
initializers, compute its outputs bit for bit, and pass ``onnx.checker`` wherever it does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from cwca_export.exporter import postprocess as pp
from cwca_export.exporter.streamed_quantize import quantize_streamed

CONFIGS = {"int8": pp.QuantizeConfig("int8"), "int4": pp.QuantizeConfig("int4", block_size=16)}


def _model(nodes, inputs, outputs, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    tensors = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    graph = oh.make_graph(nodes, "hostile", inputs, outputs, tensors)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)


def _weights(*names: str, shape=(16, 16)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(len(names))
    return {n: rng.standard_normal(shape).astype(np.float32) for n in names}


def _records(model: onnx.ModelProto) -> list[tuple]:
    return sorted((n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in model.graph.node)


def _both(model: onnx.ModelProto, tmp_path: Path, method: str, exclude=()) -> tuple[Path, Path]:
    """The whole-graph and the streamed quantization of ``model`` (saved with external data)."""
    pp.save_with_data(model, tmp_path / "src.onnx")
    quant = CONFIGS[method]
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    whole.mkdir(), streamed.mkdir()
    (pp.quantize_int8 if method == "int8" else pp.quantize_int4)(tmp_path / "src.onnx", whole / "q.onnx", quant,
                                                                 list(exclude))
    quantize_streamed(tmp_path / "src.onnx", streamed / "q.onnx", quant, list(exclude))
    return whole / "q.onnx", streamed / "q.onnx"


def _assert_same(whole: Path, streamed: Path, feeds: dict[str, np.ndarray]) -> None:
    a, b = onnx.load(str(whole)), onnx.load(str(streamed))
    assert _records(a) == _records(b)
    ia = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    ib = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert set(ia) == set(ib)
    assert all(np.array_equal(ia[k], ib[k]) for k in ia)
    onnx.checker.check_model(a)  # the reference is a valid graph ...
    onnx.checker.check_model(b)  # ... and so must the streamed one be (nodes in topological order)
    ra = ort.InferenceSession(str(whole)).run(None, feeds)
    rb = ort.InferenceSession(str(streamed)).run(None, feeds)
    for x, y in zip(ra, rb, strict=True):
        assert np.array_equal(x, y)


def _x(*shape: int) -> np.ndarray:
    return np.random.default_rng(7).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_weight_shared_across_layers_keeps_the_graph_in_topological_order(tmp_path, method):
    """One initializer read by a MatMul in layer 0 and another in layer 1 (cross-layer sharing):
    one group, whose second node reads an activation made after the first one's place."""
    model = _model(
        [oh.make_node("MatMul", ["x", "W"], ["a"], name="layer0"),
         oh.make_node("Relu", ["a"], ["b"], name="act"),
         oh.make_node("MatMul", ["b", "W1"], ["c"], name="middle"),
         oh.make_node("MatMul", ["c", "W"], ["y"], name="layer1")],
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], _weights("W", "W1"))
    _assert_same(*_both(model, tmp_path, method), {"x": _x(4, 16)})
