"""Low-memory export (issue 14): placeholder tracing, initialisers written per tensor, the torch
weights released after torch's reference, the external layout streamed one tensor at a time.

The references are independent of the new code: the artifact the ordinary export writes from
the real weights (byte for byte), ``onnx.save_model``'s own external-data layout, and the torch
model's logits computed by the test on a copy taken before the export."""

from __future__ import annotations

import copy
import filecmp
import json

import onnx
import pytest
import torch
from helpers import ort_logit_error, save_tiny_model, tiny_model, tiny_tokenizer

import cwca_export
from cwca_export.budget import Budget
from cwca_export.exporter import postprocess as pp
from cwca_export.exporter.manifest import MANIFEST_NAME, describe_model
from cwca_export.exporter.placeholders import FINGERPRINT_BASE, PlaceholderError, Placeholders

FAST = {"budget": Budget(prompt_len=8, context=24), "runs": 2, "warmup": 1}


def _graph_files(folder):
    return ["model.onnx"] + (["model.onnx_data"] if (folder / "model.onnx_data").exists() else [])


@pytest.mark.parametrize(("family", "threshold"), [("llama", pp.PROTOBUF_LIMIT), ("gpt2", 1024), ("gemma", 1024)])
def test_low_memory_artifact_is_the_ordinary_one_byte_for_byte(tmp_path, family, threshold):
    """Same graph, same node layout, same initialiser bytes: inline (llama) and external data,
    tied embeddings (gpt2, gemma); and its logits match the torch model's."""
    model = tiny_model(family)
    reference_model = copy.deepcopy(model)
    ordinary = cwca_export.export(tiny_model(family), None, tmp_path / "ordinary", backend="onnx",
                                  tokenizer=tiny_tokenizer(), external_data_threshold=threshold, **FAST)
    lean = cwca_export.export(model, None, tmp_path / "lean", backend="onnx", tokenizer=tiny_tokenizer(),
                              external_data_threshold=threshold, low_memory=True, **FAST)
    # no scratch file left behind
    assert sorted(p.name for p in lean.path.iterdir()) == sorted(p.name for p in ordinary.path.iterdir())
    files = _graph_files(ordinary.path)
    assert files == _graph_files(lean.path) and (len(files) == 2) == (threshold == 1024)
    for name in files:
        assert filecmp.cmp(ordinary.path / name, lean.path / name, shallow=False), name
    assert lean.manifest["model"] == ordinary.manifest["model"]  # described before the weights went
    assert lean.manifest["verification"]["fp32"]["generation"]["passed"] is True

    assert ort_logit_error(reference_model, lean.model_path, length=9, pad=2, seed=5) < 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # Conv1D weights as they are; Linear ones transposed
def test_blockwise_writes_give_the_same_bytes(tmp_path, monkeypatch, family):
    """Blocks of 256 bytes: every matrix spilled, read back and transposed in many pieces."""
    from cwca_export.exporter import placeholders

    monkeypatch.setattr(placeholders, "CHUNK_BYTES", 256)
    ordinary = cwca_export.export(tiny_model(family), None, tmp_path / "ordinary", backend="onnx",
                                  external_data_threshold=1024, **FAST)
    lean = cwca_export.export(tiny_model(family), None, tmp_path / "lean", backend="onnx",
                              external_data_threshold=1024, low_memory=True, **FAST)
    for name in ("model.onnx", "model.onnx_data"):
        assert filecmp.cmp(ordinary.path / name, lean.path / name, shallow=False), name


