"""Hostile inputs to the bounded-memory features of issue 14 (calibration data, scoring in
batches, damage caches, eval, low-memory export, multi-process runs): each test here failed
before its fix. References are computed independently of the code under test."""

from __future__ import annotations

import pytest
from helpers import sample_text, tiny_model, tiny_tokenizer

from cwca_export.data import calibration_data, iter_text


def calib(num_samples, seq_len, held_out=0):
    return calibration_data([sample_text()], tiny_tokenizer(), num_samples=num_samples, seq_len=seq_len,
                            held_out=held_out)


# ---- calibration data: datasets folders -------------------------------------------------------


def test_zero_row_dataset_folder_is_no_text_not_an_index_error(tmp_path):
    """A Dataset saved with no rows has no Arrow file; datasets' own reader fails on it with
    an IndexError. It is an empty source: the usual one-line 'no calibration text'."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string")})
    datasets.Dataset.from_dict({"text": []}, features=features).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"empty: no calibration text found; hint: .*--data"):
        "".join(iter_text(str(tmp_path / "empty")))


def test_folder_that_claims_to_be_a_dataset_but_is_not_names_it(tmp_path):
    """A folder with a stray state.json: one line naming the folder and --data, not datasets'
    FileNotFoundError text alone."""
    pytest.importorskip("datasets")
    folder = tmp_path / "notads"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    with pytest.raises(ValueError, match=r"notads: not readable as a datasets save_to_disk folder .*--data"):
        "".join(iter_text(str(folder)))


# ---- score: one process, several calls ----------------------------------------------------------


def test_score_after_a_mixed_precision_score_in_the_same_process():
    """accelerate keeps mixed_precision process-wide and refused the second call ("restart your
    runtime"); each score() call now gets its own setting, with the numbers a fresh call gives."""
    from cwca_export.scoring import score

    model, data = tiny_model("llama"), calib(3, 16)
    plain = score(model, data, method="gradnorm", progress=False)
    mixed = score(model, data, method="gradnorm", progress=False, mixed_precision="bf16")
    again = score(model, data, method="gradnorm", progress=False)
    assert mixed.settings["mixed_precision"] == "bf16"
    assert again.zeta2 == plain.zeta2
    assert mixed.zeta2 != plain.zeta2  # bf16 autocast did run
