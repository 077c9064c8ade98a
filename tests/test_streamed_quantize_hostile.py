"""A hostile user of the streamed quantizer (``export --low-memory --quantize``): graphs that break
the grouping's assumptions, and models whose layout the tiny families do not have.

The reference throughout is ONNX Runtime's own quantizer on the whole graph
(``postprocess.quantize_int8`` / ``quantize_int4``): the streamed graph must hold its nodes and
initializers, compute its outputs bit for bit, and pass ``onnx.checker`` wherever it does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from helpers import save_tiny_model
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from cwca_export.cli import cli
from cwca_export.exporter import postprocess as pp
from cwca_export.exporter.streamed_quantize import quantize_streamed

CONFIGS = {"int8": pp.QuantizeConfig("int8"), "int4": pp.QuantizeConfig("int4", block_size=16)}
FAST = ["--prompt-len", "8", "--context", "24", "--runs", "1", "--warmup", "0"]


def _model(nodes, inputs, outputs, weights: dict[str, np.ndarray], opset: int = 17) -> onnx.ModelProto:
    tensors = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    graph = oh.make_graph(nodes, "hostile", inputs, outputs, tensors)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=9 if opset > 10 else 5)


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


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_an_embedding_read_straight_by_a_projection_and_a_transpose(tmp_path, method):
    """A Gather's output read by a MatMul with a weight (OPT's ``project_in``), a Transpose and a
    float op: dynamic int8 hands the quantized table rows to the MatMul and the Transpose as they
    are, and dequantizes once for the float op."""
    weights = {**_weights("E", shape=(50, 16)), **_weights("W", "W2")}
    model = _model(
        [oh.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
         oh.make_node("MatMul", ["e", "W"], ["a"], name="project_in"),
         oh.make_node("Transpose", ["e"], ["et"], name="transpose", perm=[0, 2, 1]),
         oh.make_node("Relu", ["e"], ["r"], name="float_op"),
         oh.make_node("MatMul", ["a", "W2"], ["y"], name="next")],
        [oh.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
        [oh.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("y", [2, 3, 16]), ("et", [2, 16, 3]),
                                                                           ("r", [2, 3, 16]))], weights)
    _assert_same(*_both(model, tmp_path, method), {"ids": np.array([[1, 2, 3], [4, 5, 49]])})


def test_opt_with_project_in_quantizes_streamed_as_whole(tmp_path):
    """OPT whose embedding is narrower than its blocks (OPT-350m) reads the embedding through
    ``project_in``: ``export --low-memory --quantize int8`` failed on it with a name clash."""
    import torch
    import transformers
    from cwca_export.backends import get_backend
    from helpers import tiny_tokenizer

    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=384, hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=2,
                                    ffn_dim=64, num_attention_heads=4, max_position_embeddings=64)
    (tmp_path / "raw").mkdir()
    get_backend("onnx").export(transformers.OPTForCausalLM(config).eval(), tiny_tokenizer(), tmp_path / "raw")
    model = onnx.load(str(tmp_path / "raw" / "model.onnx"))
    whole, streamed = _both(model, tmp_path, "int8")
    a, b = onnx.load(str(whole)), onnx.load(str(streamed))
    assert _records(a) == _records(b)
    assert any(n.op_type == "MatMulInteger" and "project_in" in n.name for n in b.graph.node)
    session = {p: ort.InferenceSession(str(p)) for p in (whole, streamed)}
    feeds = {}
    for i in session[whole].get_inputs():
        if i.name in ("input_ids", "attention_mask", "position_ids"):
            feeds[i.name] = np.ones((1, 5), np.int64) if i.name == "attention_mask" else np.arange(5)[None] + 2
        else:  # an empty past
            feeds[i.name] = np.zeros([1 if k == 0 else 0 if k == 2 else d for k, d in enumerate(i.shape)], np.float32)
    for x, y in zip(session[whole].run(None, feeds), session[streamed].run(None, feeds), strict=True):
        assert np.array_equal(x, y)


def _branching_model() -> onnx.ModelProto:
    """An If whose branches hold MatMuls: one reads an outer initializer, one its branch's own."""
    weights = _weights("W0", "Wo", "Ws")
    then = oh.make_graph([oh.make_node("MatMul", ["a", "Wo"], ["t"], name="then_matmul")], "then", [],
                         [oh.make_tensor_value_info("t", TensorProto.FLOAT, [4, 16])])
    other = oh.make_graph([oh.make_node("MatMul", ["a", "Ws"], ["e"], name="else_matmul")], "else", [],
                          [oh.make_tensor_value_info("e", TensorProto.FLOAT, [4, 16])],
                          [numpy_helper.from_array(weights.pop("Ws"), "Ws")])
    return _model([oh.make_node("MatMul", ["x", "W0"], ["a"], name="first"),
                   oh.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)],
                  [oh.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16]),
                   oh.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                  [oh.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], weights)


