"""The memory model (cwca_export/memory_model.py) against measured peaks.

The measurement is the process's peak resident size (VmHWM, reset through
/proc/self/clear_refs), taken as a difference between two runs that differ in one term only,
so everything else the process holds cancels: the damage probes' input cache (uncapped
against ``max_cache`` of one block) and eval's logits (8 windows per forward against 1).
A slow test runs bench_scale.py's smallest size end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_model

from cwca_export import memory_model as mm

ROOT = Path(__file__).resolve().parents[1]
CLEAR_REFS = Path("/proc/self/clear_refs")


def _exact_malloc() -> None:
    """glibc serves a freed size class from its heap next time (the mmap threshold follows the
    largest freed block), so RSS would depend on allocation history; a fixed threshold returns
    every large tensor's pages to the system on free, and RSS follows the live tensors."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed at its default, no dynamic growth
    libc.malloc_trim(0)


def _peak_rss_during(fn) -> int:
    """Peak resident bytes while ``fn`` runs, above what the process held when it started."""
    import gc

    _exact_malloc()
    gc.collect()
    CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident size
    start = _status("VmRSS")
    fn()
    return _status("VmHWM") - start


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _clear_refs_works() -> bool:
    try:
        CLEAR_REFS.write_text("5")
        return _status("VmHWM") > 0
    except OSError:
        return False


needs_peak = pytest.mark.skipif(not _clear_refs_works(),
                                reason="needs Linux /proc/self/clear_refs to reset the peak RSS")


def test_shapes_count_the_parameters_transformers_builds():
    model = tiny_model("llama", num_hidden_layers=3, hidden_size=96, intermediate_size=200,
                       num_attention_heads=6, num_key_value_heads=2)
    shape = mm.ModelShape.from_config(model.config.to_dict())
    assert shape.params == sum(p.numel() for p in model.parameters())
    block = model.model.layers[0]
    linears = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    assert shape.block_linear_params == linears


def test_projection_shapes_are_the_published_parameter_counts():
    assert mm.llama_7b().params == pytest.approx(6.74e9, rel=0.005)  # Llama-2-7B: 6,738,415,616
    assert mm.llama_70b().params == pytest.approx(68.98e9, rel=0.005)  # Llama-2-70B: 68,976,648,192


@pytest.mark.slow  # peak RSS inside a long pytest process depends on what ran before
@needs_peak
def test_damage_input_cache_matches_its_formula():
    """Uncapped, the probes cache L x K x N x h x s bytes; capped at one block, one block's.
"""
    from cwca_export.planning.damage import measure_damage

    layers, hidden, samples, seq = 6, 128, 64, 128
    model = tiny_model("llama", num_hidden_layers=layers, hidden_size=hidden, intermediate_size=32,
                       num_attention_heads=2, num_key_value_heads=1)
    ids = torch.randint(0, model.config.vocab_size, (samples, seq), generator=torch.Generator().manual_seed(0))
    shape = mm.ModelShape.from_config(model.config.to_dict())
    run = mm.RunSettings(samples=samples, seq_len=seq, batch_size=16, damage_points=1)
    per_block = samples * seq * hidden * 4
    one = mm.RunSettings(**{**run.to_dict(), "max_cache": per_block})
    predicted = mm.score_damage(shape, run).device["input cache"] - mm.score_damage(shape, one).device["input cache"]
    assert predicted == (layers - 1) * per_block  # 20 MiB

    def probes(cap):
        return lambda: measure_damage(model, ids, method="magnitude", points=(0.5,), batch_size=16,
                                      max_cache=cap)

    probes(None)()  # warm-up: first-call allocations are not the cache's
    capped = min(_peak_rss_during(probes(per_block)) for _ in range(2))
    full = min(_peak_rss_during(probes(None)) for _ in range(2))
    assert full - capped == pytest.approx(predicted, rel=0.2), (full, capped, predicted)


