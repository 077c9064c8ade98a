"""Calibration data: file formats, the seeded window protocol, and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import sample_text, tiny_tokenizer

from cwca_export.data import CalibrationData, calibration_data, load_texts


def test_load_texts_reads_txt_jsonl_and_lists(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("one\ntwo\n", encoding="utf-8")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b", "id": 2}\n', encoding="utf-8")
    other = tmp_path / "o.jsonl"
    other.write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")

    assert load_texts(txt) == ["one\ntwo\n"]
    assert load_texts(str(jsonl)) == ["a", "b"]
    assert load_texts(other, text_field="body") == ["x"]
    assert load_texts(["a", " ", "b"]) == ["a", "b"]



def test_a_byte_order_mark_and_an_upper_case_suffix_change_nothing(tmp_path):
    """Editors on Windows write a UTF-8 byte order mark and upper-case names: the mark is not
    text (it once became part of the first token; in .jsonl it failed to parse) and CALIB.TXT
    is a .txt file (it was refused)."""
    from cwca_export.data import iter_text

    text = sample_text()
    plain, marked, upper = tmp_path / "plain.txt", tmp_path / "marked.txt", tmp_path / "CALIB.TXT"
    plain.write_text(text, encoding="utf-8")
    marked.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    upper.write_text(text, encoding="utf-8")
    jsonl = tmp_path / "MARKED.JSONL"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n{"text": "b"}\n')
    assert load_texts(marked) == load_texts(upper) == load_texts(plain) == [text]
    assert "".join(iter_text(marked)) == "".join(iter_text(upper)) == text
    assert load_texts(jsonl) == ["a", "b"] and "".join(iter_text(jsonl)).split() == ["a", "b"]
    tok = tiny_tokenizer()
    ids = [calibration_data(p, tok, num_samples=2, seq_len=16, seed=0).input_ids for p in (plain, marked, upper)]
    assert torch.equal(ids[0], ids[1]) and torch.equal(ids[0], ids[2])

def test_load_texts_errors_name_the_problem(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "a"}\n{"body": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"c.jsonl:2: no 'text' field \(found \['body'\]\)"):
        load_texts(jsonl)
    with pytest.raises(FileNotFoundError, match="no such calibration file"):
        load_texts(tmp_path / "missing.txt")
    csv = tmp_path / "x.csv"
    csv.write_text("a", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\.txt or \.jsonl"):
        load_texts(csv)
    with pytest.raises(ValueError, match="no calibration text"):
        load_texts(["", "  "])


def test_text_is_tokenised_joined_and_cut_into_disjoint_windows():
    tok = tiny_tokenizer()
    stream = tok("\n\n".join([sample_text(), sample_text()]), add_special_tokens=False)["input_ids"]
    data = calibration_data([sample_text(), sample_text()], tok, num_samples=6, seq_len=32, held_out=2)
    assert data.input_ids.shape == (6, 32) and data.input_ids.dtype == torch.int64
    assert data.held_out.shape == (2, 32)
    assert data.tokens_available == len(stream)
    windows = {tuple(stream[i : i + 32]) for i in range(0, len(stream) - 31, 32)}
    rows = [tuple(r.tolist()) for r in torch.cat([data.input_ids, data.held_out])]
    assert set(rows) <= windows  # every sample is one aligned window of the joined stream
    assert len(set(rows)) == 8  # and the held-out split never repeats a calibration window


def test_same_seed_same_samples_other_seed_other_samples():
    tok = tiny_tokenizer()
    a = calibration_data([sample_text()], tok, num_samples=4, seq_len=16, seed=3)
    b = calibration_data([sample_text()], tok, num_samples=4, seq_len=16, seed=3)
    c = calibration_data([sample_text()], tok, num_samples=4, seq_len=16, seed=4)
    assert torch.equal(a.input_ids, b.input_ids) and a.data_hash == b.data_hash
    assert not torch.equal(a.input_ids, c.input_ids) and a.data_hash != c.data_hash


def test_pretokenized_input_needs_no_tokenizer():
    ids = torch.arange(24).view(3, 8)
    data = calibration_data(ids, num_samples=3, seq_len=8)
    assert sorted(r[0] for r in data.input_ids.tolist()) == [0, 8, 16]
    listed = calibration_data(ids.tolist(), num_samples=3, seq_len=8)
    assert torch.equal(listed.input_ids, data.input_ids) and listed.data_hash == data.data_hash
    assert calibration_data(data, num_samples=99, seq_len=99) is data
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        calibration_data(["some text"], num_samples=1, seq_len=2)


def test_too_few_tokens_says_how_many_unless_allowed():
    ids = list(range(50))
    with pytest.raises(ValueError, match=r"has 50 tokens \(3 windows of 16\); 4 \+ 1 held-out samples"):
        calibration_data([ids], num_samples=4, seq_len=16, held_out=1)
    fewer = calibration_data([ids], num_samples=4, seq_len=16, held_out=1, allow_fewer=True)
    assert isinstance(fewer, CalibrationData)
    assert fewer.num_samples == 2 and fewer.held_out.shape == (1, 16)
    with pytest.raises(ValueError, match="not even one"):
        calibration_data([ids], num_samples=4, seq_len=16, held_out=3, allow_fewer=True)
