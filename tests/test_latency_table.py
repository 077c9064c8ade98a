"""The per-group latency table: its graphs compute what they stand for, its arithmetic, and the
budget search using it to keep candidates over a latency limit from being built."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from helpers import tiny_model
from onnx import numpy_helper

from cwca_export.atomic import Staging
from cwca_export.budget import Budget, parse_size
from cwca_export.exporter import BudgetError
from cwca_export.exporter import postprocess as pp
from cwca_export.exporter.build import ExportSettings
from cwca_export.exporter.latency_table import LatencyModel, LatencyTable, LatencyTimer, group_graph
from cwca_export.exporter.measure import MeasureConfig
from cwca_export.exporter.search import fit_budget
from cwca_export.exporter.session import make_session
from cwca_export.planning.precision import StorageFormat

WORKLOAD = {"prompt_len": 8, "context": 24}


def test_block_graph_computes_every_copy_and_takes_each_format(tmp_path):
    """Each copy's output is x @ W^T of its own initializer (numpy reference), and a quantize_mixed
    pass puts every copy's node in the format, read back from the graph."""
    shapes = [(24, 16), (16, 24)]
    graph = group_graph("block", shapes, copies=3)
    path = tmp_path / "g.onnx"
    onnx.save(graph, str(path))
    weights = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    assert len(weights) == 6 and len({w.tobytes() for w in weights.values()}) == 6  # distinct weights
    session = make_session(path)
    rng = np.random.default_rng(0)
    feeds = {"x0": rng.standard_normal((2, 3, 16)).astype(np.float32),
             "x1": rng.standard_normal((2, 3, 24)).astype(np.float32)}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    for c in range(3):
        for i in range(2):
            expected = feeds[f"x{i}"] @ weights[f"w{c}_{i}"]
            np.testing.assert_allclose(outputs[f"y{c}_{i}"], expected, rtol=1e-5, atol=1e-5)
    for fmt in ("int8", "int4-b32", "int4-b16-asym"):
        dst = tmp_path / f"{fmt}.onnx"
        nodes = {n: StorageFormat.parse(fmt) for n in pp.weight_nodes(graph)}
        pp.quantize_mixed(path, dst, nodes)
        found = pp.graph_formats(dst)
        assert {found[n] for n in nodes} == {pp.canonical_format(fmt)}, found
        make_session(dst).run(None, feeds)


def test_tied_graph_reads_one_table_for_gather_and_head(tmp_path):
    graph = group_graph("tied", [(40, 16)])
    path = tmp_path / "t.onnx"
    onnx.save(graph, str(path))
    table = numpy_helper.to_array(graph.graph.initializer[0])
    ids = np.array([[1, 7, 39]], dtype=np.int64)
    x = np.random.default_rng(1).standard_normal((1, 3, 16)).astype(np.float32)
    embedded, logits = make_session(path).run(None, {"ids": ids, "x0": x})
    np.testing.assert_array_equal(embedded, table[ids])
    np.testing.assert_allclose(logits, x @ table.T, rtol=1e-5, atol=1e-5)


def _table(groups, formats, decode, prefill=None):
    return LatencyTable(groups, formats, decode, prefill or decode)


def test_delta_counts_tied_or_embed_and_head_against_the_references_fp32():
    groups = ["model.layers.0", "model.layers.1", "embed", "head", "tied"]
    formats = ["fp32", "int8", "int4-b32"]
    ref = _table(groups, formats, [[1.0, 0.5, 0.7], [1.0, 0.5, 0.7], [0.1, 0.1, 0.2], [2.0, 0.4, 0.9],
                                   [2.2, 2.5, None]])
    narrow = _table(groups, formats, [[0.6, 0.3, 0.4], [1.0, 0.5, 0.7], [0.1, 0.1, 0.2], [2.0, 0.4, 0.9],
                                      [2.2, 2.5, None]])
    # embed and head variant: every group but tied
    assert narrow.delta({"model.layers.0": "int8", "head": "int4-b32"}, ref) == pytest.approx((0.3 - 1.0) + (0.9 - 2.0))
    # tied variant: every group but embed and head
    assert narrow.delta({"tied": "int8"}, ref) == pytest.approx((0.6 - 1.0) + (2.5 - 2.2))
    assert ref.delta({}) == 0.0
    with pytest.raises(ValueError, match="tied"):
        ref.delta({"tied": "int4-b32"})