@pytest.mark.slow  # peak RSS inside a long pytest process depends on what ran before
@needs_peak
def test_eval_logits_peak_matches_its_formula():
    """A forward of 8 windows holds 8 x N x V x 4 bytes of logits, one window N x V x 4."""
    from cwca_export.evaluate import perplexity_from_logits, torch_logits_fn

    vocab, seq = 32000, 128
    model = tiny_model("llama", num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                       num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab)
    ids = np.random.default_rng(0).integers(0, vocab, 8 * seq)
    shape = mm.ModelShape.from_config(model.config.to_dict())

    def predicted(batch):
        run = mm.RunSettings(samples=8, seq_len=seq, batch_size=batch, chunk_tokens=64)
        return mm.evaluate(shape, run).device_bytes

    def run(batch):
        return lambda: perplexity_from_logits(torch_logits_fn(model), ids, seq_len=seq, batch_size=batch,
                                              chunk_tokens=64)

    run(1)()
    small = min(_peak_rss_during(run(1)) for _ in range(2))
    big = min(_peak_rss_during(run(8)) for _ in range(2))
    want = predicted(8) - predicted(1)  # 7 x 128 x 32000 x 4 B = 109 MiB of logits, plus activations
    assert big - small == pytest.approx(want, rel=0.2), (big, small, want)


