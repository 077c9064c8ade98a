"""The graph fixes benchmarks/bench_budget.py applies to peers, checked in ONNX Runtime.

References are independent of the code under test: MatMulNBits' documented dequantisation
(``(q - zero_point) * scale`` per block, low nibble first) computed in NumPy, and the tied
graph's own output before untying.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from helpers import load_benchmark  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def load_bench():
    return load_benchmark("bench_budget")


def run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def nbits_model(n, k, block, q, scales, zero_points):
    """y = x @ W.T, W as MatMulNBits (B: uint8 [N, blocks, block/2]); zero points as given."""
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block), np.uint8)
    padded[:, :k] = q
    pairs = padded.reshape(n, blocks, block // 2, 2)
    packed_b = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    node = helper.make_node(
        "MatMulNBits", ["x", "B", "scales", "zp"], ["y"], domain="com.microsoft",
        K=k, N=n, bits=4, block_size=block,
    )
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(packed_b, "B"),
         numpy_helper.from_array(scales.reshape(-1).astype(np.float32), "scales"),
         numpy_helper.from_array(zero_points, "zp")],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        ir_version=8,
    )


@pytest.mark.parametrize("k", [96, 128])  # 3 blocks (odd: a padding nibble) and 4 blocks
def test_packed_zero_points_give_the_documented_dequantisation(k):
    bench = load_bench()
    rng = np.random.default_rng(0)
    n, block = 5, 32
    blocks = k // block
    q = rng.integers(0, 16, (n, k), dtype=np.uint8)
    zp = rng.integers(0, 16, (n, blocks), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, (n, blocks)).astype(np.float32)
    model = nbits_model(n, k, block, q, scales, zp)  # one zero point per byte, as NNCF writes them

    with pytest.raises(Exception, match="zero_points"):
        run(model, {"x": np.ones((1, k), np.float32)})
    assert bench.pack_nbits_zero_points(model) == 1
    assert bench.pack_nbits_zero_points(model) == 0  # already packed: left alone

    x = rng.standard_normal((1, k)).astype(np.float32)
    weight = (q.astype(np.float32) - np.repeat(zp, block, axis=1)) * np.repeat(
        scales, block, axis=1
    )
    np.testing.assert_allclose(run(model, {"x": x}), x @ weight.T, rtol=1e-4, atol=1e-4)


def test_untied_lm_head_computes_the_same_logits_from_its_own_initializer():
    bench = load_bench()
    rng = np.random.default_rng(1)
    vocab, hidden = 11, 6
    embed = rng.standard_normal((vocab, hidden)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["model.embed_tokens.weight", "input_ids"], ["h"],
                         name=bench.EMBED_GATHER),
        helper.make_node("Transpose", ["model.embed_tokens.weight"], ["wt"], name="Transpose_1",
                         perm=[1, 0]),
        helper.make_node("MatMul", ["h", "wt"], ["logits"], name=bench.LM_HEAD),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, vocab])],
        [numpy_helper.from_array(embed, "model.embed_tokens.weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = {"input_ids": np.array([[0, 4, 10]], np.int64)}
    tied = run(model, feeds)

    bench.untie_lm_head(model)

    head = next(n for n in model.graph.node if n.name == bench.LM_HEAD)
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert head.input[1] in weights
    np.testing.assert_array_equal(weights[head.input[1]], embed.T)
    assert all(n.op_type != "Transpose" for n in model.graph.node)
    np.testing.assert_allclose(run(model, feeds), tied, rtol=1e-6)
    np.testing.assert_allclose(tied[0], embed[[0, 4, 10]] @ embed.T, rtol=1e-5)
