"""Hostile inputs to the bounded-memory features of issue 14 (calibration data, scoring in
batches, damage caches, eval, low-memory export, multi-process runs): each test here failed
before its fix. References are computed independently of the code under test."""

from __future__ import annotations

import json

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


@pytest.mark.parametrize("fmt", ["pandas", "arrow", "numpy"])
def test_dataset_saved_with_a_format_reads_as_plain_text(tmp_path, fmt):
    """save_to_disk keeps a dataset's format: saved after with_format("pandas") a missing text
    came back as NaN (a float, refused), after with_format("arrow") every row was a StringScalar
    (refused as 'not a string'). The rows are read as Python objects whatever the format."""
    datasets = pytest.importorskip("datasets")
    text = sample_text()
    rows = datasets.Dataset.from_dict({"text": [text, None, "", text[::-1]], "n": [1, 2, 3, 4]})
    rows.with_format(fmt).save_to_disk(str(tmp_path / "saved"))
    assert "".join(iter_text(str(tmp_path / "saved"))) == text + "\n\n" + text[::-1]


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


def test_score_leaves_the_callers_accelerate_settings_as_they_were():
    """Setting this call's mixed precision must not change an Accelerator the caller holds:
    the process-wide settings are put back once score() returns (or fails)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from cwca_export.scoring import score

    AcceleratorState._reset_state(reset_partial_state=False)  # whatever earlier tests left
    caller = Accelerator(cpu=True, mixed_precision="bf16")
    model = tiny_model("llama")
    plain = score(model, calib(2, 16), method="gradnorm", progress=False, mixed_precision="no")
    assert plain.settings["mixed_precision"] == "no" and caller.mixed_precision == "bf16"
    with pytest.raises(ValueError, match="debias: needs at least 2"):  # raised by the estimator's run
        score(model, calib(1, 16), method="fisher", progress=False, mixed_precision="no", debias=True)
    assert caller.mixed_precision == "bf16"



def test_another_device_inside_a_multi_process_launch_is_refused_and_the_state_kept(monkeypatch):
    """accelerate keeps a launch's device in PartialState, with its process group; score() then
    cannot move one call to another device (a single process can: tests/test_gpu.py, which caught
    cpu=False after cpu=True silently staying on the CPU). Inside a launch it is refused, not
    ignored. A CPU machine has no second device: the launch is a 2-process state set by hand and
    the call asks for the accelerator."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    from cwca_export.scoring import api

    AcceleratorState._reset_state(reset_partial_state=False)  # whatever earlier tests left
    caller = Accelerator(cpu=True, mixed_precision="bf16")
    for state in (PartialState, AcceleratorState):  # the AcceleratorState holds a copy of it
        monkeypatch.setitem(state._shared_state, "num_processes", 2)
    before = dict(AcceleratorState._shared_state), dict(PartialState._shared_state)
    with (pytest.raises(ValueError, match=r"2-process launch runs on cpu.*hint: score with the same --device"),
          api._accelerator(cpu=False, mixed_precision="no")):
        pass
    assert (dict(AcceleratorState._shared_state), dict(PartialState._shared_state)) == before
    assert caller.mixed_precision == "bf16" and caller.device.type == "cpu"

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


# ---- data-parallel runs: every process must read the same data ------------------------------------


def _require_same_worker(rank: int, folder: str) -> None:
    import torch.distributed as dist

    from cwca_export.data_parallel import Processes

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        processes = Processes(rank, 2)
        processes.require_same({"--data": "sha256:same", "model (MODEL_DIR)": "sha256:m"})  # agrees: passes
        try:
            processes.require_same({"--data": f"sha256:rank{rank}", "model (MODEL_DIR)": "sha256:m"})
            outcome = "passed"
        except ValueError as err:
            outcome = str(err)
        with open(f"{folder}/rank{rank}.txt", "w", encoding="utf-8") as fh:
            fh.write(outcome)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_processes_that_read_different_data_refuse_together(tmp_path):
    """Each process reads --data itself; a file that differs between them (another host's copy,
    one rewritten meanwhile) gave sums over mixed data under process 0's data hash. Now every
    process refuses at once, naming --data (none is left waiting in a collective)."""
    import torch.multiprocessing as mp

    mp.start_processes(_require_same_worker, args=(str(tmp_path),), nprocs=2, join=True, start_method="spawn")
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text(encoding="utf-8")
        assert message.startswith("--data: process 1 read other contents than process 0"), message
        assert "sha256:rank1 against sha256:rank0" in message and "hint: give every process the same --data" in message


