"""Export end to end on tiny models: both backends, parity, generation, manifest, quantization.

Artifacts are built once per module and shared; each export costs about a second on a
tiny model. The full family x backend matrix is marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cwca_export.backends import UnsupportedModelError
from helpers import factorise, sample_text, save_tiny_model, shrink_mlp, tiny_model, tiny_tokenizer

import cwca_export
from cwca_export.atomic import Staging
from cwca_export.budget import Budget
from cwca_export.exporter import VerificationError
from cwca_export.exporter.manifest import MANIFEST_NAME
from cwca_export.exporter.measure import file_inventory
from cwca_export.exporter.session import DecoderSession, make_session

# small workload: measurement is part of every export
FAST = {"budget": Budget(prompt_len=8, context=24), "runs": 3, "warmup": 1}


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llama_optimum(out, llama):
    return cwca_export.export(llama, None, out / "llama-optimum", tokenizer=tiny_tokenizer(), **FAST)


@pytest.fixture(scope="module")
def qwen2_int8(out):
    model = tiny_model("qwen2")
    q = cwca_export.QuantizeConfig("int8", exclude_nodes=("lm_head",), exclude_layers=(0,))
    return model, cwca_export.export(model, None, out / "qwen2-int8", backend="onnx", quantize=q, **FAST)


@pytest.fixture(scope="module")
def gpt2_int4_external(out):
    model = tiny_model("gpt2")
    art = cwca_export.export(
        model, None, out / "gpt2-int4", backend="onnx", quantize="int4", external_data_threshold=1024, **FAST
    )
    return model, art


@pytest.fixture(scope="module")
def mistral_compressed(out):
    """Heterogeneous MLP widths and factorised Linears, through Optimum."""
    model = tiny_model("mistral")
    shrink_mlp(model, 0, 24)
    factorise(model, "model.layers.1.mlp.down_proj", 8)
    factorise(model, "model.layers.0.self_attn.q_proj", 4)
    return model, cwca_export.export(model, None, out / "mistral-compressed", **FAST)


def _ops(art) -> dict[str, int]:
    graph = onnx.load(str(art.model_path), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ------------------------------------------------------------------ optimum, fp32


def test_optimum_artifact_loads_in_ort_model_for_causal_lm_and_generates_like_torch(llama_optimum, llama):
    from optimum.onnxruntime import ORTModelForCausalLM

    tok = tiny_tokenizer()
    ort_model = ORTModelForCausalLM.from_pretrained(llama_optimum.path, local_files_only=True)
    enc = tok([sample_text()[:80]], return_tensors="pt", return_token_type_ids=False)
    ref = llama.generate(**enc, do_sample=False, max_new_tokens=10)
    got = ort_model.generate(**enc, do_sample=False, max_new_tokens=10)
    assert torch.equal(ref, got)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (llama_optimum.path / name).is_file(), name


def test_fp32_parity_and_greedy_tokens_are_recorded(llama_optimum):
    fp32 = llama_optimum.manifest["verification"]["fp32"]
    assert fp32["parity"]["passed"] and fp32["parity"]["rel_rms"] < 1e-5
    assert fp32["parity"]["tolerance"] == 1e-4
    assert fp32["generation"] == {**fp32["generation"], "session_equal": True, "runtime_equal": True, "passed": True}
    assert llama_optimum.parity == fp32["parity"]  # no post-processing: the fp32 graph is final



def test_fp32_parity_on_the_cuda_provider_is_held_to_the_tf32_tolerance(llama_optimum, llama):
    """The CUDA provider multiplies float32 in TF32 by default (use_tf32=1; measured on an H100,
    tests/test_gpu.py): its float32 parity gets float16's tolerance and says why. Here a CPU session
    that reports the CUDA provider first; the real provider runs under the gpu marker."""
    from cwca_export.exporter.verify import TOLERANCES, check_parity

    class ReportsCuda:
        def __init__(self, session, options):
            self.inner, self.options = session, options

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def get_provider_options(self):
            return {"CUDAExecutionProvider": self.options}

    ids = np.array([[5, 6, 7, 8], [0, 9, 10, 11]])
    mask = np.array([[1, 1, 1, 1], [0, 1, 1, 1]])

    def parity(dtype, options=None):
        session = make_session(llama_optimum.model_path)
        return check_parity(llama, DecoderSession(session if options is None else ReportsCuda(session, options)),
                            dtype, ids, mask)

    plain, cuda = parity("fp32"), parity("fp32", {"use_tf32": "1"})
    assert (plain["tolerance"], "math" in plain) == (1e-4, False)
    assert cuda["tolerance"] == TOLERANCES["fp16"] and cuda["math"].startswith("tf32")
    assert cuda["rel_rms"] == plain["rel_rms"] < 1e-5
    exact = parity("fp32", {"use_tf32": "0"})  # TF32 turned off: float32's tolerance again
    assert (exact["tolerance"], "math" in exact) == (1e-4, False)
    # a precision plan is compared with float32 products of its de-quantized weights: TF32 too
    assert parity("mixed", {})["tolerance"] == TOLERANCES["fp16"] > TOLERANCES["mixed"] == parity("mixed")["tolerance"]

def test_manifest_records_files_hashes_versions_and_measurements(llama_optimum):
    m = json.loads((llama_optimum.path / MANIFEST_NAME).read_text())
    assert m["_type"] == "CwcaManifest" and m["schema_version"] == 1
    assert m["files"] == file_inventory(llama_optimum.path, exclude=(MANIFEST_NAME,))
    assert m["disk_bytes"] == sum(f["bytes"] for f in m["files"])
    assert {"torch", "transformers", "optimum", "onnxruntime", "onnx"} <= set(m["versions"])
    assert m["backend"]["name"] == "optimum" and m["plan"] is None and m["budget"] is None
    assert m["model"]["architecture"] == "LlamaForCausalLM" and m["model"]["zero_fraction"] == 0
    meas = m["measurement"]
    assert meas["workload"] == {
        "ep": "cpu", "batch": 1, "prompt_len": 8, "context": 24, "warmup": 1, "runs": 3, "threads": 0,
        "prepack": True, "casts_float16_per_run": False,
    }
    assert meas["resident_bytes"] > 0 and "VmHWM" in meas["resident_method"]
    assert meas["kv_cache_bytes"] == 2 * 2 * (1 * 2 * 24 * 8 * 4)  # layers * (k, v) * B * heads * ctx * hd * fp32
    for shape in ("prefill", "decode"):
        lat = meas["latency_ms"][shape]
        assert 0 < lat["p50"] <= lat["p90"] and lat["runs"] == 3
    assert m["savings"] == []  # a dense fp32 model: nothing to claim
    assert m["prediction"]["graph_bytes"] == m["prediction"]["weights_bytes"] + m["prediction"]["overhead_bytes"]
    assert cwca_export.Artifact.load(llama_optimum.path).manifest == llama_optimum.manifest


# ------------------------------------------------------------------ compressed structure


def test_heterogeneous_widths_and_factorised_linears_export_and_generate(mistral_compressed):
    model, art = mistral_compressed
    m = art.manifest
    assert m["verification"]["fp32"]["generation"]["runtime_equal"] is True
    factorised = sorted(m["model"]["factorised_linears"])
    assert factorised == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    kinds = {row["kind"]: row for row in m["savings"]}
    assert kinds["structured width"]["latency"] is True and kinds["low-rank factorisation"]["disk"] is True
    graph = onnx.load(str(art.model_path), load_external_data=False).graph
    shapes = {tuple(t.dims) for t in graph.initializer}
    assert (32, 24) in shapes or (24, 32) in shapes  # the narrow block's MLP made it into the graph


def test_unstructured_zeros_are_reported_as_no_saving(out, llama):
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.mlp.up_proj, layer.mlp.gate_proj):
                lin.weight[lin.weight.abs() < lin.weight.abs().median()] = 0
    art = cwca_export.export(model, None, out / "llama-sparse", backend="onnx", **FAST)
    (row,) = art.manifest["savings"]
    assert row["kind"] == "unstructured sparsity" and row["amount"] > 0.1
    assert (row["disk"], row["memory"], row["latency"]) == (False, False, False)


# ------------------------------------------------------------------ onnx backend, quantization


def test_onnx_int8_with_exclusions(qwen2_int8):
    model, art = qwen2_int8
    post = art.manifest["postprocess"]
    assert post["steps"] == ["int8"]
    excluded = post["quantize"]["excluded_node_names"]
    assert any("lm_head" in n for n in excluded) and any("layers.0/" in n for n in excluded)
    assert not any("layers.1/" in n for n in excluded)
    assert art.parity["dtype"] == "int8" and art.parity["passed"]
    assert art.manifest["verification"]["fp32"]["generation"]["session_equal"]
    ops = _ops(art)
    assert ops.get("MatMulInteger", 0) == 7  # 7 projections of block 1; block 0 and lm_head stay float
    assert {r["kind"] for r in art.manifest["savings"]} == {"int8 weights"}


def test_onnx_int4_with_external_data(gpt2_int4_external):
    model, art = gpt2_int4_external
    assert (art.path / "model.onnx_data").is_file()
    assert art.manifest["postprocess"]["external_data"] is True
    assert _ops(art).get("MatMulNBits", 0) >= 1
    assert art.parity["dtype"] == "int4" and art.parity["passed"]
    # the artifact folder is self-sufficient: a plain session loads it from its own path
    decoder = DecoderSession(make_session(art.model_path))
    logits, present = decoder.run(np.array([[5, 6, 7]]), np.ones((1, 3), np.int64))
    assert logits.shape == (1, 3, model.config.vocab_size) and len(present) == 4


def test_onnx_without_kv_cache_fp16_and_graph_optimisation(out, llama):
    art = cwca_export.export(
        llama, None, out / "llama-fp16", backend="onnx", backend_options={"with_past": False},
        budget=Budget(dtype="fp16", prompt_len=8, context=24), optimize="extended", runs=3, warmup=1,
    )
    assert art.manifest["postprocess"]["steps"] == ["optimize:extended", "fp16"]
    assert art.parity["dtype"] == "fp16" and art.parity["passed"]
    assert art.manifest["measurement"]["has_kv_cache"] is False
    inputs = {i.name for i in onnx.load(str(art.model_path), load_external_data=False).graph.input}
    assert inputs == {"input_ids", "attention_mask", "position_ids"}
    fp16 = next(r for r in art.manifest["savings"] if r["kind"] == "fp16")
    assert fp16["latency"] is False  # on the CPU provider


# ------------------------------------------------------------------ refusals


def test_optimum_refuses_phi3_with_grouped_kv_heads_and_names_onnx(tmp_path):
    with pytest.raises(UnsupportedModelError, match="--backend onnx"):
        cwca_export.export(tiny_model("phi3"), None, tmp_path / "phi3", **FAST)
    assert not (tmp_path / "phi3").exists()


def test_optimum_refuses_mixtral_and_names_onnx(tmp_path):
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(UnsupportedModelError, match="no ONNX config for model type 'mixtral'.*--backend onnx"):
        cwca_export.export(model, None, tmp_path / "mixtral", **FAST)
    assert list(tmp_path.iterdir()) == []


def test_unknown_backend_option_is_a_clear_error(tmp_path, llama):
    with pytest.raises(ValueError, match="does not take option"):
        cwca_export.export(llama, None, tmp_path / "x", backend_options={"with_past": False}, **FAST)


def test_plan_knob_re_solves_the_plan_and_narrows_a_copy(llama):
    """The budget search's compression level: a re-solved plan, applied to a copy with data."""
    from cwca_export import LayerScores, find_blocks, plan_pruning
    from cwca_export.exporter.search import PlanKnob

    blocks = find_blocks(llama)
    scores = LayerScores("gradnorm", zeta2=[1.0, 3.0], n_params=[b.n_params for b in blocks])
    plan = plan_pruning(scores, 0.2, hi=0.8)
    ids = torch.randint(0, llama.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    knob = PlanKnob(llama, plan, "width", {"data": ids, "multiple": 1})
    before = [b.module.mlp.gate_proj.out_features for b in blocks]
    model_t, plan_t = knob.make(0.5)
    assert plan_t.global_sparsity == pytest.approx(knob.target(0.5))
    assert knob.target(0.5) == pytest.approx(0.5 * 0.8)  # halfway from lo = 0 to hi = 0.8
    # width keeps (1 - rho_k) of each block's MLP channels (multiple 1: up to one of rounding)
    for block, rho, d_ff in zip(find_blocks(model_t), plan_t.x, before, strict=True):
        assert abs(block.module.mlp.gate_proj.out_features - (1 - rho) * d_ff) <= 1
    assert [b.module.mlp.gate_proj.out_features for b in blocks] == before  # original untouched


# ------------------------------------------------------------------ atomic output


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_failed_verification_leaves_no_folder(tmp_path, llama, monkeypatch):
    import cwca_export.exporter.build as build

    def broken(model, decoder, dtype, ids, mask):
        return {"passed": False, "rel_rms": 1.0, "tolerance": 1e-4}

    monkeypatch.setattr(build, "check_parity", broken)
    with pytest.raises(VerificationError, match="logits differ.*nothing was written.*hint: try another backend"):
        cwca_export.export(llama, None, tmp_path / "art", backend="onnx", **FAST)
    assert not (tmp_path / "art").exists() and _leftovers(tmp_path) == []


def test_existing_folder_is_kept_on_failure_and_replaced_whole_on_success(tmp_path, llama, monkeypatch):
    from cwca_export.outputs import UnsafeOutputError

    target = tmp_path / "art"
    target.mkdir()
    (target / "old.txt").write_text("not the tool's")
    with pytest.raises(FileExistsError, match="--overwrite"):
        cwca_export.export(llama, None, target, backend="onnx", **FAST)
    with pytest.raises(UnsafeOutputError, match="did not write .old.txt"):  # --overwrite replaces only our output
        cwca_export.export(llama, None, target, backend="onnx", overwrite=True, **FAST)
    (target / "old.txt").unlink()
    target.rmdir()
    first = cwca_export.export(llama, None, target, backend="onnx", **FAST)
    before = {p.name: p.read_bytes() for p in first.path.iterdir()}
    import cwca_export.exporter.build as build

    real = build.measure_runtime
    monkeypatch.setattr(build, "measure_runtime", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        cwca_export.export(llama, None, target, backend="onnx", overwrite=True, **FAST)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before and _leftovers(tmp_path) == []
    monkeypatch.setattr(build, "measure_runtime", real)
    art = cwca_export.export(llama, None, target, backend="onnx", overwrite=True, **FAST)
    assert (art.path / "model.onnx").is_file() and art.manifest["created"] >= first.manifest["created"]
    assert _leftovers(tmp_path) == []


def test_optimum_refusals_come_before_the_model_loads(tmp_path, monkeypatch):
    """`export` (and a recipe with an export step) on a model the optimum backend refuses for its
    type: refused after loading the model (a 7B fp32 load is minutes; a recipe scored and planned
    first). Now before: what the config shows (Phi-3 with grouped KV heads, Mixtral, blocks saved
    with their own head counts) is asked of the backend first."""
    import transformers
    import yaml
    from click.testing import CliRunner
    from helpers import sample_text, save_tiny_model
    from test_export_heads import _head_pruned

    from cwca_export import loading
    from cwca_export.cli import cli

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded for a backend that refuses it")

    save_tiny_model("phi3", tmp_path / "phi3")
    mixtral = transformers.MixtralConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=2)
    transformers.AutoModelForCausalLM.from_config(mixtral).save_pretrained(tmp_path / "mixtral")
    _head_pruned("llama")[0].save_pretrained(tmp_path / "heads")
    (tmp_path / "calib.txt").write_text(sample_text())
    monkeypatch.setattr(loading, "load_model", no_load)
    monkeypatch.setenv("CWCA_CACHE_DIR", str(tmp_path / "cache"))
    for name, why in [("phi3", "grouped KV heads"), ("mixtral", "no ONNX config"), ("heads", "own head counts")]:
        result = CliRunner().invoke(cli, ["export", str(tmp_path / name), "--out", str(tmp_path / f"{name}-out")])
        assert result.exit_code == 1, result.output
        assert why in result.output and "--backend onnx" in result.output, result.output
        assert not (tmp_path / f"{name}-out").exists()
    recipe = {"model": "phi3", "data": "calib.txt", "samples": 2, "seq_len": 16, "score": {"method": "gradnorm"},
              "plan": {"program": "prune", "sparsity": 0.5}, "compress": {"method": "magnitude"},
              "export": {"backend": "optimum"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run-out")])
    assert result.exit_code == 1, result.output
    assert "grouped KV heads" in result.output and "--backend onnx" in result.output, result.output
    assert not (tmp_path / "run-out").exists()
    # the onnx backend takes them: it gets as far as loading
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "phi3"), "--backend", "onnx", "--out",
                                      str(tmp_path / "onnx-out")])
    assert "the model was loaded" in result.output, result.output