class _FixedTimer:
    """A timer whose tables are given (the arithmetic of LatencyModel, not the timing)."""

    def __init__(self, tables):
        self.tables = tables
        self.seconds = 0.0

    def table(self, model):
        return self.tables[model]


def test_model_rows_follow_the_damage_tables_order_and_correct_by_measured_errors():
    groups = ["model.layers.0", "embed", "head"]
    ref = _table(groups, ["fp32", "int8", "int4-b32"], [[1.0, 0.5, 0.7], [0.1, 0.1, 0.2], [2.0, 0.4, 0.9]],
                 [[10.0, 4.0, 8.0], [1.0, 1.0, 2.0], [20.0, 5.0, 9.0]])
    latency = LatencyModel(_FixedTimer({"m": ref}), "m", {"decode": 5.0, "prefill": 50.0})
    formats = {"model.layers.0": "int4-b32", "head": "int8"}
    assert latency.predict("m", formats) == pytest.approx({"decode": 5.0 - 0.3 - 1.6, "prefill": 50.0 - 2.0 - 15.0})
    rows = latency.rows("m", {"decode": 4.0, "prefill": None}, ["head", "embed", "model.layers.0"],
                        ["int4-b32", "fp32", "int8"])
    assert len(rows) == 1
    costs, cap = rows[0]
    np.testing.assert_allclose(costs, [[-1.1, 0.0, -1.6], [0.1, 0.0, 0.0], [-0.3, 0.0, -0.5]])
    assert cap == pytest.approx(4.0 - 5.0)
    latency.observe(latency.raw("m", formats), {"decode": 3.6, "prefill": 30.0})
    assert latency.bias("decode") == pytest.approx(3.6 - 3.1)
    assert latency.predict("m", formats)["decode"] == pytest.approx(3.6)
    assert latency.rows("m", {"decode": 4.0}, groups, ["fp32"])[0][1] == pytest.approx(4.0 - 5.0 - 0.5)


def test_timer_caches_identical_blocks_and_times_a_real_model():
    model = tiny_model("llama", num_hidden_layers=3)
    timer = LatencyTimer(MeasureConfig(prompt_len=4, runs=3, warmup=1, threads=1), ["int8", "int4-b32"])
    table = timer.table(model)
    assert table.groups[:3] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert table.decode_ms[0] == table.decode_ms[1] == table.decode_ms[2]  # one measurement for equal shapes
    assert all(v is not None and v > 0 for v in table.decode_ms[0] + table.prefill_ms[0])
    keys = {k for k in timer.cache if k[0] == "block"}
    assert len(keys) == 3  # fp32, int8, int4-b32: once each
    if "tied" in table.groups:
        assert table.decode_ms[table.groups.index("tied")][2] is None  # tied tables take int8 or fp32 only


def test_search_does_not_build_candidates_predicted_over_the_latency_limit(tmp_path):
    """A decode limit far below anything ONNX Runtime can run: every candidate is predicted over
    it, so nothing but the reference is built, and the error names the latency."""
    model = tiny_model("llama", hidden_size=128, intermediate_size=512)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    settings = ExportSettings(backend="onnx", measure=MeasureConfig(prompt_len=8, context=24, runs=3, warmup=1))
    budget = Budget(max_disk=parse_size("1GB"), max_latency_ms=1e-3, **WORKLOAD)
    with Staging(tmp_path / "out") as staging, pytest.raises(BudgetError, match="decode 0.001 ms"):
        fit_budget(model, None, None, settings, budget, staging, calibration=ids)