_RANK_DATA = """\
import os, sys
sys.argv = ["cwca-export"] + [a.replace("RANKFILE", f"calib{os.environ['RANK']}.txt") for a in sys.argv[1:]]
from cwca_export.__main__ import main
main()
"""


@pytest.mark.slow  # two torchrun launches (about 40 s on 2 shared cores)
@pytest.mark.parametrize("verb", ["score", "refine"])
def test_torchrun_with_different_data_per_process_is_refused(tmp_path, verb):
    """score (accelerate's group) and refine (the tool's gloo group) under torchrun, each process
    given another calibration file: one line naming --data, exit 1, nothing written."""
    import os
    import subprocess
    import sys

    from helpers import save_tiny_model

    folder = save_tiny_model("llama", tmp_path / "m")
    (tmp_path / "calib0.txt").write_text(sample_text() * 4, encoding="utf-8")
    (tmp_path / "calib1.txt").write_text(sample_text()[::-1] * 4, encoding="utf-8")
    (tmp_path / "rank_data.py").write_text(_RANK_DATA, encoding="utf-8")
    data = ["--data", "RANKFILE", "--samples", "4", "--seq-len", "16"]
    if verb == "score":
        args = ["score", str(folder), *data, "--estimator", "uniform", "--device", "cpu"]
    else:
        scores = tmp_path / "scores.json"
        from cwca_export.scoring import score

        score(str(folder), str(tmp_path / "calib0.txt"), method="uniform", num_samples=4, seq_len=16,
              progress=False).save(scores)
        args = ["refine", str(folder), "--scores", str(scores), "--sparsity", "0.5", "--method", "magnitude",
                *data, "--batch-size", "2", "--no-tune", "--max-evals", "4"]
    (tmp_path / "out").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "rank_data.py"), *args, "--out", str(tmp_path / "out" / "result.json")],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert proc.returncode != 0
    assert "Error: --data: process 1 read other contents than process 0" in proc.stderr, proc.stderr[-3000:]
    assert list((tmp_path / "out").iterdir()) == []


# ---- eval: the held-out text streamed, reading stops at --max-tokens -------------------------------


def test_eval_max_tokens_reads_only_what_it_scores(tmp_path):
    """eval --max-tokens 300 on a corpus whose tail is unreadable (bytes that are not UTF-8 2 MB
    in, as in a huge file) scored the head only after reading and tokenising the whole file, and
    here failed on the tail. It now stops reading once it holds 300 tokens: the perplexity is
    that of the head alone, measured on a file holding nothing else."""
    from helpers import save_tiny_model

    from cwca_export.evaluate import evaluate

    model = save_tiny_model("llama", tmp_path / "m")
    head = (sample_text() + "\n\n") * 400  # about 2 MB of text
    (tmp_path / "head.txt").write_text(head, encoding="utf-8")
    (tmp_path / "big.txt").write_bytes(head.encode("utf-8") + b"\xff\xfe not text" + b"x" * 1000)
    kw = {"seq_len": 64, "max_tokens": 300, "device": "cpu"}
    big = evaluate(str(model), str(tmp_path / "big.txt"), **kw)
    alone = evaluate(str(model), str(tmp_path / "head.txt"), **kw)
    assert big["perplexity"] == alone["perplexity"] and big["tokens"] == alone["tokens"] == 295  # 300 - 5 windows
    with pytest.raises(ValueError, match="not UTF-8"):  # read whole, the tail is still refused
        evaluate(str(model), str(tmp_path / "big.txt"), seq_len=64, device="cpu")