def test_staging_refuses_a_destination_created_meanwhile(tmp_path):
    with Staging(tmp_path / "art") as staging:
        folder = staging.new_folder()
        (tmp_path / "art").mkdir()
        with pytest.raises(FileExistsError):
            staging.commit(folder)
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------ CLI on a saved folder


def test_cli_exports_a_saved_model_folder(tmp_path):
    from click.testing import CliRunner

    from cwca_export.cli import cli

    model_dir = save_tiny_model("llama", tmp_path / "tiny-llama")
    result = CliRunner().invoke(cli, [
        "export", str(model_dir), "--out", str(tmp_path / "onnx"), "--backend", "onnx",
        "--quantize", "int4", "--exclude", "lm_head", "--prompt-len", "8", "--context", "24", "--runs", "3",
    ])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "(backend onnx, int4)" in result.output
    assert "fp32 greedy tokens equal torch" in result.output
    manifest = json.loads((tmp_path / "onnx" / MANIFEST_NAME).read_text())
    assert manifest["postprocess"]["quantize"]["exclude_nodes"] == ["lm_head"]


def test_cli_errors_are_one_line(tmp_path):
    from click.testing import CliRunner

    from cwca_export.cli import cli

    model_dir = save_tiny_model("llama", tmp_path / "tiny-llama")
    result = CliRunner().invoke(cli, ["export", str(model_dir), "--out", str(tmp_path / "o"), "--max-memory", "lots"])
    assert result.exit_code == 2 and "Error: Invalid value for '--max-memory': size 'lots'" in result.output
    result = CliRunner().invoke(cli, ["export", str(model_dir), "--out", str(tmp_path / "o"), "--exclude", "lm_head"])
    assert result.exit_code == 2 and "--quantize" in result.output


