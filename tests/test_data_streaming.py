"""Streamed calibration data: ids equal one whole-text tokenisation, reading stops early, and
local ``datasets`` folders are read row batch by row batch.

References are computed here independently: the whole text tokenised in one call, cut into
windows of L and drawn with ``torch.randperm`` as the Wanda/SparseGPT protocol says.
"""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from helpers import sample_text, tiny_tokenizer

from cwca_export import data as data_module
from cwca_export.data import calibration_data, iter_text, iter_token_ids, load_texts

DEMO = Path(__file__).resolve().parents[1] / "cwca_export" / "assets" / "demo-llama"


def corpus(n: int = 12) -> list[str]:
    """Documents with varied whitespace, punctuation, digits and non-ASCII text."""
    base = sample_text()
    docs = []
    for i in range(n):
        doc = base[(i * 311) % len(base):] + base[: (i * 311) % len(base)]
        docs.append(doc.replace(".", f". {i}\t", 3) + f" café naïve – 日本語 {i * 7}  \n  trailing")
    return docs


def reference(text: str, tok, num_samples: int, seq_len: int, seed: int = 0, held_out: int = 0):
    ids = torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.int64)
    windows = ids.numel() // seq_len
    order = torch.randperm(windows, generator=torch.Generator().manual_seed(seed))[: num_samples + held_out]
    chunks = ids[: windows * seq_len].view(windows, seq_len)
    return chunks[order[:num_samples]], chunks[order[num_samples:]], ids.numel()


