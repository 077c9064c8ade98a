"""Quantization a weight group at a time (``export --low-memory --quantize``): the same graph as
ONNX Runtime's own quantizer run on the whole model, holding one group's weights at a time.

References: ONNX Runtime's ``quantize_dynamic`` and ``MatMulNBitsQuantizer`` on the whole graph
(node for node, initializer for initializer, and the logits of both in ONNX Runtime), and the
exporter's node names for which projections read one activation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import save_tiny_model, tiny_model
from onnx import numpy_helper
from onnx_graphs import export_graphs, final_graph, node_records, run_graph

import cwca_export
from cwca_export.cli import cli
from cwca_export.exporter import postprocess as pp
from cwca_export.exporter.streamed_quantize import quantize_streamed, weight_groups

GRAPHS = {  # backend, family, tied, external
    "llama": ("onnx", "llama", False, False),
    "gemma-tied": ("onnx", "gemma", True, False),
    "gpt2": ("onnx", "gpt2", False, False),
    "llama-tied-optimum": ("optimum", "llama", True, False),  # its head reads the table through a Transpose
    "llama-external": ("onnx", "llama", False, True),  # the weights in a data file, as above 2 GiB
}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    return export_graphs(tmp_path_factory, GRAPHS)


CONFIGS = {
    "int8": (pp.QuantizeConfig("int8"), ()),
    "int8-per-channel": (pp.QuantizeConfig("int8", per_channel=True), ()),
    "int8-exclusions": (pp.QuantizeConfig("int8"), ("lm_head", "model.layers.0")),
    "int4": (pp.QuantizeConfig("int4"), ()),
    "int4-asym-b16": (pp.QuantizeConfig("int4", symmetric=False, block_size=16), ()),
    "int4-exclusions": (pp.QuantizeConfig("int4"), ("model.layers.1",)),
}


@pytest.mark.parametrize("graph", list(GRAPHS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_streamed_graph_is_onnx_runtimes_whole_graph_quantization(graphs, tmp_path, graph, config):
    src = graphs[graph]
    quant, entries = CONFIGS[config]
    blocks = "transformer.h" if graph == "gpt2" else "model.layers"
    excluded = pp.resolve_exclusions(src, [e.replace("model.layers", blocks) for e in entries])
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    whole.mkdir(), streamed.mkdir()
    (pp.quantize_int8 if quant.method == "int8" else pp.quantize_int4)(src, whole / "q.onnx", quant, excluded)
    quantize_streamed(src, streamed / "q.onnx", quant, excluded)
    a, b = final_graph(whole / "q.onnx", tmp_path / "a"), final_graph(streamed / "q.onnx", tmp_path / "b")
    assert node_records(a) == node_records(b)
    ia = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    ib = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert set(ia) == set(ib)
    assert all(ia[k].dtype == ib[k].dtype and np.array_equal(ia[k], ib[k]) for k in ia)
    assert {(o.domain, o.version) for o in a.opset_import} == {(o.domain, o.version) for o in b.opset_import}
    assert [i.name for i in a.graph.input] == [i.name for i in b.graph.input]
    kinds = {n.op_type for n in b.graph.node}
    assert ("MatMulInteger" if quant.method == "int8" else "MatMulNBits") in kinds  # it did quantize
    for x, y in zip(run_graph(tmp_path / "a" / "model.onnx"), run_graph(tmp_path / "b" / "model.onnx"),
                    strict=True):
        assert np.array_equal(x, y)


def test_groups_are_the_projections_that_read_one_activation(graphs):
    graph = onnx.load(str(graphs["llama"]), load_external_data=False).graph
    groups = [sorted(graph.node[k].name for k in g) for g in weight_groups(graph)]
    layer = [g for g in groups if all("/layers.0/" in n for n in g)]
    module = lambda names: sorted(n.split("/")[-2] for n in names)  # noqa: E731
    assert sorted(module(g) for g in layer) == [["down_proj"], ["gate_proj", "up_proj"], ["k_proj", "q_proj", "v_proj"],
                                               ["o_proj"]]
    assert any(g == ["/model/model/embed_tokens/Gather"] for g in groups)
    assert any(g == ["/model/lm_head/MatMul"] for g in groups)
    # no tensor is read by two groups
    reads = [{i for k in g for i in graph.node[k].input} for g in weight_groups(graph)]
    assert all(not (reads[i] & reads[j]) for i in range(len(reads)) for j in range(i))


def test_the_quantizer_sees_one_group_of_weights_at_a_time(graphs, tmp_path, monkeypatch):
    """What ONNX Runtime's quantizer is handed at once is one group's weights, never the graph's."""
    src = graphs["llama"]
    seen = []
    real = pp.quantize_int8

    def recording(group_src, dst, config, exclude):
        data = group_src.parent / (group_src.name + ".data")
        seen.append(data.stat().st_size if data.exists() else 0)
        return real(group_src, dst, config, exclude)

    monkeypatch.setattr(pp, "quantize_int8", recording)
    quantize_streamed(src, tmp_path / "q.onnx", pp.QuantizeConfig("int8"), [])
    graph = onnx.load(str(src), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    sizes = {name: int(np.prod(t.dims)) * 4 for name, t in inits.items()}
    group_bytes = [sum(sizes[i] for k in g for i in graph.node[k].input if i in sizes) for g in weight_groups(graph)]
    assert len(seen) == len(group_bytes)
    assert max(seen) <= max(group_bytes) < sum(group_bytes) / 2


def test_a_name_the_quantizer_would_reuse_is_an_error_not_a_broken_graph(graphs, tmp_path):
    model = onnx.load(str(graphs["llama"]))
    graph = model.graph
    node = next(n for n in graph.node if n.name == "/model/model/layers.0/mlp/down_proj/MatMul")
    weight = node.input[1]
    # a tensor already named as ORT names the quantized weight
    graph.node.append(onnx.helper.make_node("Identity", [weight], [f"{weight}_quantized"], name="squatter"))
    graph.output.append(onnx.helper.make_tensor_value_info(f"{weight}_quantized", onnx.TensorProto.FLOAT, None))
    pp.save_with_data(model, tmp_path / "clash.onnx")
    with pytest.raises(RuntimeError, match="makes names the graph has"):
        quantize_streamed(tmp_path / "clash.onnx", tmp_path / "q.onnx", pp.QuantizeConfig("int8"), [])


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_low_memory_quantized_export_is_the_ordinary_quantized_export(tmp_path, method):
    """Through the exporter: the weights go to external data (threshold 0), the ordinary export
    quantizes the whole graph, the low-memory one a group at a time; both pass their checks and
    compute the same logits."""
    model = tiny_model("llama")
    options = {"backend": "onnx", "quantize": method, "external_data_threshold": 0, "runs": 1, "warmup": 0,
               "budget": cwca_export.Budget(prompt_len=8, context=24)}
    ordinary = cwca_export.export(tiny_model("llama"), None, tmp_path / "ordinary", **options)
    low = cwca_export.export(model, None, tmp_path / "low", low_memory=True, **options)
    for art in (ordinary, low):
        assert art.manifest["verification"]["final"]["parity"]["passed"] is True
        assert art.manifest["postprocess"]["steps"] == [method]
    ordinary_out, low_out = run_graph(tmp_path / "ordinary" / "model.onnx"), run_graph(tmp_path / "low" / "model.onnx")
    for x, y in zip(ordinary_out, low_out, strict=True):
        assert np.array_equal(x, y)


def test_cli_low_memory_quantize_streams_and_says_nothing_of_whole_graph_copies(tmp_path, monkeypatch):
    from cwca_export.exporter import build

    calls = []
    real = build.quantize_streamed
    monkeypatch.setattr(build, "quantize_streamed", lambda *a: calls.append(a) or real(*a))
    folder = save_tiny_model("llama", tmp_path / "tiny")
    result = CliRunner().invoke(cli, ["export", str(folder), "--backend", "onnx", "--low-memory", "--quantize", "int4",
                                      "--external-data-threshold", "1KB", "--prompt-len", "8", "--context", "24",
                                      "--runs", "1", "--warmup", "0", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "float32 copies" not in result.output and "loads the whole" not in result.output
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 15  # 2 blocks x 7 projections + the head
    assert len(calls) == 1


def test_the_memory_models_largest_group_is_the_graphs(graphs):
    """``ModelShape.largest_weight_group`` (what docs/memory.md prices the streamed quantizer by)
    against the groups found in an exported graph."""
    from cwca_export import memory_model as mm

    graph = onnx.load(str(graphs["llama"]), load_external_data=False).graph
    sizes = {t.name: int(np.prod(t.dims)) for t in graph.initializer if len(t.dims) == 2}
    largest = max(sum(sizes.get(i, 0) for k in g for i in graph.node[k].input) for g in weight_groups(graph))
    assert mm.ModelShape.from_config(tiny_model("llama").config.to_dict()).largest_weight_group == largest