def test_int8_leaves_subgraphs_as_onnx_runtimes_whole_graph_pass_does(tmp_path):
    whole, streamed = _both(_branching_model(), tmp_path, "int8")
    a, b = onnx.load(str(whole)), onnx.load(str(streamed))
    assert _records(a) == _records(b)
    assert {t.name for t in a.graph.initializer} == {t.name for t in b.graph.initializer}
    for cond in (True, False):
        feeds = {"x": _x(4, 16), "cond": np.array(cond)}
        ra, rb = (ort.InferenceSession(str(p)).run(None, feeds) for p in (whole, streamed))
        assert np.array_equal(ra[0], rb[0])


def test_int4_refuses_matmuls_in_subgraphs_the_streamed_pass_cannot_reach(tmp_path):
    """ONNX Runtime's int4 pass quantizes MatMuls inside If / Loop / Scan branches; the streamed
    one splits the main graph only, so it would leave them float under an int4 manifest."""
    model = _branching_model()
    pp.save_with_data(model, tmp_path / "src.onnx")
    pp.quantize_int4(tmp_path / "src.onnx", tmp_path / "whole.onnx", CONFIGS["int4"], [])
    whole_graph = onnx.load(str(tmp_path / "whole.onnx"), load_external_data=False).graph
    branches = [onnx.helper.get_attribute_value(a) for n in whole_graph.node for a in n.attribute if a.type == 5]
    assert all(n.op_type == "MatMulNBits" for b in branches for n in b.node)  # the reference reaches them
    with pytest.raises(ValueError, match=r"(then|else)_matmul.*subgraph.*--low-memory"):
        quantize_streamed(tmp_path / "src.onnx", tmp_path / "streamed.onnx", CONFIGS["int4"], [])
    assert not (tmp_path / "streamed.onnx").exists() and not (tmp_path / "streamed.onnx.data").exists()


def test_opset_10_int8_shares_its_fixed_constants_across_groups(tmp_path):
    """At opset 10 (``--opset 10``) dynamic int8 has no DynamicQuantizeLinear: it computes each
    activation's scale with ``fixed_zero`` and ``fixed_quantization_range_uint8``, constants every
    quantized MatMul shares. A second group makes them again; the streamed pass stopped there."""
    model = _model(
        [oh.make_node("MatMul", ["x", "W"], ["a"], name="first"),
         oh.make_node("Relu", ["a"], ["b"], name="act"),
         oh.make_node("MatMul", ["b", "W2"], ["y"], name="second")],
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], _weights("W", "W2"), opset=10)
    whole, streamed = _both(model, tmp_path, "int8")
    _assert_same(whole, streamed, {"x": _x(4, 16)})
    assert "fixed_zero" in {t.name for t in onnx.load(str(streamed)).graph.initializer}


