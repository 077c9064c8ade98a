"""Per-layer precision: formats checked against ONNX Runtime's own quantizers, byte counts against
the written initializers, the integer program against brute force, probes against full forwards."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from helpers import tiny_model

from cwca_export.planning.precision import (
    PrecisionDamage,
    StorageFormat,
    artifact_weight_bytes,
    fake_quantize,
    fake_quantize_table,
    fisher_precision_estimate,
    measure_precision_damage,
    precision_groups,
    quantize_linear_,
    quantized_weights,
    solve_precision,
)

FORMATS = ["int8", "int4-b32", "int4-b32-asym", "int4-b16", "int4-b64-asym", "int8-b32", "int8-b128-asym",
           "int4-b32-a8", "int4-b64-asym-a8"]


def _two_node_graph(tmp_path, w, e):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="/mm/MatMul"),
         helper.make_node("Gather", ["E", "ids"], ["z"], name="/emb/Gather")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [e.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, list(e.shape))],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(e, "E")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "a.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("name", FORMATS)
def test_fake_quantization_is_what_onnx_runtime_computes(tmp_path, name):
    """De-quantized weights from ONNX Runtime's own quantizer (an identity input reads them out)."""
    import onnxruntime as ort

    from cwca_export.exporter.postprocess import graph_formats, quantize_mixed

    rng = np.random.default_rng(0)
    # K = 96: a partial block at 64; fp16-representable values, as checkpoints stored in half precision
    # have, make rounding ties common (the two ONNX Runtime quantizers break them differently)
    w = (rng.standard_normal((96, 40)) * 0.05).astype(np.float16).astype(np.float32)
    w[:, 3] = 0  # an all-zero column (scale 0)
    w[::8, 5] = np.float32(0.5)  # exact ties against the block maximum
    e = (rng.standard_normal((50, 64)) * 0.05 + 0.01).astype(np.float16).astype(np.float32)
    fmt = StorageFormat.parse(name)
    plan = {"/mm/MatMul": fmt}
    if (fmt.bits == 4 and not fmt.int8_compute) or fmt.dynamic:
        plan["/emb/Gather"] = fmt
    quantize_mixed(_two_node_graph(tmp_path, w, e), tmp_path / "q.onnx", plan)
    assert graph_formats(tmp_path / "q.onnx") == {
        "/mm/MatMul": fmt.name,
        "/emb/Gather": fmt.name if "/emb/Gather" in plan else "fp32",
    }
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    if fmt.dynamic or fmt.int8_compute:  # activations are quantized per call: compare a product
        x = rng.standard_normal((5, 96)).astype(np.float32)
        y, z = session.run(None, {"x": x, "ids": np.arange(50)})
        linear = torch.nn.Linear(96, 40, bias=False)
        linear.weight.data = torch.from_numpy(w.T.copy())
        quantize_linear_(linear, fmt)
        ref = linear(torch.from_numpy(x)).detach().numpy()
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
        assert np.abs(y - x @ w).max() > 1e-3 * np.abs(ref).max()  # it did quantize
    else:
        y, z = session.run(None, {"x": np.eye(96, dtype=np.float32), "ids": np.arange(50)})
        ref = fake_quantize(torch.from_numpy(w.T.copy()), fmt).numpy().T
        np.testing.assert_array_equal(y, ref)
    if "/emb/Gather" in plan:
        np.testing.assert_allclose(z, fake_quantize_table(torch.from_numpy(e), fmt).numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", FORMATS)
def test_byte_counts_equal_the_initializers_written(tmp_path, name):
    import onnx
    from onnx import numpy_helper

    from cwca_export.exporter.postprocess import quantize_mixed

    rng = np.random.default_rng(1)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    e = rng.standard_normal((50, 64)).astype(np.float32)
    fmt = StorageFormat.parse(name)
    plan = {"/mm/MatMul": fmt}
    gather = (fmt.bits == 4 and not fmt.int8_compute) or fmt.dynamic
    if gather:
        plan["/emb/Gather"] = fmt
    quantize_mixed(_two_node_graph(tmp_path, w, e), tmp_path / "q.onnx", plan)
    model = onnx.load(tmp_path / "q.onnx")
    sizes = {}
    for init in model.graph.initializer:
        data = init.raw_data if init.raw_data else numpy_helper.to_array(init).tobytes()
        sizes[init.name] = len(data)
    table = sum(v for k, v in sizes.items() if k.startswith("E"))
    matmul = sum(v for k, v in sizes.items() if not k.startswith("E"))
    assert matmul == fmt.matmul_bytes(40, 96)
    assert table == (fmt.gather_bytes(50, 64) if gather else 4 * 50 * 64)
    # the data file holds the graph's tensors and nothing else: quantize_dynamic's own save under
    # the same name once stayed in it as dead bytes (onnx appends), doubling dynamic int8 graphs
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    raw = onnx.load(tmp_path / "q.onnx", load_external_data=False)
    lengths = [ExternalDataInfo(t).length for t in raw.graph.initializer if uses_external_data(t)]
    data = tmp_path / "q.onnx.data"
    assert (data.stat().st_size if data.exists() else 0) == sum(lengths)


def test_format_names_and_errors():
    assert StorageFormat.parse("int4") == StorageFormat("int4", 4, 32, True)
    assert StorageFormat.parse("int4-b128-asym").symmetric is False
    assert StorageFormat.parse("int8").dynamic
    a8 = StorageFormat.parse("int4-b64-asym-a8")
    assert (a8.bits, a8.block_size, a8.symmetric, a8.int8_compute) == (4, 64, False, True)
    for bad in ("int3", "int4-b24", "fp8", "int4-b8"):
        with pytest.raises(ValueError, match="--formats|power of two"):
            StorageFormat.parse(bad)
    with pytest.raises(ValueError, match="4-bit Gathers"):
        StorageFormat.parse("int8-b32").gather_bytes(10, 64)


def _brute(damage: PrecisionDamage, budget: float):
    best = (math.inf, None)
    rows = [[(b, d, f) for b, d, f in zip(damage.bytes[g], damage.damage[g], damage.formats, strict=True)
             if b is not None] for g in range(len(damage.groups))]
    for combo in itertools.product(*rows):
        if sum(c[0] for c in combo) <= budget:
            total = sum(c[1] for c in combo)
            if total < best[0] - 1e-12:
                best = (total, combo)
    return best


@pytest.mark.parametrize("seed", range(25))
def test_solver_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    formats = ["fp32", "int8", "int4-b128", "int4-b32"]
    groups = [f"g{i}" for i in range(5)]
    bytes_ = [[int(v) for v in sorted(rng.integers(10, 400, 4), reverse=True)] for _ in groups]
    damage = [[0.0, *sorted(rng.random(3) * rng.random())] for _ in groups]
    for row in bytes_:
        if rng.random() < 0.3:
            row[2] = row[1]  # equal bytes: the solver keeps the better one
    table = PrecisionDamage(groups, formats, damage, bytes_, 3.0)
    least = sum(min(r) for r in bytes_)
    budget = float(rng.uniform(least, sum(max(r) for r in bytes_)))
    plan = solve_precision(table, budget)
    expected, _ = _brute(table, budget)
    assert plan.weight_bytes <= budget
    assert plan.predicted_damage == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="--max-memory"):
        solve_precision(table, least - 1)


