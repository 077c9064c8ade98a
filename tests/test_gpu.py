"""CUDA paths against the same steps on the CPU: scoring, damage probes, whole-plan losses,
compression, and ONNX Runtime's CUDA provider (export, parity with torch, device memory).

All marked ``gpu`` (the default run leaves them out; ``pytest -m gpu`` runs them) and skipped
without a CUDA device, or without onnxruntime-gpu's CUDAExecutionProvider for the ORT ones.
Each test also checks that the work really ran on the device (memory was allocated there,
the session's first provider is CUDA), so a silent fall-back to the CPU fails.
``benchmarks/gpu_checks.sh`` runs them with a short scoring timing on a lent GPU machine.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from compress_plans import make_plan
from helpers import sample_text, save_tiny_model, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.gpu

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device (torch.cuda.is_available() is False)")


def _cuda_provider() -> bool:
    try:
        from cwca_export.ort import require_onnxruntime

        return "CUDAExecutionProvider" in require_onnxruntime().get_available_providers()
    except ImportError:
        return False


needs_cuda_ep = pytest.mark.skipif(
    not (CUDA and _cuda_provider()),
    reason="no CUDA device, or this onnxruntime has no CUDAExecutionProvider (pip install 'cwca-export[gpu]')",
)


def _ids(model, n: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(0))


class _OnDevice:
    """Asserts that the block it guards allocated CUDA memory (the work did not stay on the CPU)."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        if exc[0] is None:
            assert torch.cuda.max_memory_allocated() > self.start, "nothing was allocated on the CUDA device"


@needs_cuda
@pytest.mark.parametrize("method", ["fisher", "kfac", "damage"])
def test_scores_on_cuda_equal_scores_on_cpu(method, tmp_path):
    from cwca_export.scoring import score

    folder = save_tiny_model("llama", tmp_path / "m", num_hidden_layers=3)
    text = sample_text() * 4
    common = dict(method=method, num_samples=8, seq_len=32, batch_size=1 if method == "fisher" else 4,
                  progress=False, record_wall_time=False)
    if method == "damage":
        common["options"] = {"pruner": "wanda", "points": "0.3,0.7", "at": 0.7}
    cpu = score(folder, [text], cpu=True, **common)
    with _OnDevice():
        gpu = score(folder, [text], cpu=False, **common)
    assert gpu.zeta2 == pytest.approx(cpu.zeta2, rel=1e-3, abs=1e-9)
    for name, values in cpu.stats.items():
        assert gpu.stats[name] == pytest.approx(values, rel=1e-3, abs=1e-6), name


@needs_cuda
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "asvd"])
def test_damage_probes_on_cuda_equal_probes_on_cpu(method):
    from cwca_export.planning.damage import measure_damage

    model = tiny_model("llama", num_hidden_layers=3)
    ids = _ids(model)
    cpu = measure_damage(model, ids, method=method, points=(0.3, 0.7), batch_size=4)
    with _OnDevice():
        gpu = measure_damage(model, ids, method=method, points=(0.3, 0.7), batch_size=4, device="cuda")
    assert next(model.parameters()).device.type == "cpu"  # the model went back where it was
    assert gpu.base_loss == pytest.approx(cpu.base_loss, rel=1e-5)
    for got, want in zip(gpu.loss_increase, cpu.loss_increase, strict=True):
        assert got == pytest.approx(want, abs=2e-4)


@needs_cuda
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_plan_losses_on_cuda_equal_losses_on_cpu(method):
    from cwca_export.planning.plan_probe import PlanLoss

    model = tiny_model("llama", num_hidden_layers=3)
    ids = _ids(model)
    plans = [[0.5, 0.2, 0.7], [0.6, 0.6, 0.6]]
    cpu = PlanLoss(model, ids, method=method, batch_size=4)
    want = [cpu.dense_loss, *(cpu(p) for p in plans)]
    cpu.close()
    on_gpu = copy.deepcopy(model).cuda()
    with _OnDevice():
        gpu = PlanLoss(on_gpu, ids, method=method, batch_size=4)
        got = [gpu.dense_loss, *(gpu(p) for p in plans)]
    assert got == pytest.approx(want, rel=1e-4)


def _calibration_loss(model, ids) -> float:
    from cwca_export.planning.damage import calibration_loss

    return calibration_loss(model, ids, batch_size=4)


@needs_cuda
@pytest.mark.parametrize(("method", "program", "x"), [
    ("wanda", "prune", [0.5, 0.3, 0.7]),
    ("sparsegpt", "prune", [0.5, 0.3, 0.7]),
    ("asvd", "allocate", [2, 3, 1]),
])
def test_compress_on_cuda_equals_compress_on_cpu(method, program, x):
    from cwca_export.compression import compress

    model = tiny_model("llama", num_hidden_layers=3)
    ids = _ids(model)
    options = {"rank_step": 4} if program == "allocate" else {}
    cpu = compress(copy.deepcopy(model), make_plan(model, program, x), method=method, data=ids, batch_size=4,
                   **options)
    with _OnDevice():
        gpu = compress(copy.deepcopy(model), make_plan(model, program, x), method=method, data=ids, batch_size=4,
                       device="cuda", **options)
    assert {p.device.type for p in gpu.parameters()} == {"cpu"}  # blocks visit the device and come back
    a, b = dict(cpu.named_parameters()), dict(gpu.named_parameters())
    assert a.keys() == b.keys()
    if program == "prune":  # the same weights go: masks agree but for float ties at the threshold
        for name, w in a.items():
            same = ((w == 0) == (b[name] == 0)).float().mean().item()
            assert same > 0.99, name
    assert _calibration_loss(gpu, ids) == pytest.approx(_calibration_loss(cpu, ids), rel=2e-3)