def test_the_torch_weights_are_released_after_the_reference_and_before_any_session(tmp_path, monkeypatch):
    """Every torch forward comes before the trace and the first ONNX Runtime session; from the
    trace on the model's matrices are zero-stride placeholders (one value per row of memory)."""
    from cwca_export.backends import get_backend

    from cwca_export.exporter import build, verify

    model = tiny_model("llama")
    before = describe_model(model)
    events: list[str] = []
    backend = type(get_backend("onnx"))
    trace = backend.export

    def logged_trace(self, traced, *a, **k):
        matrices = [p for p in traced.parameters() if p.dim() >= 2]
        events.append("trace" if all(0 in p.stride() for p in matrices) else "trace-with-weights")
        return trace(self, traced, *a, **k)

    monkeypatch.setattr(backend, "export", logged_trace)
    forward = verify.torch_logits

    def logged_forward(*a, **k):
        events.append("torch")
        return forward(*a, **k)

    opened = build.make_session

    def logged_session(*a, **k):
        matrices = [p for p in model.parameters() if p.dim() >= 2]
        events.append("session" if all(0 in p.stride() for p in matrices) else "session-with-weights")
        return opened(*a, **k)

    monkeypatch.setattr(verify, "torch_logits", logged_forward)
    monkeypatch.setattr(build, "make_session", logged_session)
    art = cwca_export.export(model, None, tmp_path / "a", backend="onnx", quantize="int8", low_memory=True, **FAST)
    assert events.count("session") == 2 and "session-with-weights" not in events  # fp32 and int8 checks
    assert "trace-with-weights" not in events
    assert events.index("trace") > max(i for i, e in enumerate(events) if e == "torch")
    assert events.index("session") > events.index("trace")
    assert art.manifest["model"] == before
    assert art.manifest["verification"]["final"]["parity"]["passed"] is True
    held = sum(p.untyped_storage().nbytes() for p in model.parameters() if p.dim() >= 2)
    assert held < sum(p.numel() for p in model.parameters() if p.dim() >= 2)  # bytes < element count


def test_ordinary_export_takes_torch_reference_before_its_sessions(tmp_path, monkeypatch):
    """Both backends: torch's logits, greedy tokens and (optimum) ``generate`` all come first."""
    from cwca_export.exporter import build, verify

    events: list[str] = []
    for name in ("torch_logits", "hf_generate"):
        real = getattr(verify, name)
        monkeypatch.setattr(verify, name, lambda *a, _real=real, **k: events.append("torch") or _real(*a, **k))
    opened = build.make_session
    monkeypatch.setattr(build, "make_session", lambda *a, **k: events.append("session") or opened(*a, **k))
    art = cwca_export.export(tiny_model("llama"), None, tmp_path / "a", tokenizer=tiny_tokenizer(), **FAST)
    assert events.index("session") > max(i for i, e in enumerate(events) if e == "torch")
    assert art.manifest["verification"]["fp32"]["generation"]["runtime_equal"] is True