def test_eval_streamed_ids_equal_one_call_over_the_whole_text(tmp_path):
    """The held-out ids, read in pieces, equal one tokenizer call over the joined documents
    (a jsonl of documents longer than a piece, joined by blank lines)."""
    from cwca_export.evaluate import read_token_ids

    tok = tiny_tokenizer()
    docs = [sample_text() * 60, "short one", sample_text()[::-1] * 70]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    whole = tok("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    assert read_token_ids(str(tmp_path / "d.jsonl"), tok).tolist() == whole
    assert read_token_ids(str(tmp_path / "d.jsonl"), tok, max_tokens=1000)[:1000].tolist() == whole[:1000]


# ---- --text-field on every verb that reads --data ---------------------------------------------------


@pytest.mark.parametrize("verb", ["refine", "export"])
def test_refine_and_export_read_another_jsonl_field(tmp_path, verb):
    """A .jsonl whose text is under "body": refine and export had no --text-field, yet their
    error said 'hint: choose the field with --text-field'. Both take it now; the refusal names it
    and, given, the data is read (refine measures on it; export's clip rounding reads it)."""
    from click.testing import CliRunner
    from helpers import save_tiny_model

    from cwca_export.cli import cli
    from cwca_export.scoring import score

    model = save_tiny_model("llama", tmp_path / "m")
    body = tmp_path / "body.jsonl"
    body.write_text("".join(json.dumps({"body": sample_text()}) + "\n" for _ in range(6)), encoding="utf-8")
    if verb == "refine":
        scores = tmp_path / "scores.json"
        score(tiny_model("llama"), calib(4, 16), method="uniform", progress=False).save(scores)
        args = ["refine", str(model), "--scores", str(scores), "--sparsity", "0.5", "--method", "magnitude",
                "--samples", "4", "--seq-len", "16", "--no-tune", "--max-evals", "3", "--out", str(tmp_path / "p.json")]
    else:
        args = ["export", str(model), "--backend", "onnx", "--quantize", "int4", "--samples", "4", "--seq-len", "16",
                "--runs", "1", "--warmup", "0", "--out", str(tmp_path / "art")]
    refused = CliRunner().invoke(cli, [*args, "--data", str(body)])
    assert refused.exit_code == 1 and "no 'text' field (found ['body']); hint: choose the field with --text-field" \
        in refused.output, refused.output
    given = CliRunner().invoke(cli, [*args, "--data", str(body), "--text-field", "body"])
    assert given.exit_code == 0, given.output


# ---- score --device-map with a cap below every module ----------------------------------------------


def test_a_device_memory_cap_that_puts_the_whole_model_on_disk_is_one_line(tmp_path):
    """--device-memory cpu=20KB on a model whose embeddings alone are larger: accelerate places
    the whole model on disk and transformers failed with safetensors' bare 'device disk is
    invalid'. Now a ValueError naming --device-memory and what to raise it to."""
    from helpers import save_tiny_model

    from cwca_export.loading import load_model

    model = save_tiny_model("llama", tmp_path / "m")  # embeddings: 384 x 32 x 4 = 49 kB
    with pytest.raises(ValueError, match=r"--device-memory cpu=20000 \(bytes\) places the whole model on disk.*"
                                         r"hint: raise --device-memory"):
        load_model(str(model), device_map="auto", max_memory={"cpu": 20000})
    net, _ = load_model(str(model), device_map="auto", max_memory={"cpu": 100 * 1024})  # embeddings fit: loads
    assert net.hf_device_map["model.embed_tokens"] == "cpu"


# ---- eval: --device and --ep each where they apply ---------------------------------------------------


def test_eval_refuses_a_device_flag_the_target_would_ignore(tmp_path):
    """eval ARTIFACT --device cuda ran on ONNX Runtime's CPU provider and said nothing (even
    --device bogus passed); eval FOLDER --ep cuda ran torch on the CPU. Each is now refused
    with the flag that does apply; --device cpu with an artifact (the same place) still runs."""
    from click.testing import CliRunner
    from helpers import save_tiny_model

    from cwca_export.cli import cli

    folder = save_tiny_model("llama", tmp_path / "m")
    artifact = tmp_path / "art"
    exported = CliRunner().invoke(cli, ["export", str(folder), "--backend", "onnx", "--runs", "1", "--warmup", "0",
                                        "--out", str(artifact)])
    assert exported.exit_code == 0, exported.output
    (tmp_path / "t.txt").write_text(sample_text(), encoding="utf-8")
    common = ["--data", str(tmp_path / "t.txt"), "--seq-len", "32", "--max-tokens", "100"]
    for target, flags, hint in ((artifact, ["--device", "cuda"], "hint: pass --ep cuda"),
                                (artifact, ["--device", "bogus"], "hint: pass --ep cuda"),
                                (folder, ["--ep", "cuda"], "hint: pass --device cuda")):
        result = CliRunner().invoke(cli, ["eval", str(target), *common, *flags])
        assert result.exit_code == 2 and hint in result.output, result.output
    ran = CliRunner().invoke(cli, ["eval", str(artifact), *common, "--device", "cpu"])
    assert ran.exit_code == 0 and "onnxruntime (cpu)" in ran.output, ran.output
