"""Float16 conversion a tensor at a time (``export --low-memory --dtype float16``): the same graph
as ONNX Runtime's converter run on the whole loaded model, without the weights in its hands.

Reference: ``onnxruntime.transformers.float16.convert_float_to_float16(onnx.load(src),
keep_io_types=False)`` (node for node, initializer for initializer, and the logits of both in
ONNX Runtime)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import save_tiny_model
from onnx import numpy_helper
from onnx_graphs import export_graphs, final_graph, node_records, run_graph
from onnxruntime.transformers import float16

from cwca_export.cli import cli
from cwca_export.exporter import postprocess as pp
from cwca_export.exporter import streamed_fp16
from cwca_export.exporter.streamed_fp16 import convert_fp16_streamed

GRAPHS = {  # backend, family, tied, external
    "llama": ("onnx", "llama", False, False),
    "llama-external": ("onnx", "llama", False, True),
    "gemma-tied": ("onnx", "gemma", True, False),
    "gemma-tied-external": ("onnx", "gemma", True, True),
    "gpt2-external": ("onnx", "gpt2", False, True),
    "llama-tied-optimum": ("optimum", "llama", True, False),  # its head reads the table through a Transpose
    "llama-tied-optimum-external": ("optimum", "llama", True, True),
}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    return export_graphs(tmp_path_factory, GRAPHS)


def _whole_graph(src: Path, dst: Path) -> None:
    """ONNX Runtime's converter on the whole loaded model, as ``postprocess.convert_fp16`` calls it."""
    model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=False)
    pp.save_with_data(model, dst)


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_streamed_graph_is_onnx_runtimes_whole_graph_conversion(graphs, tmp_path, graph):
    src = graphs[graph]
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    whole.mkdir(), streamed.mkdir()
    _whole_graph(src, whole / "fp16.onnx")
    convert_fp16_streamed(src, streamed / "fp16.onnx")
    a, b = final_graph(whole / "fp16.onnx", tmp_path / "a"), final_graph(streamed / "fp16.onnx", tmp_path / "b")
    assert node_records(a, ordered=True) == node_records(b, ordered=True)
    ta = [(t.name, t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in a.graph.initializer]
    tb = [(t.name, t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in b.graph.initializer]
    assert ta == tb
    assert a.graph.value_info == b.graph.value_info  # the shapes inferred, retyped
    assert list(a.graph.input) == list(b.graph.input) and list(a.graph.output) == list(b.graph.output)
    assert list(a.opset_import) == list(b.opset_import)
    kinds = {t.data_type for t in b.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in kinds and onnx.TensorProto.FLOAT not in kinds  # it did convert
    for x, y in zip(run_graph(tmp_path / "a" / "model.onnx"), run_graph(tmp_path / "b" / "model.onnx"),
                    strict=True):
        assert x.dtype == np.float16 and np.array_equal(x, y, equal_nan=True)


def test_a_weight_that_a_float32_node_reads_stays_as_the_converter_leaves_it(graphs, tmp_path):
    """The converter keeps an initializer float32 when only a blocked op reads it and converts one
    that converted nodes read too, with a Cast (and the weight's shape) before the blocked op:
    decisions that need the graph's readers, made here by the converter itself."""
    model = onnx.load(str(graphs["llama"]))
    graph = model.graph
    head = next(n for n in graph.node if n.op_type == "MatMul" and n.name.endswith("lm_head/MatMul"))
    weight = next(t for t in graph.initializer if t.name == head.input[1])
    # a blocked Max reads the head's weight (also read by the converted MatMul) ...
    graph.node.append(onnx.helper.make_node("Max", [weight.name, weight.name], ["head_max"], name="blocked_max"))
    graph.output.append(onnx.helper.make_tensor_value_info("head_max", onnx.TensorProto.FLOAT, None))
    # ... and an extra weight that only a blocked Min reads
    lonely = numpy_helper.from_array(np.linspace(-7e4, 7e4, 512, dtype=np.float32).reshape(2, 256), "lonely")
    graph.initializer.append(lonely)
    graph.node.append(onnx.helper.make_node("Min", ["lonely", "lonely"], ["lonely_min"], name="blocked_min"))
    graph.output.append(onnx.helper.make_tensor_value_info("lonely_min", onnx.TensorProto.FLOAT, None))
    pp.save_with_data(model, tmp_path / "src.onnx")
    (tmp_path / "w").mkdir(), (tmp_path / "s").mkdir()
    _whole_graph(tmp_path / "src.onnx", tmp_path / "w" / "fp16.onnx")
    convert_fp16_streamed(tmp_path / "src.onnx", tmp_path / "s" / "fp16.onnx")
    a = final_graph(tmp_path / "w" / "fp16.onnx", tmp_path / "a")
    b = final_graph(tmp_path / "s" / "fp16.onnx", tmp_path / "b")
    assert node_records(a, ordered=True) == node_records(b, ordered=True)
    assert a.graph.value_info == b.graph.value_info
    types = {t.name: t.data_type for t in b.graph.initializer}
    assert types["lonely"] == onnx.TensorProto.FLOAT and types[weight.name] == onnx.TensorProto.FLOAT16
    cast = next(v for v in b.graph.value_info if v.name == f"{weight.name}_cast_to_fp32")
    assert [d.dim_value for d in cast.type.tensor_type.shape.dim] == list(weight.dims)
    ia = {t.name: numpy_helper.to_array(t).tobytes() for t in a.graph.initializer}
    assert ia == {t.name: numpy_helper.to_array(t).tobytes() for t in b.graph.initializer}


def test_values_beyond_float16_are_clamped_as_the_converter_clamps_them(tmp_path):
    """The converter's clamping (to +-65504, tiny values to +-5.96e-8, inf and nan kept), on
    a weight converted in several slices."""
    values = np.random.default_rng(0).normal(0, 3e4, size=(64, 96)).astype(np.float32)
    values.flat[:6] = [np.inf, -np.inf, np.nan, 1e-9, -1e-9, 0.0]
    weight = numpy_helper.from_array(values, "w")
    node = onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 96])
    graph = onnx.helper.make_graph([node], "g", [x], [y], [weight])
    pp.save_with_data(onnx.helper.make_model(graph), tmp_path / "src.onnx")
    (tmp_path / "w").mkdir(), (tmp_path / "s").mkdir()
    _whole_graph(tmp_path / "src.onnx", tmp_path / "w" / "fp16.onnx")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(streamed_fp16, "SLICE_ELEMENTS", 1000)  # 7 slices, the last partial
        convert_fp16_streamed(tmp_path / "src.onnx", tmp_path / "s" / "fp16.onnx")
    a = numpy_helper.to_array(onnx.load(str(tmp_path / "w" / "fp16.onnx")).graph.initializer[0])
    b = numpy_helper.to_array(onnx.load(str(tmp_path / "s" / "fp16.onnx")).graph.initializer[0])
    assert b.dtype == np.float16 and a.tobytes() == b.tobytes()
    assert np.nanmax(np.abs(b[np.isfinite(b)])) == np.float16(65504) and np.isinf(b.flat[0]) and np.isnan(b.flat[2])
    assert b.flat[3] == np.float16(5.96e-08) and b.flat[4] == -np.float16(5.96e-08)


def test_the_converter_never_holds_more_than_one_weight(graphs, tmp_path, monkeypatch):
    """What ONNX Runtime's converter is handed carries no external weight's values, and each
    weight's values pass through its per-tensor function alone, after the previous weight is
    already in the destination file."""
    src = graphs["llama-external"]
    source = onnx.load(str(src), load_external_data=False)
    external = {t.name: int(np.prod(t.dims)) for t in source.graph.initializer if t.external_data}
    largest = max(external.values())
    handed, inside = [], []
    real_convert, real_np = float16.convert_float_to_float16, float16.convert_np_to_float16

    def converter(model, **options):
        values = sum(len(t.raw_data) + 4 * len(t.float_data) for t in model.graph.initializer)
        handed.append((values, sum(bool(t.external_data) for t in model.graph.initializer)))
        inside.append(True)
        try:
            return real_convert(model, **options)
        finally:
            inside.pop()

    small, events = [], []

    def per_tensor(values, *args):
        if inside:  # the converter on the small inline tensors it was handed
            small.append(values.size)
        else:
            events.append(("convert", values.size))
        return real_np(values, *args)

    real_put = pp.DataFileWriter.put_pieces

    def put_pieces(self, tensor, pieces, length):
        events.append(("write", tensor.name))
        real_put(self, tensor, pieces, length)
        events.append(("written", tensor.name))

    monkeypatch.setattr(float16, "convert_float_to_float16", converter)
    monkeypatch.setattr(float16, "convert_np_to_float16", per_tensor)
    monkeypatch.setattr(pp.DataFileWriter, "put_pieces", put_pieces)
    convert_fp16_streamed(src, tmp_path / "fp16.onnx")
    [(values, still_external)] = handed
    assert still_external == 0  # stand-ins, nothing it could load
    assert values < 4 * largest  # the small inline tensors only, less than the largest weight's values
    assert small and 4 * max(small) < 1024  # under the data file's threshold, so never external
    # each weight: written while it is converted, done before the next one's values are read
    expected = [e for name in external for e in (("write", name), ("convert", external[name]), ("written", name))]
    assert events == expected


def test_shape_inference_sees_the_graph_without_its_weights(graphs, tmp_path, monkeypatch):
    """The whole-graph converter serialises the loaded model, weights and all, for shape inference,
    which protobuf refuses above 2 GiB; here shape inference is handed the graph without them."""
    src = graphs["llama-external"]
    sizes = []
    real = onnx.shape_inference.infer_shapes

    def recording(model, *args, **kwargs):
        sizes.append(model.ByteSize())
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", recording)
    monkeypatch.setattr(float16, "infer_shapes", recording)
    convert_fp16_streamed(src, tmp_path / "fp16.onnx")
    skeleton = onnx.load(str(src), load_external_data=False)
    weights = sum(4 * int(np.prod(t.dims)) for t in skeleton.graph.initializer if t.external_data)
    assert len(sizes) == 1 and sizes[0] < skeleton.ByteSize() + 1024 and sizes[0] < weights


def test_cli_low_memory_float16_export_streams_and_computes_as_the_ordinary_one(tmp_path, monkeypatch):
    from cwca_export.exporter import build

    calls = []
    real = build.convert_fp16_streamed
    monkeypatch.setattr(build, "convert_fp16_streamed", lambda *a: calls.append(a) or real(*a))
    folder = save_tiny_model("llama", tmp_path / "tiny")
    common = ["--backend", "onnx", "--dtype", "float16", "--external-data-threshold", "1KB", "--prompt-len", "8",
              "--context", "24", "--runs", "1", "--warmup", "0"]
    runner = CliRunner()
    low = runner.invoke(cli, ["export", str(folder), "--low-memory", *common, "--out", str(tmp_path / "low")])
    assert low.exit_code == 0, low.output
    assert "note" not in low.output  # nothing loads the whole graph
    assert len(calls) == 1
    ordinary = runner.invoke(cli, ["export", str(folder), *common, "--out", str(tmp_path / "ordinary")])
    assert ordinary.exit_code == 0, ordinary.output
    assert len(calls) == 1  # the ordinary export converts the whole graph
    graph = onnx.load(str(tmp_path / "low" / "model.onnx"), load_external_data=False).graph
    assert (tmp_path / "low" / pp.EXTERNAL_DATA_NAME).exists()
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer if t.data_type in (1, 10))
    low_out, ordinary_out = run_graph(tmp_path / "low" / "model.onnx"), run_graph(tmp_path / "ordinary" / "model.onnx")
    for x, y in zip(low_out, ordinary_out, strict=True):
        assert x.dtype == np.float16 and np.array_equal(x, y, equal_nan=True)
    # the float16 artifact's own sessions cast the weights per forward instead of a float32 copy
    workload = json.loads((tmp_path / "low" / "cwca_manifest.json").read_text())["measurement"]["workload"]
    assert workload["prepack"] is False and workload["casts_float16_per_run"] is True
    assert "a float32 copy of the float16 weights (cast per forward" in low.output