@pytest.mark.slow  # ~30 s each on a shared 2-core machine
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_in_the_quantize_phase_leaves_nothing(tmp_path, sig, code):
    """A real signal while ``export --low-memory --quantize`` has a group in its scratch folder:
    the conventional exit code, and neither the artifact nor any partial or scratch left."""
    from helpers import save_tiny_model

    model = save_tiny_model("llama", tmp_path / "model")
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "cwca_export", "export", str(model), "--out", "art", "--backend",
                             "onnx", "--low-memory", "--quantize", "int8", "--external-data-threshold", "1KB",
                             "--runs", "1", "--warmup", "0"], cwd=run, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 240
    while not any(run.glob(".*/.work/.group-*/group.onnx*")):
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            pytest.fail(f"no group in the scratch folder before the end (rc {proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.001)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == []


def test_a_full_disk_in_the_quantize_phase_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """The disk fills while the streamed quantizer appends a group's weights: the ENOSPC line,
    and neither the artifact, a partial folder nor a group's scratch left."""
    import errno

    from click.testing import CliRunner
    from helpers import save_tiny_model

    from cwca_export.cli import cli

    model = save_tiny_model("llama", tmp_path / "model")
    real, calls = pp.DataFileWriter.put, []

    def filling(self, tensor, base):
        if self.path.name.endswith("int8.onnx.data"):
            calls.append(tensor.name)
            if len(calls) == 5:
                raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real(self, tensor, base)

    monkeypatch.setattr(pp.DataFileWriter, "put", filling)
    run = tmp_path / "run"
    run.mkdir()
    result = CliRunner().invoke(cli, ["export", str(model), "--out", str(run / "art"), "--backend", "onnx",
                                      "--low-memory", "--quantize", "int8", "--external-data-threshold", "1KB",
                                      "--runs", "1", "--warmup", "0"])
    assert result.exit_code == 1, result.output
    assert "no space left on the device" in result.output and "Traceback" not in result.output
    assert len(calls) == 5
    assert sorted(p.name for p in run.iterdir()) == []


def _gpt2_graph(tmp_path: Path) -> Path:
    from cwca_export.backends import get_backend
    from helpers import tiny_model, tiny_tokenizer

    (tmp_path / "raw").mkdir()
    get_backend("onnx").export(tiny_model("gpt2"), tiny_tokenizer(), tmp_path / "raw")
    return tmp_path / "raw" / "model.onnx"


@pytest.mark.parametrize("streamed", [False, True])
def test_an_excluded_gemm_stays_float_in_int8(tmp_path, streamed):
    """GPT-2's projections export as Gemm; dynamic int8 renames each into ``<name>_MatMul`` before
    it reads its exclusions, so ``--exclude transformer.h.0.attn.c_attn`` (or ``--exclude-layers
    0``) quantized the Gemm anyway while the manifest listed it as excluded."""
    src = _gpt2_graph(tmp_path)
    excluded = pp.resolve_exclusions(src, ["transformer.h.0"])
    gemms = [n for n in excluded if n.endswith("/Gemm")]
    assert len(gemms) == 4  # c_attn, c_proj, c_fc, mlp c_proj
    (quantize_streamed if streamed else pp.quantize_int8)(src, tmp_path / "q.onnx", CONFIGS["int8"], excluded)
    graph = onnx.load(str(tmp_path / "q.onnx"), load_external_data=False).graph
    float_weights = {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2}
    for gemm in gemms:
        made = [n for n in graph.node if n.name.startswith(gemm)]
        assert not any(n.op_type == "MatMulInteger" for n in made), gemm
        assert any(n.op_type in ("Gemm", "MatMul") and n.input[1] in float_weights for n in made), gemm
    assert any(n.op_type == "MatMulInteger" for n in graph.node)  # the other layer did quantize


@pytest.mark.parametrize("shared", [False, True])
def test_an_excluded_gemm_with_transposed_weight_computes_as_the_whole_graph(tmp_path, shared):
    """Dynamic int8 turns ``Gemm(transB=1)`` into a MatMul reading the weight transposed in place,
    under its own name; the streamed pass kept the source's untransposed tensor of that name."""
    weights = {**_weights("W", shape=(16, 32)), "B": np.linspace(-1, 1, 16, dtype=np.float32),
               **_weights("W2", shape=(16, 8))}
    nodes = [oh.make_node("Gemm", ["x", "W", "B"], ["y"], name="gemm", transB=1),
             oh.make_node("MatMul", ["y", "W2"], ["z"], name="after")]
    outputs = [oh.make_tensor_value_info("z", TensorProto.FLOAT, [4, 8])]
    if shared:  # the weight read by a float op too: ONNX Runtime's rewrite reaches it as well
        nodes.append(oh.make_node("ReduceSum", ["W"], ["s"], name="reader", keepdims=0))
        outputs.append(oh.make_tensor_value_info("s", TensorProto.FLOAT, []))
    model = _model(nodes, [oh.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])], outputs, weights)
    whole, streamed = _both(model, tmp_path, "int8", exclude=["gemm"])
    graph = onnx.load(str(whole)).graph
    assert not any(n.op_type == "MatMulInteger" and "gemm" in n.name for n in graph.node)  # excluded
    _assert_same(whole, streamed, {"x": _x(4, 32)})


@pytest.mark.parametrize("spelling", ["1-0", "0,3-2"])
def test_a_backwards_layer_range_is_refused_not_an_empty_exclusion(tmp_path, spelling):
    """``--exclude-layers 1-0`` read as no layer at all: every block quantized, the manifest's
    exclusions empty, no word said."""
    from click.testing import CliRunner
    from helpers import save_tiny_model

    from cwca_export.cli import cli

    model = save_tiny_model("llama", tmp_path / "model")
    result = CliRunner().invoke(cli, ["export", str(model), "--out", str(tmp_path / "art"), "--backend", "onnx",
                                      "--low-memory", "--quantize", "int8", "--exclude-layers", spelling])
    assert result.exit_code == 2, result.output
    assert "--exclude-layers" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("exclude", [[], ["embed"], ["head"]])