@needs_cuda
def test_refine_cli_on_cuda_writes_the_plan_of_the_cpu(tmp_path):
    from click.testing import CliRunner

    from cwca_export.cli import cli
    from cwca_export.planning.plan import Plan

    folder = save_tiny_model("llama", tmp_path / "m", num_hidden_layers=3)
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text() * 4, encoding="utf-8")
    data = ["--data", str(calib), "--samples", "6", "--seq-len", "16"]
    res = CliRunner().invoke(cli, ["score", str(folder), *data, "--estimator", "damage", "--option", "pruner=magnitude",
                                   "--device", "cpu", "--out", str(tmp_path / "d.json"), "--no-progress"])
    assert res.exit_code == 0, res.output
    common = [str(folder), "--scores", str(tmp_path / "d.json"), "--sparsity", "0.5", "--method", "magnitude",
              *data, "--max-evals", "10"]
    for device in ("cpu", "cuda"):
        out = str(tmp_path / f"{device}.json")
        res = CliRunner().invoke(cli, ["refine", *common, "--device", device, "--out", out])
        assert res.exit_code == 0, res.output
    a, b = Plan.load(tmp_path / "cpu.json"), Plan.load(tmp_path / "cuda.json")
    assert b.x == pytest.approx(a.x, abs=1e-9)
    assert b.parameters["refinement"]["calib_loss"] == pytest.approx(a.parameters["refinement"]["calib_loss"], rel=1e-4)


def _rel_rms(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want**2)))


@needs_cuda_ep
@pytest.mark.parametrize(("dtype", "tolerance"), [("fp32", 1e-3), ("fp16", 2e-2)])
def test_cuda_provider_export_matches_torch_and_measures_device_memory(dtype, tolerance, tmp_path):
    """fp32 on the CUDA provider is checked at TF32's tolerance (its default use_tf32=1, float16's
    mantissa: float16's tolerance), and without TF32 at float32's: the looser bound is the math
    mode, not a broken graph."""
    import cwca_export
    from cwca_export.budget import Budget
    from cwca_export.exporter.session import DecoderSession, make_session

    model = tiny_model("llama")
    art = cwca_export.export(model, None, tmp_path / "art", backend="onnx", tokenizer=tiny_tokenizer(),
                             budget=Budget(ep="cuda", dtype=dtype, prompt_len=8, context=24), runs=3, warmup=1)
    measured = art.manifest["measurement"]
    assert measured["providers"][0] == "CUDAExecutionProvider"
    assert art.parity["passed"]
    # device memory, not host memory: at least the weights and the CUDA context's working set
    assert measured["resident_method"].startswith(("device memory of this process", "growth of GPU"))
    assert measured["resident_bytes"] >= art.disk_bytes // 2 and measured["host_resident_bytes"] is not None
    # an independent check of the session on the CUDA provider against torch's logits
    session = DecoderSession(make_session(art.model_path, "cuda"))
    assert session.session.get_providers()[0] == "CUDAExecutionProvider"
    ids = _ids(model, n=2, length=12)
    logits, _ = session.run(ids.numpy(), np.ones_like(ids.numpy()))
    with torch.no_grad():
        want = model(input_ids=ids).logits.numpy()
    assert _rel_rms(logits, want) < tolerance
    if dtype == "fp32":
        import onnxruntime as ort

        assert art.parity["math"].startswith("tf32") and art.parity["tolerance"] == 2e-2
        exact = DecoderSession(ort.InferenceSession(str(art.model_path), providers=[
            ("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]))
        full, _ = exact.run(ids.numpy(), np.ones_like(ids.numpy()))
        assert _rel_rms(full, want) < 1e-5


@needs_cuda_ep
def test_perplexity_on_cuda_and_on_the_cuda_provider_equals_torch_on_cpu(tmp_path):
    import cwca_export
    from cwca_export.budget import Budget
    from cwca_export.evaluate import evaluate

    model = tiny_model("llama")
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    art = cwca_export.export(model, None, tmp_path / "art", backend="onnx", tokenizer=tiny_tokenizer(),
                             budget=Budget(ep="cuda", prompt_len=8, context=24), runs=3, warmup=1)
    text = tmp_path / "eval.txt"
    text.write_text(sample_text(), encoding="utf-8")
    on_cpu = evaluate(str(folder), str(text), device="cpu", seq_len=32)
    with _OnDevice():
        on_cuda = evaluate(str(folder), str(text), device="cuda", seq_len=32)
    ort_report = evaluate(str(art.path), str(text), ep="cuda", seq_len=32)
    assert (on_cuda["runtime"], ort_report["runtime"]) == ("torch (cuda)", "onnxruntime (cuda)")
    assert on_cuda["perplexity"] == pytest.approx(on_cpu["perplexity"], rel=1e-4)
    # the CUDA provider's float32 products are TF32 (use_tf32=1, its default): logits within 1e-3
    assert ort_report["perplexity"] == pytest.approx(on_cuda["perplexity"], rel=1e-3)