def test_a_float16_session_without_prepacking_casts_per_forward_and_computes_the_same(graphs):
    """On the CPU provider, without prepacking: no graph optimisation (which folds the weights'
    casts into float32 copies), no arena, casts run just before their readers; the logits are
    those of ONNX Runtime's default session on the same graph (float16 tolerance). A float32
    graph's session keeps the optimisations."""
    import onnxruntime as ort

    from cwca_export.exporter.session import DecoderSession, make_session

    fp32_path, fp16_path = graphs["llama-external"], graphs["llama-external"].parent / "fp16" / "model.onnx"
    fp16_path.parent.mkdir(exist_ok=True)
    convert_fp16_streamed(fp32_path, fp16_path)
    lean = make_session(fp16_path, "cpu", prepack=False)
    options = lean.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert options.enable_cpu_mem_arena is False and options.execution_order == ort.ExecutionOrder.PRIORITY_BASED
    for path, prepack in ((fp32_path, False), (fp16_path, True)):
        kept = make_session(path, "cpu", prepack=prepack).get_session_options()
        assert kept.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL and kept.enable_cpu_mem_arena
    ids = np.array([[5, 9, 13, 2, 7, 11, 40, 3]], dtype=np.int64)

    def logits(session):
        return DecoderSession(session).run(ids, np.ones_like(ids))[0].astype(np.float32)

    exact = logits(ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"]))
    errors = [np.sqrt(np.mean((logits(s) - exact) ** 2)) / np.sqrt(np.mean(exact**2))
              for s in (lean, ort.InferenceSession(str(fp16_path), providers=["CPUExecutionProvider"]))]
    assert errors[0] <= 0.02  # the export's float16 parity tolerance against float32
    assert errors[0] <= 1.5 * errors[1]  # float16 rounding where ONNX Runtime's default session has its own


def test_ordinary_float16_export_above_the_protobuf_limit_streams(tmp_path, monkeypatch):
    """The whole-graph converter serialises the model first, which protobuf refuses above 2 GiB
    (at 550M it failed with EncodeError): the ordinary export converts such a graph a tensor at a
    time too. The limit is lowered here to a tiny model's size."""
    from cwca_export.exporter import build

    calls = []
    real = build.convert_fp16_streamed
    monkeypatch.setattr(build, "convert_fp16_streamed", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(pp, "PROTOBUF_LIMIT", 1000)
    monkeypatch.setattr(pp, "convert_fp16", lambda *a: pytest.fail("the whole-graph converter ran above the limit"))
    folder = save_tiny_model("llama", tmp_path / "tiny")
    result = CliRunner().invoke(cli, ["export", str(folder), "--backend", "onnx", "--dtype", "float16",
                                      "--prompt-len", "8", "--context", "24", "--runs", "1", "--warmup", "0",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