def legacy_prepend_tokenizer():
    """A sentencepiece-style BPE that marks the start of every call (Llama-2's legacy normaliser):
    text split anywhere tokenises differently, so no cut is clean."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.train_from_iterator([sample_text()], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def tokenizers():
    from transformers import AutoTokenizer

    return {"tiny-bytelevel": tiny_tokenizer(), "demo-llama": AutoTokenizer.from_pretrained(DEMO),
            "legacy-prepend": legacy_prepend_tokenizer()}


@pytest.mark.parametrize("name", ["tiny-bytelevel", "demo-llama", "legacy-prepend"])
def test_streamed_ids_equal_one_call_over_the_whole_text(name):
    tok = tokenizers()[name]
    docs = corpus()
    whole = tok("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    runs = list(iter_token_ids(iter_text(docs), tok, chunk_chars=2000))
    assert [i for run in runs for i in run] == whole
    if name != "legacy-prepend":
        assert len(runs) > 10  # really cut into many pieces
    else:
        assert len(runs) == 1  # no clean cut exists: one run, still exact


@pytest.mark.parametrize("kind", ["txt", "jsonl", "list"])
def test_small_corpus_gives_the_samples_of_one_whole_corpus_tokenisation(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(data_module, "CHUNK_CHARS", 3000)  # many pieces even on a small corpus
    tok = tiny_tokenizer()
    docs = corpus()
    if kind == "txt":
        source = tmp_path / "c.txt"
        source.write_text("\n\n".join(docs), encoding="utf-8")
    elif kind == "jsonl":
        source = tmp_path / "c.jsonl"
        source.write_text("".join(json.dumps({"text": d}) + "\n" + '{"text": "  "}\n' for d in docs), encoding="utf-8")
    else:
        source = docs
    want, want_held, total = reference("\n\n".join(docs), tok, 10, 48, seed=5, held_out=3)
    got = calibration_data(source, tok, num_samples=10, seq_len=48, seed=5, held_out=3)
    assert torch.equal(got.input_ids, want) and torch.equal(got.held_out, want_held)
    assert got.tokens_available == total


def test_reading_stops_at_the_pool_and_draws_from_its_windows(monkeypatch):
    monkeypatch.setattr(data_module, "CHUNK_CHARS", 3000)
    tok = tiny_tokenizer()
    docs = corpus(40)
    text = "\n\n".join(docs)
    got = calibration_data(docs, tok, num_samples=4, seq_len=32, seed=1, max_tokens=32 * 50)
    ids = torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"])
    assert ids.numel() > 20 * 32 * 50  # the corpus is far larger than the pool
    assert got.tokens_available < ids.numel()
    order = torch.randperm(50, generator=torch.Generator().manual_seed(1))[:4]
    assert torch.equal(got.input_ids, ids[: 50 * 32].view(50, 32)[order])


def test_a_50mb_corpus_is_read_only_as_far_as_the_samples_need(tmp_path):
    path = tmp_path / "big.txt"
    block = sample_text() * 20
    with path.open("w", encoding="utf-8") as fh:
        while fh.tell() < 50 * 2**20:
            fh.write(block)
    tok = tiny_tokenizer()
    seen = []

    def counting(text, **kw):
        seen.append(len(text))
        return tok(text, **kw)

    tracemalloc.start()
    try:
        got = calibration_data(path, counting, num_samples=8, seq_len=64, max_tokens=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got.input_ids.shape == (8, 64)
    assert sum(seen) < 3 * data_module.CHUNK_CHARS  # characters tokenised: one piece and cut checks
    assert peak < 24 * 2**20  # the file is 50 MiB; reading it whole would trace at least that
    with path.open(encoding="utf-8") as fh:  # the same samples as the file's first 1 MiB gives whole
        head = fh.read(2**20)
    pool = torch.tensor(tok(head, add_special_tokens=False, verbose=False)["input_ids"][: 8 * 64]).view(8, 64)
    assert sorted(map(tuple, got.input_ids.tolist())) == sorted(map(tuple, pool.tolist()))


def test_missing_datasets_package_names_the_extra(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "state.json").write_text("{}", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'cwca-export\[datasets\]'"):
        calibration_data(folder, tiny_tokenizer(), num_samples=1, seq_len=8)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ValueError, match="not one written by datasets' save_to_disk"):
        calibration_data(plain, tiny_tokenizer(), num_samples=1, seq_len=8)


def test_a_saved_dataset_is_read_in_row_batches_and_equals_the_joined_text(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    docs = corpus(30) + [""]
    ds = datasets.Dataset.from_dict({"body": docs, "n": list(range(len(docs)))})
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "dd"))
    tok = tiny_tokenizer()

    want, _, total = reference("\n\n".join(d for d in docs if d), tok, 6, 40, seed=2)
    got = calibration_data(tmp_path / "ds", tok, num_samples=6, seq_len=40, seed=2, text_field="body")
    assert torch.equal(got.input_ids, want) and got.tokens_available == total
    split = calibration_data(tmp_path / "dd" / "train", tok, num_samples=6, seq_len=40, seed=2, text_field="body")
    assert torch.equal(split.input_ids, want)
    assert load_texts(tmp_path / "ds", text_field="body") == [d for d in docs if d]  # eval reads it whole

    # streaming: with a small pool only the first row batches are ever read
    monkeypatch.setattr(data_module, "_DATASET_ROWS", 4)
    monkeypatch.setattr(data_module, "CHUNK_CHARS", 4000)
    reads = []
    getitem = datasets.Dataset.__getitem__
    monkeypatch.setattr(datasets.Dataset, "__getitem__", lambda self, key: reads.append(key) or getitem(self, key))
    calibration_data(tmp_path / "ds", tok, num_samples=2, seq_len=40, text_field="body", max_tokens=0)
    assert 0 < len(reads) < len(docs) // 4 / 2

    with pytest.raises(ValueError, match=r"splits \['train', 'validation'\].*--data .*dd/train"):
        calibration_data(tmp_path / "dd", tok, num_samples=1, seq_len=8, text_field="body")
    with pytest.raises(ValueError, match=r"no 'text' column \(found \['body', 'n'\]\).*--text-field"):
        calibration_data(tmp_path / "ds", tok, num_samples=1, seq_len=8)
    with pytest.raises(ValueError, match=r"row 0: column 'n' is int"):
        calibration_data(tmp_path / "ds", tok, num_samples=1, seq_len=8, text_field="n")