def test_a_table_read_by_a_gather_and_a_float_matmul(tmp_path, exclude):
    """One initializer read by a Gather and, as its weight, by a MatMul (a tied head without the
    Transpose), either one excluded: with the head excluded dynamic int8 dequantizes the table
    for it under the table's own name, so the source's float table must not come back beside it."""
    model = _model([oh.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
                    oh.make_node("MatMul", ["e", "E"], ["y"], name="head")],
                   [oh.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
                   [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 16])], _weights("E"))
    _assert_same(*_both(model, tmp_path, "int8", exclude), {"ids": np.array([[1, 2, 3], [4, 5, 15]])})


@pytest.mark.parametrize(("size", "hint"),
                         [("24", "--block-size 16"), ("1", "--block-size 16"), ("100", "--block-size 64")])
def test_a_block_size_that_is_not_a_power_of_two_names_the_flag(tmp_path, size, hint):
    from click.testing import CliRunner
    from helpers import save_tiny_model

    from cwca_export.cli import cli

    model = save_tiny_model("llama", tmp_path / "model")
    result = CliRunner().invoke(cli, ["export", str(model), "--out", str(tmp_path / "art"), "--backend", "onnx",
                                      "--low-memory", "--quantize", "int4", "--block-size", size])
    assert result.exit_code == 2, result.output
    assert "--block-size" in result.output and hint in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_graph_without_weight_nodes_comes_back_as_the_whole_graph_pass_leaves_it(tmp_path, method):
    model = _model([oh.make_node("Add", ["x", "A"], ["a"], name="add"),
                    oh.make_node("Mul", ["a", "B"], ["y"], name="mul")],
                   [oh.make_tensor_value_info("x", TensorProto.FLOAT, [16, 16])],
                   [oh.make_tensor_value_info("y", TensorProto.FLOAT, [16, 16])], _weights("A", "B"))
    _assert_same(*_both(model, tmp_path, method), {"x": _x(16, 16)})


def test_a_weight_already_named_as_the_quantizer_names_its_output_is_refused(tmp_path):
    """A MatMul reads ``W_quantized`` and another ``W``: dynamic int8 on the whole graph writes a
    second ``W_quantized`` (a graph ONNX Runtime refuses to load); the streamed pass stops first."""
    model = _model([oh.make_node("MatMul", ["x", "W_quantized"], ["a"], name="first"),
                    oh.make_node("Relu", ["a"], ["b"], name="act"),
                    oh.make_node("MatMul", ["b", "W"], ["y"], name="second")],
                   [oh.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                   [oh.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], _weights("W", "W_quantized"))
    pp.save_with_data(model, tmp_path / "src.onnx")
    pp.quantize_int8(tmp_path / "src.onnx", tmp_path / "whole.onnx", CONFIGS["int8"], [])
    with pytest.raises(Exception, match="W_quantized"):
        ort.InferenceSession(str(tmp_path / "whole.onnx"))
    with pytest.raises(RuntimeError, match="makes names the graph has"):
        quantize_streamed(tmp_path / "src.onnx", tmp_path / "streamed.onnx", CONFIGS["int8"], [])


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("level", ["extended", "all"])
def test_an_optimised_graph_quantizes_through_the_group_at_a_time_pass(tmp_path, monkeypatch, method, level):
    """After --optimize extended / all the whole-graph int8 pass stopped at shape inference of ONNX
    Runtime's fused ops ("Unable to find data type"); the ordinary export now quantizes such a graph a
    group at a time, and the artifact passes its checks against torch."""
    from cwca_export.exporter import build

    calls = []
    real = build.quantize_streamed
    monkeypatch.setattr(build, "quantize_streamed", lambda *a: calls.append(a) or real(*a))
    folder = save_tiny_model("llama", tmp_path / "tiny")
    result = CliRunner().invoke(cli, ["export", str(folder), "--backend", "onnx", "--quantize", method,
                                      "--optimize", level, *FAST, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
    manifest = json.loads((tmp_path / "out" / "cwca_manifest.json").read_text())
    assert manifest["verification"]["final"]["parity"]["passed"] is True
    assert manifest["postprocess"]["steps"] == [f"optimize:{level}", method]


@pytest.mark.parametrize("low_memory", [False, True])
def test_exclusions_that_leave_nothing_to_quantize_are_refused(tmp_path, low_memory):
    """--exclude model once wrote an "int8" artifact with every weight in float32."""
    folder = save_tiny_model("llama", tmp_path / "tiny")
    result = CliRunner().invoke(cli, ["export", str(folder), "--backend", "onnx", "--quantize", "int8",
                                      "--exclude", "model", "--exclude", "lm_head", *FAST,
                                      *(["--low-memory"] if low_memory else []), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "no weight node to quantize" in result.output and "hint:" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
