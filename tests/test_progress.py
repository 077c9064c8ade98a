"""Progress bars: shown on a terminal's stderr for the long steps, silent otherwise and when switched off."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from compress_plans import make_plan
from helpers import tiny_model

from cwca_export import progress
from cwca_export.compression import compress
from cwca_export.evaluate import perplexity_from_logits


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _bars_back_on():
    yield
    progress.set_enabled(True)


def _terminal(monkeypatch) -> _Terminal:
    """stderr replaced by a stream that says it is a terminal (inside the test: pytest's capture
    swaps sys.stderr between a fixture's setup and the test body)."""
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def _uniform(x):
    return np.zeros((*x.shape, 10))


def test_eval_bar_counts_windows_on_a_terminal(monkeypatch):
    terminal = _terminal(monkeypatch)
    result = perplexity_from_logits(_uniform, np.arange(100) % 10, seq_len=20, progress=True)
    assert result.windows == 5
    assert "eval" in terminal.getvalue() and "0/5" in terminal.getvalue()


def test_no_bar_when_stderr_is_not_a_terminal(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    perplexity_from_logits(_uniform, np.arange(100) % 10, seq_len=20, progress=True)
    assert stream.getvalue() == ""


def test_switched_off_bars_stay_silent_on_a_terminal(monkeypatch):
    terminal = _terminal(monkeypatch)
    progress.set_enabled(False)
    perplexity_from_logits(_uniform, np.arange(100) % 10, seq_len=20, progress=True)
    assert terminal.getvalue() == ""


def test_compress_bar_counts_blocks(monkeypatch):
    terminal = _terminal(monkeypatch)
    model = tiny_model("llama", num_hidden_layers=3)
    compress(model, make_plan(model, "prune", [0.5, 0.5, 0.5]), method="magnitude", progress=True)
    assert "compress (magnitude)" in terminal.getvalue() and "/3" in terminal.getvalue()


def test_refine_bar_counts_forwards(monkeypatch):
    terminal = _terminal(monkeypatch)
    from cwca_export.planning.refine import refine_plan
    from cwca_export.scoring import score

    model = tiny_model("llama", num_hidden_layers=3).eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    damage = score(model, ids, method="damage", options={"pruner": "magnitude"}, progress=False,
                   num_samples=4, seq_len=16)
    terminal.truncate(0)
    plan = refine_plan(model, damage, 0.5, ids, method="magnitude", max_evals=12, progress=True)
    forwards = plan.parameters["refinement"]["forwards"]
    assert forwards <= 12
    assert "refine" in terminal.getvalue() and "/12" in terminal.getvalue()