@pytest.mark.slow
def test_bench_scale_smallest_size_is_within_its_goal(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--sizes", "5m",
                           "--quick", "5m", "--out", str(out)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    steps = result["sizes"]["5m"]["steps"]
    assert {"score_damage", "refine", "compress_wanda", "export_optimum", "eval_onnx"} <= set(steps)
    for name, row in steps.items():
        if "ratio" in row:
            assert 0.8 <= row["ratio"] <= 1.2, (name, row)


def test_low_memory_export_holds_a_fraction_of_one_fp32_copy_at_7b():
    """The low-memory export's phases (docs/memory.md): the weights are file pages (a float32
    scratch file, then the artifact's data, read by sessions that do not prepack); the process's
    own peak is the trace's copies of the largest tensor, the 32k x 4096 embedding."""
    shape = mm.llama_7b()
    fp32 = shape.params * 4
    lean = mm.predict("export_onnx_lowmem", shape, mm.RunSettings(samples=1, seq_len=8))
    assert lean.host_bytes == pytest.approx(mm.TRACE_TENSOR_COPIES * 32000 * 4096 * 4)
    assert lean.host_bytes < 0.07 * fp32
    assert lean.mapped_bytes == fp32 and lean.resident_bytes == lean.peak_bytes + fp32
    assert mm.export(shape, "optimum").host_bytes > 2 * fp32
    head = 32000 * 4096 * 4  # the largest group the streamed quantizer takes at once (gate + up: 2 x 11008 x 4096)
    assert shape.largest_weight_group * 4 == head
    for method in ("int8", "int4"):
        assert mm.quantized_graph_bytes(shape, method) > mm.PROTOBUF_LIMIT  # the artifact has external data
        quantized = mm.predict(f"export_onnx_lowmem_{method}", shape, mm.RunSettings(samples=1, seq_len=8))
        phases = (mm.STREAMED_QUANT_COPIES[method] * head, mm.TRACE_TENSOR_COPIES * head,
                  mm.EXTERNAL_QUANT_SESSION_COPIES[method] * fp32)  # at 7B the prepacked sessions are the largest
        assert quantized.host_bytes == pytest.approx(max(phases))
        assert quantized.host_bytes < 0.3 * fp32
    # the ordinary export's quantizer holds the whole graph
    assert mm.export(shape, "onnx", "int8").host_bytes >= mm.EXTERNAL_QUANT_COPIES * fp32


def test_weights_kept_float32_by_exclude_are_counted_in_the_quantized_sessions():
    """``--low-memory --quantize int8 --exclude lm_head``: the sessions prepack the excluded head in
    float32, its 4 V h bytes in place of its share of the quantized weights' (550M with external
    data, measured: +140 MiB for the 187.5 MiB head). The 550M int8 artifact (527 MiB) is inline
    under the default threshold, its sessions priced as inline; 7B's (6.3 GiB) has external data."""
    run = mm.RunSettings(samples=1, seq_len=8)
    for shape in (mm.llama_7b(), mm.llama_70b()):
        head = shape.vocab * shape.hidden
        plain = mm.export_low_memory(shape, "int8")
        kept = mm.export_low_memory(shape, "int8", excluded=head)
        extra = (mm.EXCLUDED_SESSION_COPIES - mm.EXTERNAL_QUANT_SESSION_COPIES["int8"]) * head * 4
        assert kept.host_bytes - plain.host_bytes == pytest.approx(extra)
        assert plain.host_bytes == mm.predict("export_onnx_lowmem_int8", shape, run).host_bytes
    small = mm.ModelShape.from_config(
        {"hidden_size": 1536, "num_hidden_layers": 18, "intermediate_size": 4096, "vocab_size": 32000,
         "num_attention_heads": 12, "num_key_value_heads": 4, "tie_word_embeddings": False})  # 550M
    assert mm.quantized_graph_bytes(small, "int8") == pytest.approx(527 * 2**20, rel=0.01)  # measured artifacts
    assert mm.quantized_graph_bytes(small, "int4") == pytest.approx(487 * 2**20, rel=0.01)
    # inline, the artifact's write and checks are the peak (550M measured: 1,923 and 2,348 MiB with the
    # runtime's 469: the model's phase within 2% of each)
    head = small.vocab * small.hidden
    for excluded, measured in ((0, 1923), (head, 2348)):
        cost = mm.export_low_memory(small, "int8", excluded=excluded)
        assert list(cost.host) == ["peak phase: the inline quantized artifact's write and checks"]
        assert cost.host_bytes + 469 * 2**20 == pytest.approx(measured * 2**20, rel=0.02)
    labels = [row["step"] for row in mm.projection_table() if row["model"] == "7B"]
    assert "export_onnx --low-memory --quantize int8 --exclude lm_head" in labels


def test_low_memory_float16_export_converts_in_constant_memory_and_its_cpu_sessions_peak_only_inline():
    """``--low-memory --dtype float16``: the streamed converter's own memory is a slice's temporaries
    (the same at 550M and 7B, under the trace's copies of the largest tensor). The float16 artifact's
    CPU sessions hold its bytes and a float32 copy when it is inline (550M: its 1.1 GB of float16
    weights stay under 2 GiB), the largest phase there; with external data (7B) they cast a weight at
    a time and the trace is the largest phase again, as for the float32 export."""
    run = mm.RunSettings(samples=1, seq_len=8)
    small = mm.ModelShape.from_config(
        {"hidden_size": 1536, "num_hidden_layers": 18, "intermediate_size": 4096, "vocab_size": 32000,
         "num_attention_heads": 12, "num_key_value_heads": 4, "tie_word_embeddings": False})  # 550M
    for shape in (mm.llama_7b(), small):
        fp32 = shape.params * 4
        assert fp32 > mm.PROTOBUF_LIMIT
        cost = mm.predict("export_onnx_lowmem_fp16", shape, run)
        assert cost.step == "export_onnx_lowmem_fp16"
        largest = max(shape.vocab, shape.intermediate) * shape.hidden * 4
        if fp32 / 2 <= mm.PROTOBUF_LIMIT:
            assert cost.host == {"peak phase: the float16 artifact's CPU sessions": mm.FP16_CPU_SESSION_COPIES * fp32}
        else:
            plain = mm.predict("export_onnx_lowmem", shape, run)
            assert cost.host == plain.host == {"peak phase: largest tensor's copies during the trace":
                                               mm.TRACE_TENSOR_COPIES * largest}
            assert mm.FP16_CAST_TENSOR_COPIES * largest < mm.TRACE_TENSOR_COPIES * largest
        assert cost.mapped_bytes == fp32
        assert mm.STREAMED_FP16_BYTES < largest < mm.TRACE_TENSOR_COPIES * largest <= cost.host_bytes
        assert 0.05 * fp32 > mm.STREAMED_FP16_BYTES  # 550M: 97 MiB measured of 2,103 MiB
    with pytest.raises(ValueError, match="do not combine"):
        mm.export_low_memory(mm.llama_7b(), "int8", fp16=True)


def test_eval_low_memory_maps_the_weights_only_for_external_data():
    run = mm.RunSettings(samples=1, seq_len=2048, batch_size=1)
    big, small = mm.llama_7b(), mm.ModelShape.from_config(
        {"hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 2048, "vocab_size": 32000,
         "num_attention_heads": 12, "num_key_value_heads": 12})
    lean, plain = mm.evaluate(big, run, True, low_memory=True), mm.evaluate(big, run, True)
    assert lean.mapped_bytes == big.params * 4 and plain.mapped_bytes == 0
    assert plain.peak_bytes - lean.peak_bytes == pytest.approx((1 + mm.SESSION_CREATION_COPIES) * big.params * 4)
    assert mm.evaluate(small, run, True, low_memory=True).mapped_bytes == 0  # an inline graph is read whole
