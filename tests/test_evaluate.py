"""The perplexity protocol against transformers' own loss and a brute-force sliding window."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cwca_export.evaluate import _windows, perplexity_from_logits, torch_logits_fn


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=50,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_non_overlapping_windows_match_transformers_loss(model):
    ids = torch.randint(0, 50, (4 * 16,), generator=torch.Generator().manual_seed(1))
    result = perplexity_from_logits(torch_logits_fn(model), ids.numpy(), seq_len=16, batch_size=3)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in ids.view(4, 16)]
    assert result.tokens == 4 * 15 and result.windows == 4
    assert result.nll == pytest.approx(np.mean(losses), rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(np.mean(losses)), rel=1e-6)


def test_sliding_window_scores_every_token_once_with_its_context(model):
    ids = torch.randint(0, 50, (45,), generator=torch.Generator().manual_seed(2))
    seq_len, stride = 16, 6
    result = perplexity_from_logits(torch_logits_fn(model), ids.numpy(), seq_len=seq_len, stride=stride)
    # brute force: target t is scored once, in the first window whose end passes it,
    # with that window's left context
    nll, scored = 0.0, set()
    with torch.no_grad():
        for start in range(0, 44, stride):
            end = min(start + seq_len, 45)
            logp = torch.log_softmax(model(input_ids=ids[None, start:end]).logits[0].double(), -1)
            for t in range(start + 1, end):
                if t not in scored:
                    scored.add(t)
                    nll -= logp[t - start - 1, ids[t]].item()
            if end == 45:
                break
    assert scored == set(range(1, 45))
    assert result.tokens == 44
    assert result.nll == pytest.approx(nll / 44, rel=1e-6)


@pytest.mark.parametrize("n, L, s", [(101, 20, 7), (64, 16, 1), (5, 20, 3)])
def test_overlapping_windows_score_every_target_once(n, L, s):
    targets = []
    for start, end, skip in _windows(n, L, s):
        targets += list(range(start + 1 + skip, end))
    assert targets == list(range(1, n))


def test_non_overlapping_windows_are_independent():
    # the usual protocol (Wanda, SparseGPT): each window's first token is context only
    assert _windows(100, 20, 20) == [(s, s + 20, 0) for s in range(0, 100, 20)]


def test_bad_protocol_is_refused():
    with pytest.raises(ValueError, match="stride"):
        perplexity_from_logits(lambda x: x, np.arange(10), seq_len=4, stride=5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity_from_logits(lambda x: x, np.arange(1), seq_len=4)


def _naive_nll_sum(model, ids: torch.Tensor, seq_len: int, stride: int) -> tuple[float, int]:
    """Every target once, in the first window whose end passes it, all in float64 at once."""
    n, total, scored = ids.numel(), 0.0, set()
    with torch.no_grad():
        for start in range(0, n - 1, stride):
            end = min(start + seq_len, n)
            logp = torch.log_softmax(model(input_ids=ids[None, start:end]).logits[0].double(), -1)
            for t in range(start + 1, end):
                if t not in scored:
                    scored.add(t)
                    total -= logp[t - start - 1, ids[t]].item()
            if end == n:
                break
    return total, len(scored)


@pytest.mark.parametrize("chunk", [1, 3, 7, 15, 16, 1000])
def test_chunked_nll_equals_naive_float64(model, chunk):
    # seq_len 16, stride 6: windows skip already-scored positions; chunks of 3, 7 do not divide 15
    ids = torch.randint(0, 50, (53,), generator=torch.Generator().manual_seed(3))
    total, count = _naive_nll_sum(model, ids, 16, 6)
    torch_fn = torch_logits_fn(model)
    numpy_fn = lambda x: torch_fn(x).numpy()  # float32 numpy, as ONNX Runtime returns logits  # noqa: E731
    for fn in (torch_fn, numpy_fn):
        result = perplexity_from_logits(fn, ids.numpy(), seq_len=16, stride=6, batch_size=2, chunk_tokens=chunk)
        assert result.tokens == count == 52
        assert result.nll == pytest.approx(total / count, rel=1e-9)


def test_chunked_nll_memory_is_bounded_by_the_chunk():
    import tracemalloc

    from cwca_export.evaluate import token_nll_sum

    rng = np.random.default_rng(0)
    rows, length, vocab, chunk = 4, 64, 20_000, 8
    logits = rng.standard_normal((rows, length, vocab), dtype=np.float32)  # 20 MB, allocated before
    ids = rng.integers(0, vocab, (rows, length))
    logp = torch.log_softmax(torch.from_numpy(logits).double(), -1)
    expected = -float(logp[:, :-1].gather(-1, torch.from_numpy(ids[:, 1:, None])).sum())
    del logp
    tracemalloc.start()
    try:
        got = token_nll_sum(logits, ids, chunk_tokens=chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == pytest.approx(expected, rel=1e-9)
    # a float64 copy of the whole logits would be 41 MB; a chunk is 8 x 20k x 8 B = 1.3 MB
    assert peak < 4 * chunk * vocab * 8, peak