@pytest.mark.parametrize("threshold", [pp.PROTOBUF_LIMIT, 1024])
def test_streamed_external_layout_equals_onnx_save_model(tmp_path, threshold):
    """From an inline graph and from one with external data: the same two files onnx writes."""
    art = cwca_export.export(tiny_model("qwen2"), None, tmp_path / "a", backend="onnx",
                             external_data_threshold=threshold, **FAST)
    for out in ("onnx", "stream"):
        (tmp_path / out).mkdir()
    onnx.save_model(onnx.load(str(art.model_path)), str(tmp_path / "onnx" / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=pp.EXTERNAL_DATA_NAME, size_threshold=1024)
    pp.stream_external_layout(art.model_path, tmp_path / "stream" / "model.onnx")
    for name in ("model.onnx", pp.EXTERNAL_DATA_NAME):
        assert filecmp.cmp(tmp_path / "onnx" / name, tmp_path / "stream" / name, shallow=False), name


def test_placeholders_without_a_spill_file_give_the_real_parameters_back():
    from cwca_export.exporter.placeholders import placeholder_weights

    model = tiny_model("gpt2")
    params = dict(model.named_parameters())
    with placeholder_weights(model) as stand_ins:
        assert all(0 in p.stride() for p in model.parameters() if p.dim() >= 2)
        assert len(stand_ins.sources) == sum(1 for p in params.values() if p.dim() >= 2)
    assert all(p is params[n] for n, p in model.named_parameters())


def test_a_placeholder_folded_into_anything_else_is_an_error():
    value = -FINGERPRINT_BASE
    stand_ins = Placeholders(sources={value: torch.zeros(3, 4)})
    assert stand_ins.match("w", (3, 4), value, value, value)[1] is False
    assert stand_ins.match("w", (4, 3), value, value - 1, value)[1] is True
    assert stand_ins.match("norm", (4,), 1.0, 1.0, 1.0) is None  # written from real values
    with pytest.raises(PlaceholderError, match="other than itself or its transpose"):
        stand_ins.match("w", (2, 6), value, value, value)
    with pytest.raises(PlaceholderError, match="changed"):
        stand_ins.match("w", (3, 4), value - 1, value - 1, value - 1)


def test_low_memory_refusals_name_the_fix(tmp_path):
    from cwca_export.backends import register_backend, unregister_backend

    @register_backend("reloads-weights")
    class ReloadsWeights:  # a plug-in whose export reads the weights after tracing, like Optimum's
        def export(self, model, tokenizer, out_dir, **options):
            raise AssertionError("never called")

    model = tiny_model("llama")
    try:
        with pytest.raises(ValueError, match="--backend onnx"):
            cwca_export.export(model, None, tmp_path / "a", backend="reloads-weights", low_memory=True, **FAST)
    finally:
        unregister_backend("reloads-weights")
    with pytest.raises(ValueError, match="budget search"):
        cwca_export.export(model, None, tmp_path / "b", backend="onnx", low_memory=True,
                           budget=Budget(max_disk=10**9, prompt_len=8, context=24), runs=2, warmup=1)
    with pytest.raises(ValueError, match="precision plan"):
        cwca_export.export(model, None, tmp_path / "c", backend="onnx", low_memory=True,
                           precision={"model.layers.0": "int8"}, rounding="rtn", **FAST)
    assert all(p.stride()[-1] == 1 for p in model.parameters() if p.dim() >= 2)  # nothing released
    assert not any((tmp_path / n).exists() for n in "abc")


def test_cli_low_memory(tmp_path):
    from click.testing import CliRunner

    from cwca_export.cli import cli

    model_dir = save_tiny_model("llama", tmp_path / "tiny-llama")
    common = ["--prompt-len", "8", "--context", "24", "--runs", "2", "--warmup", "1"]
    result = CliRunner().invoke(cli, ["export", str(model_dir), "--low-memory", "--max-disk", "1GB", "--out",
                                      str(tmp_path / "o"), *common])
    assert result.exit_code == 2 and "--low-memory" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
    result = CliRunner().invoke(cli, ["export", str(model_dir), "--backend", "onnx", "--low-memory",
                                      "--external-data-threshold", "1KiB", "--out", str(tmp_path / "lean"), *common])
    assert result.exit_code == 0, result.output
    assert "low memory" in result.output and "fp32 greedy tokens equal torch" in result.output
    assert "written inline" not in result.output  # external data (1KiB threshold): the saving applies, no note
    manifest = json.loads((tmp_path / "lean" / MANIFEST_NAME).read_text())
    assert manifest["postprocess"]["external_data"] is True
    assert manifest["verification"]["fp32"]["parity"]["rel_rms"] < 1e-5


# ------------------------------------------------------------------ --backend optimum --low-memory


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
def test_optimum_low_memory_artifact_generates_through_ort_model_for_causal_lm(tmp_path, family):
    """The default backend under --low-memory: a folder Optimum's own loader opens, whose greedy
    tokens are transformers' on a copy of the model taken before the export (its weights go)."""
    from optimum.onnxruntime import ORTModelForCausalLM

    model = tiny_model(family)
    reference_model = copy.deepcopy(model)
    art = cwca_export.export(model, None, tmp_path / "a", backend="optimum", tokenizer=tiny_tokenizer(),
                             external_data_threshold=1024, low_memory=True, **FAST)
    assert sorted(p.name for p in art.path.glob("model.onnx*")) == ["model.onnx", "model.onnx_data"]
    assert art.manifest["backend"] == {"name": "optimum", "options": {}, "traced_without_weights": True}
    assert art.manifest["verification"]["fp32"]["generation"]["runtime_equal"] is True
    ids = torch.tensor([[5, 9, 13, 2, 7, 11], [0, 0, 4, 8, 15, 16]])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    ort_model = ORTModelForCausalLM.from_pretrained(art.path, use_io_binding=False, local_files_only=True)
    got = ort_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6)
    expected = reference_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                                        pad_token_id=0)
    assert torch.equal(got, expected)


def test_optimum_low_memory_loader_check_runs_without_prepacking(tmp_path, monkeypatch):
    """The float32 graph's sessions never prepack under --low-memory: Optimum's loader neither."""
    from optimum.onnxruntime import ORTModelForCausalLM

    seen = []
    real = ORTModelForCausalLM.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        try:
            seen.append(kwargs["session_options"].get_session_config_entry("session.disable_prepacking"))
        except RuntimeError:  # not set: ONNX Runtime's default, prepacking
            seen.append(None)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(ORTModelForCausalLM, "from_pretrained", classmethod(recording))
    cwca_export.export(tiny_model("llama"), None, tmp_path / "lean", backend="optimum", tokenizer=tiny_tokenizer(),
                       external_data_threshold=1024, low_memory=True, **FAST)
    cwca_export.export(tiny_model("llama"), None, tmp_path / "plain", backend="optimum", tokenizer=tiny_tokenizer(),
                       **FAST)
    assert seen == ["1", None]


