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


# ---- a write that cannot grow --------------------------------------------------------------------


def test_a_file_size_limit_is_one_line_with_a_hint_and_leaves_nothing(tmp_path):
    """A process file size limit (ulimit -f; EFBIG, as on a file system's own limit) or a quota
    (EDQUOT) stops a write as a full disk does: the same one line with a hint, not the bare
    '[Errno 27] File too large', and no output or scratch file left."""
    import resource
    import subprocess
    import sys

    from cwca_export.scoring import score

    scores = tmp_path / "scores.json"
    score(tiny_model("llama"), calib(2, 16), method="uniform", progress=False).save(scores)
    run = tmp_path / "run"
    run.mkdir()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))  # bytes: plan.json is larger

    proc = subprocess.run(
        [sys.executable, "-m", "cwca_export", "plan", str(scores), "--program", "prune", "--sparsity", "0.5",
         "--out", str(run / "plan.json")],
        capture_output=True, text=True, preexec_fn=limit, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "file too large" in last and "ulimit -f" in last and "hint:" in last, last
    assert "Traceback" not in proc.stderr
    assert list(run.iterdir()) == []


# ---- score --no-wall-time: byte-identical reruns -----------------------------------------------


def test_damage_scores_without_wall_time_are_byte_identical_on_rerun(tmp_path):
    """--no-wall-time promises byte-identical reruns; the damage estimator's probe_time_s in the
    settings was a wall time too, so two runs differed."""
    from cwca_export.scoring import score

    model, data = tiny_model("llama"), calib(3, 16)
    paths = []
    for i in range(2):
        scores = score(model, data, method="damage", options={"pruner": "magnitude", "points": "0.5"},
                       progress=False, record_wall_time=False)
        assert not any(key.endswith("_time_s") for key in scores.settings), scores.settings
        paths.append(scores.save(tmp_path / f"s{i}.json"))
    assert (tmp_path / "s0.json").read_bytes() == (tmp_path / "s1.json").read_bytes()
    timed = score(model, data, method="damage", options={"pruner": "magnitude", "points": "0.5"}, progress=False)
    assert timed.settings["probe_time_s"] >= 0  # kept when the wall time is recorded