def test_groups_and_artifact_bytes_of_a_tied_model():
    model = tiny_model("llama", tie_word_embeddings=True)
    groups = precision_groups(model)
    assert [g.name for g in groups] == ["model.layers.0", "model.layers.1", "embed", "head", "tied"]
    assert groups[0].shapes == [tuple(m.weight.shape) for n, m in model.named_modules()
                                if n.startswith("model.layers.0.") and isinstance(m, torch.nn.Linear)]
    fp32 = 4 * sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert artifact_weight_bytes(model, {}) == fp32
    emb = model.get_input_embeddings().weight.numel()
    int4 = StorageFormat.parse("int4-b32")
    untied = artifact_weight_bytes(model, {"embed": "int4-b32"})
    assert untied == fp32 - 4 * emb + int4.gather_bytes(*model.get_input_embeddings().weight.shape) + 4 * emb
    # the tied alternative: one uint8 table that the head reads too
    shared = artifact_weight_bytes(model, {"tied": "int8"})
    assert shared == fp32 - 4 * emb + emb + 5


def test_a_tied_int8_table_is_what_onnx_runtime_computes_and_stores_once(tmp_path):
    """The head reads the embedding's uint8 table (Transpose, DequantizeLinear): exact against torch
    computing with that table, and the fp32 table is gone from the graph."""
    import onnx

    from cwca_export.exporter.build import ExportSettings, build_candidate
    from cwca_export.exporter.measure import MeasureConfig

    model = tiny_model("llama", tie_word_embeddings=True, hidden_size=64, intermediate_size=128)
    plan = {"model.layers.0": "int4-b32", "model.layers.1": "int8", "tied": "int8"}
    settings = ExportSettings(backend="onnx", precision=plan, measure=MeasureConfig(prompt_len=8, context=24, runs=2,
                                                                                    warmup=1))
    (tmp_path / "a").mkdir()
    c = build_candidate(model, None, tmp_path / "a", settings)
    assert c.verification["final"]["parity"]["passed"]
    graph = onnx.load(str(c.model_path), load_external_data=False).graph
    tables = [i for i in graph.initializer if list(i.dims) == [model.config.vocab_size, 64]]
    assert len(tables) == 1 and tables[0].data_type == onnx.TensorProto.UINT8
    assert c.prediction["weights_bytes"] == artifact_weight_bytes(model, plan)