# ------------------------------------------------------------------ the matrix (slow)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["optimum", "onnx"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_every_family_exports_with_every_backend(tmp_path, family, backend):
    art = cwca_export.export(tiny_model(family), None, tmp_path / "a", backend=backend, tokenizer=tiny_tokenizer(),
                             **FAST)
    assert art.manifest["verification"]["fp32"]["generation"]["passed"]
    assert art.parity["rel_rms"] < 1e-4


@pytest.mark.slow
def test_phi3_with_grouped_kv_heads_goes_through_the_onnx_backend(tmp_path):
    art = cwca_export.export(tiny_model("phi3"), None, tmp_path / "a", backend="onnx", **FAST)
    assert art.manifest["verification"]["fp32"]["generation"]["session_equal"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_optimum_artifacts(tmp_path, family, method):
    art = cwca_export.export(tiny_model(family), None, tmp_path / "a", quantize=method, **FAST)
    assert art.parity["passed"] and art.manifest["postprocess"]["steps"] == [method]


def test_per_block_head_counts_are_refused_before_export(tmp_path):
    from cwca_export.backends import UnsupportedModelError

    from cwca_export import LayerScores, compress, find_blocks, plan_pruning

    model = tiny_model("llama")
    blocks = find_blocks(model)
    plan = plan_pruning(LayerScores("gradnorm", zeta2=[1.0, 3.0], n_params=[b.n_params for b in blocks]), 0.3)
    compress(model, plan, method="width", heads=True, importance="magnitude", check_fingerprint=False)
    # the default backend (optimum) sizes every layer's cache from the config: it refuses and
    # names the onnx backend, which exports per-block head counts (tests/test_export_heads.py)
    with pytest.raises(UnsupportedModelError, match="--backend onnx"):
        cwca_export.export(model, None, tmp_path / "x", **FAST)
    assert not (tmp_path / "x").exists()