def test_optimum_low_memory_refuses_what_optimum_refuses_before_the_trace(tmp_path, monkeypatch):
    """Per-block head counts, Phi-3 with grouped KV heads, Mixtral, before the weights are spilled:
    ORTModelForCausalLM sizes its first cache from the config (tried: these fail there with the
    onnx backend's graph too)."""
    import transformers
    from cwca_export.backends import UnsupportedModelError
    from test_export_heads import _head_pruned

    from cwca_export.exporter import build

    def no_work(*args, **kwargs):
        raise AssertionError("the weights were spilled for a refused model")

    monkeypatch.setattr(build, "map_weights", no_work)
    mixtral_config = transformers.MixtralConfig(
        vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2)
    mixtral = transformers.AutoModelForCausalLM.from_config(mixtral_config).eval()
    for name, model, why in [("heads", _head_pruned("llama")[0], "own head counts"),
                             ("phi3", tiny_model("phi3"), "grouped KV heads"),
                             ("mixtral", mixtral, "no ONNX config")]:
        with pytest.raises(UnsupportedModelError, match=f"{why}.*--backend onnx"):
            cwca_export.export(model, None, tmp_path / name, backend="optimum", low_memory=True, **FAST)
        assert not (tmp_path / name).exists()


def test_optimum_refuses_before_a_plan_compresses_the_model(tmp_path, monkeypatch):
    """With --method and --plan the model is compressed before it is built: a model the optimum
    backend refuses (Phi-3 with grouped KV heads) was compressed first (calibration passes, an
    hour at scale) and refused after. Now before the plan is applied."""
    from compress_plans import make_plan
    from cwca_export.backends import UnsupportedModelError
    from helpers import sample_text

    from cwca_export.data import calibration_data
    from cwca_export.exporter import api

    def no_work(*args, **kwargs):
        raise AssertionError("the plan was applied to a model the backend refuses")

    monkeypatch.setattr(api, "apply_plan", no_work)
    model = tiny_model("phi3")
    (tmp_path / "calib.txt").write_text(sample_text(), encoding="utf-8")
    data = calibration_data(tmp_path / "calib.txt", tiny_tokenizer(), num_samples=2, seq_len=32, seed=0)
    with pytest.raises(UnsupportedModelError, match="grouped KV heads.*--backend onnx"):
        cwca_export.export(model, make_plan(model, "prune", [0.3, 0.5]), tmp_path / "a", backend="optimum",
                           method="wanda", compress_options={"data": data}, low_memory=True, **FAST)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("low_memory", [True, False])
def test_no_kv_cache_with_optimum_is_refused_before_any_work(tmp_path, monkeypatch, low_memory):
    """--no-kv-cache with the default backend (which has no such option): refused after the model
    was loaded, spilled and run, with no flag named ("backend 'optimum' does not take option(s)
    ['with_past']"). Now a usage error naming --no-kv-cache and --backend onnx before loading;
    through the API, before the weights are spilled or the torch reference taken."""
    from click.testing import CliRunner

    from cwca_export import loading
    from cwca_export.cli import cli
    from cwca_export.exporter import build

    model_dir = save_tiny_model("llama", tmp_path / "tiny-llama")

    def no_work(*args, **kwargs):
        raise AssertionError("work done for an option the backend does not take")

    monkeypatch.setattr(loading, "load_model", no_work)
    monkeypatch.setattr(build, "map_weights", no_work)
    monkeypatch.setattr(build, "torch_reference", no_work)
    args = ["export", str(model_dir), "--no-kv-cache", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, args + (["--low-memory"] if low_memory else []))
    assert result.exit_code == 2, result.output
    assert "--no-kv-cache" in result.output and "--backend onnx" in result.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match=r"with_past.*onnx"):
        cwca_export.export(tiny_model("llama"), None, tmp_path / "a", backend="optimum",
                           backend_options={"with_past": False}, low_memory=low_memory, **FAST)
    assert not (tmp_path / "a").exists()