def _copy_quantized_loss(model, ids, assignment):
    """Independent reference: a deep copy whose weights are replaced, untied, and a full forward."""
    import copy

    from cwca_export.planning.damage import calibration_loss

    work = copy.deepcopy(model)
    groups = {g.name: g for g in precision_groups(work)}
    hooks = []
    with torch.no_grad():
        if "head" in assignment or "embed" in assignment:
            head = work.get_output_embeddings()
            head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untie
        for name, fmt in assignment.items():
            for path in groups[name].modules:
                module = work.get_submodule(path)
                if name in ("embed", "tied"):  # tied: the one table both the embedding and the head read
                    module.weight.copy_(fake_quantize_table(module.weight, fmt))
                else:
                    hooks += quantize_linear_(module, fmt)
    return calibration_loss(work, ids, batch_size=4)


def test_probes_equal_full_forwards_of_quantized_copies():
    from cwca_export.planning.damage import calibration_loss

    model = tiny_model("llama", num_hidden_layers=3, tie_word_embeddings=True)
    ids = torch.randint(0, model.config.vocab_size, (6, 24), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = measure_precision_damage(model, ids, ["int8", "int4-b16", "int4-b16-asym"], batch_size=4)
    base = calibration_loss(model, ids, batch_size=4)
    assert table.formats == ["fp32", "int8", "int4-b16", "int4-b16-asym"]
    for g, name in enumerate(table.groups):
        for f, fmt in enumerate(table.formats[1:], start=1):
            if name == "tied" and fmt != "int8":  # one table both read: fp32 or uint8 only
                assert table.damage[g][f] is None and table.bytes[g][f] is None
                continue
            expected = _copy_quantized_loss(model, ids, {name: StorageFormat.parse(fmt)}) - base
            assert table.damage[g][f] == pytest.approx(expected, abs=2e-5), (name, fmt)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # model untouched
    # the context manager computes the same loss as the independent copy, and restores
    plan = {"model.layers.1": StorageFormat.parse("int4-b16"), "embed": StorageFormat.parse("int8"),
            "head": StorageFormat.parse("int4-b16-asym")}
    with quantized_weights(model, plan):
        inside = calibration_loss(model, ids, batch_size=4)
    assert inside == pytest.approx(_copy_quantized_loss(model, ids, plan), abs=2e-5)
    assert calibration_loss(model, ids, batch_size=4) == pytest.approx(base, abs=1e-7)


def _fisher_error(model, ids, path, fmt):
    """1/2 sum F (w - q(w))^2 for one Linear, F from autograd per sequence (the reference)."""
    weight = model.get_submodule(path).weight
    fisher = torch.zeros_like(weight)
    for row in ids:
        grad, = torch.autograd.grad(model(input_ids=row[None], labels=row[None]).loss, weight)
        fisher += grad ** 2
    fisher *= (ids.shape[1] - 1) / ids.shape[0]
    err = weight.detach() - fake_quantize(weight.detach(), fmt)
    return 0.5 * float((fisher * err ** 2).sum())


def test_fisher_estimate_against_autograd_per_sequence():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    fmt = StorageFormat.parse("int4-b16")
    est = fisher_precision_estimate(model, ids, ["int4-b16"])
    block = precision_groups(model)[0]
    expected = sum(_fisher_error(model, ids, path, fmt) for path in block.modules)  # a block sums its Linears
    assert est.damage[0][0] == 0.0
    assert est.damage[0][1] == pytest.approx(expected, rel=1e-4)


def _brute_limited(table, budget, limits):
    """Every assignment (tied or embed/head variants alike): least damage meeting all rows."""
    best = None
    indices = range(len(table.groups))
    for combo in itertools.product(*[range(len(table.formats)) for _ in indices]):
        if any(table.bytes[g][f] is None for g, f in zip(indices, combo, strict=True)):
            continue
        if sum(table.bytes[g][f] for g, f in zip(indices, combo, strict=True)) > budget:
            continue
        if any(sum(c[g][f] for g, f in zip(indices, combo, strict=True)) > cap for c, cap in limits):
            continue
        total = sum(table.damage[g][f] for g, f in zip(indices, combo, strict=True))
        if best is None or total < best:
            best = total
    return best


@pytest.mark.parametrize("seed", range(20))
def test_solver_with_latency_rows_matches_brute_force(seed):
    """Byte budget plus one or two latency rows (costs of either sign): the 0/1 program's damage
    equals exhaustive enumeration, and the plan meets every row."""
    rng = np.random.default_rng(100 + seed)
    formats = ["fp32", "int8", "int4-b128", "int4-b32"]
    groups = [f"g{i}" for i in range(5)]
    bytes_ = [[int(v) for v in sorted(rng.integers(10, 400, 4), reverse=True)] for _ in groups]
    damage = [[0.0, *sorted(rng.random(3) * rng.random())] for _ in groups]
    table = PrecisionDamage(groups, formats, damage, bytes_, 3.0)
    rows = [[list(rng.normal(0.0, 1.0, 4)) for _ in groups] for _ in range(1 + seed % 2)]
    least = sum(min(r) for r in bytes_)
    budget = float(rng.uniform(least, sum(max(r) for r in bytes_)))
    limits = [(r, float(rng.uniform(-1.0, 2.0))) for r in rows]
    expected = _brute_limited(table, budget, limits)
    if expected is None:
        with pytest.raises(ValueError, match="--max-latency-ms"):
            solve_precision(table, budget, limits=limits)
        return
    plan = solve_precision(table, budget, limits=limits)
    chosen = [formats.index(plan.formats[g]) for g in groups]
    assert plan.weight_bytes <= budget
    for r, cap in limits:
        assert sum(r[g][f] for g, f in enumerate(chosen)) <= cap + 1e-9
    assert plan.predicted_damage == pytest.approx(expected, abs=1e-9)