def test_search_records_predicted_latency_and_its_measured_error(tmp_path):
    model = tiny_model("llama", hidden_size=128, intermediate_size=512)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    settings = ExportSettings(backend="onnx", measure=MeasureConfig(prompt_len=8, context=24, runs=3, warmup=1))
    full = 4 * sum(p.numel() for p in model.parameters())
    budget = Budget(max_disk=int(full * 0.6), max_latency_ms=1e4, **WORKLOAD)
    with Staging(tmp_path / "out") as staging:
        candidate, record, _ = fit_budget(model, None, None, settings, budget, staging, calibration=ids)
    latency = record["latency_table"]
    assert latency is not None and latency["reference"]["groups"][0] == "model.layers.0"
    built = [t for t in record["trials"][1:] if t["measured"]]
    assert built and len(latency["errors_ms"]["decode"]) == len(built)
    priced = [c for c in record["candidates"] if c["calib_loss"] is not None and c["formats"]]
    assert priced and all("decode_p50_ms" in c["predicted"] for c in priced)


def test_a_latency_limit_on_the_cpu_offers_int8_compute_variants_by_default():
    from cwca_export.exporter.search import search_formats

    settings = ExportSettings(backend="onnx")
    plain = search_formats(Budget(max_disk=10**6, **WORKLOAD), settings)
    limited = search_formats(Budget(max_disk=10**6, max_latency_ms=5.0, **WORKLOAD), settings)
    assert not any(f.endswith("-a8") for f in plain)
    assert limited == plain + [f"{f}-a8" for f in plain if f.startswith("int4")]
    chosen = search_formats(Budget(max_disk=10**6, max_latency_ms=5.0, **WORKLOAD), settings, "fp32,int4-b32")
    assert chosen == ["fp32", "int4-b32"]  # formats the user named are kept as named
    cuda = search_formats(Budget(max_disk=10**6, ep="cuda", **WORKLOAD), settings, "fp32,int8,int4-b32,int4-b32-a8")
    assert cuda == ["fp32", "int4-b32"]  # dynamic int8 and int8 compute are CPU kernels


def test_int8_compute_plan_is_in_the_graph_and_what_onnx_runtime_computes(tmp_path):
    """An artifact whose blocks are int4 with int8 compute: every block node is ``MatMulNBits``
    with ``accuracy_level=4``, and ONNX Runtime's logits are those of torch with the same weights
    and per-block int8 inputs. Per Linear the match is to float round-off (test_precision); through
    a whole model a 1e-7 input difference can flip an input's int8 rounding, so the logits are
    compared to the emulation without input quantization: several times further away."""
    import onnx

    import cwca_export
    from cwca_export.evaluate import ort_logits_fn
    from cwca_export.planning.precision import quantized_weights

    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    plan = {"model.layers.0": "int4-b32-a8", "model.layers.1": "int4-b32-a8"}
    art = cwca_export.export(model, None, tmp_path / "a8", backend="onnx", precision=plan, rounding="rtn",
                             backend_options={"with_past": False}, runs=2, warmup=0)
    assert set(art.manifest["postprocess"]["precision"]["nodes"].values()) == {"int4-b32-a8"}
    nodes = [n for n in onnx.load(str(art.model_path)).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 14
    assert all({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["accuracy_level"] == 4
               for n in nodes)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    got = np.asarray(ort_logits_fn(str(art.path))(ids.numpy()))

    def torch_logits(assignment):
        with torch.no_grad(), quantized_weights(model, assignment):
            return model(input_ids=ids).logits.numpy()

    a8 = torch_logits({g: StorageFormat.parse(f) for g, f in plan.items()})
    plain = torch_logits({g: StorageFormat.parse("int4-b32") for g in plan})

    def rel(a, b):
        return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))

    assert rel(got, a8) < 0.5 * rel(got, plain)
