"""What the tool may write: the output guard of every writing verb, file records and
``inspect --verify``, output permissions and the cleaning of stale scratch entries."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import sample_text, save_tiny_model, tiny_model

from cwca_export.atomic import Staging
from cwca_export.cli import cli
from cwca_export.outputs import UnsafeOutputError, check_output
from cwca_export.scratch import HOST_TAG, clean_stale


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A model folder, calibration text, a scores file and a plan, made through the CLI."""
    root = tmp_path_factory.mktemp("work")
    save_tiny_model("llama", root / "model")
    (root / "calib.txt").write_text(sample_text() * 2, encoding="utf-8")
    res = CliRunner().invoke(cli, ["score", str(root / "model"), "--data", str(root / "calib.txt"), "--samples", "4",
                                   "--seq-len", "16", "--no-progress", "--out", str(root / "scores.json")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(
        cli, ["plan", str(root / "scores.json"), "--sparsity", "0.3", "--out", str(root / "plan.json")])
    assert res.exit_code == 0, res.output
    return root


def _tree(folder: Path) -> dict[str, str]:
    """Independent snapshot of a folder: relative path -> sha256."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(result, *needles: str) -> None:
    assert result.exit_code != 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def _cli(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


# ---- folders: export, compress, run, demo -----------------------------------------------------


def test_export_onto_its_own_model_is_refused_and_the_model_is_untouched(work):
    model = work / "model"
    before = _tree(model)
    _refused(_cli("export", model, "--out", model, "--overwrite"), "--out", "is also the input MODEL_DIR", "hint:")
    _refused(_cli("export", model, "--out", work, "--overwrite"), "holds the input MODEL_DIR")
    _refused(_cli("export", model, "--out", model / "onnx"), "lies inside the input MODEL_DIR")
    _refused(_cli("compress", model, "--plan", work / "plan.json", "--method", "magnitude", "--out", model,
                  "--overwrite"), "is also the input MODEL_DIR")
    _refused(_cli("compress", model, "--plan", work / "plan.json", "--method", "magnitude", "--out", work / "x",
                  "--data", work / "x" / "calib.txt"), "--out")  # an input inside the output
    assert _tree(model) == before


def test_the_working_directory_and_home_are_never_replaced(work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["compress", work / "model", "--plan", work / "plan.json", "--method", "magnitude", "--overwrite"]
    _refused(_cli(*args, "--out", "."), "working directory")
    _refused(_cli(*args, "--out", os.path.expanduser("~")), "--out")  # holds the model too, or is home
    (tmp_path / "inner").mkdir()
    monkeypatch.chdir(tmp_path / "inner")
    _refused(_cli(*args, "--out", tmp_path), "working directory")  # a folder that holds the working directory
    with pytest.raises(UnsafeOutputError, match="working directory"):
        Staging(tmp_path, overwrite=True)


def test_overwrite_replaces_only_the_tools_own_folder(work, tmp_path):
    args = ["compress", work / "model", "--plan", work / "plan.json", "--method", "magnitude"]
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    _refused(_cli(*args, "--out", user, "--overwrite"), "did not write (thesis.tex)", "--overwrite", "hint:")
    assert (user / "thesis.tex").read_text() == "years of work"

    out = tmp_path / "small"
    assert _cli(*args, "--out", out).exit_code == 0
    first = _tree(out)
    assert "cwca_files.json" in first
    res = _cli(*args, "--out", out, "--overwrite")  # the tool's own previous output: replaced
    assert res.exit_code == 0, res.output
    assert set(_tree(out)) == set(first)
    (out / "notes.txt").write_text("mine now")  # a user file inside makes it the user's
    _refused(_cli(*args, "--out", out, "--overwrite"), "notes.txt")
    assert (out / "notes.txt").read_text() == "mine now"


@pytest.mark.parametrize("verb", ["export", "compress", "demo"])
def test_an_existing_out_without_overwrite_is_refused_before_the_model_loads(work, tmp_path, monkeypatch, verb):
    """Export and compress load a model (a 7B one for minutes) before they write: an existing
    --out folder without --overwrite fails first, with the flag and its fix, and stays as it was."""
    from cwca_export import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    args = {"export": ["export", work / "model"],
            "compress": ["compress", work / "model", "--plan", work / "plan.json", "--method", "magnitude"],
            "demo": ["demo"]}[verb]
    _refused(_cli(*args, "--out", out), f"--out {out} already exists", "hint: pass --overwrite")
    assert _tree(out) == {"mine.txt": hashlib.sha256(b"the user's").hexdigest()}


def test_run_refuses_an_out_that_holds_the_recipes_model(work, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(work / "model"), "data": str(work / "calib.txt"), "samples": 4, "seq_len": 16,
        "score": {"method": "gradnorm"}, "plan": {"program": "prune", "sparsity": 0.5},
        "compress": {"method": "magnitude"},
    }))
    _refused(_cli("run", recipe, "--out", work / "model", "--overwrite"), "is also the input model")
    _refused(_cli("run", recipe, "--out", tmp_path, "--overwrite"), "holds the input RECIPE")


def test_demo_overwrite_refuses_a_folder_with_user_files(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.md").write_text("keep")
    _refused(_cli("demo", "--out", out, "--overwrite"), "did not write (notes.md)")
    assert (out / "notes.md").read_text() == "keep"


# ---- single files: score, plan, refine, report --------------------------------------------------


def test_single_file_outputs_replace_only_the_tools_json_of_the_same_kind(work, tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    score = ["score", work / "model", "--data", work / "calib.txt", "--samples", 2, "--seq-len", 16, "--no-progress"]
    _refused(_cli(*score, "--out", notes), "--out", "not a file cwca-export wrote")
    _refused(_cli(*score, "--out", work / "calib.txt"), "is also the input --data")
    _refused(_cli(*score, "--out", work / "plan.json"), "a Plan file")  # scores never replace a plan
    _refused(_cli("plan", work / "scores.json", "--sparsity", 0.3, "--out", work / "scores.json"),
             "is also the input SCORES")
    _refused(_cli("plan", work / "scores.json", "--sparsity", 0.3, "--out", notes), "not a file cwca-export wrote")
    _refused(_cli("refine", work / "model", "--scores", work / "scores.json", "--sparsity", 0.3, "--data",
                  work / "calib.txt", "--out", work / "scores.json"), "is also the input --scores")
    assert json.loads(notes.read_text()) == {"mine": True}
    plan = tmp_path / "plan.json"
    for _ in range(2):  # a plan the tool wrote is replaced by the next one
        res = _cli("plan", work / "scores.json", "--sparsity", 0.3, "--out", plan)
        assert res.exit_code == 0, res.output


def test_report_never_replaces_a_page_it_did_not_write(work, tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "plan.json").write_bytes((work / "plan.json").read_bytes())
    (folder / "report.html").write_text("<html>my own page</html>")
    _refused(_cli("report", folder), "report.html", "not a file cwca-export wrote")
    assert (folder / "report.html").read_text() == "<html>my own page</html>"
    (folder / "report.html").unlink()
    for _ in range(2):  # its own page and figure are rebuilt
        res = _cli("report", folder)
        assert res.exit_code == 0, res.output


def test_check_output_allows_new_paths_and_separate_inputs(tmp_path):
    (tmp_path / "model").mkdir()
    check_output(tmp_path / "out", inputs=[("MODEL_DIR", tmp_path / "model")])
    check_output(tmp_path / "scores.json", kind="file", json_types={"LayerScores"})


# ---- records and inspect --verify -----------------------------------------------------------


def test_compressed_folder_records_every_file_and_verify_finds_changes(tmp_path):
    from cwca_export.compression import save_compressed

    out = save_compressed(tiny_model("llama"), tmp_path / "small")
    record = json.loads((out / "cwca_files.json").read_text())
    assert record["_type"] == "CwcaFiles"
    listed = {row["path"]: row["sha256"] for row in record["files"]}
    assert listed == {k: v for k, v in _tree(out).items() if k != "cwca_files.json"}  # hashlib, independently
    res = _cli("inspect", "--verify", out)
    assert res.exit_code == 0 and res.output.startswith("ok: ")

    with (out / "config.json").open("a") as fh:
        fh.write(" ")
    (out / "generation_config.json").unlink()
    (out / "extra.bin").write_bytes(b"\0")
    res = _cli("inspect", "--verify", out)
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "changed: config.json (sha256 differs from cwca_files.json)",
        "missing: generation_config.json",
        "added: extra.bin",
    ]
    res = _cli("inspect", "--verify", out, "--json")
    assert res.exit_code == 1 and len(json.loads(res.output)["problems"]) == 3


def test_artifact_manifest_hashes_every_file_and_verify_checks_them(tmp_path):
    import cwca_export

    art = cwca_export.export(tiny_model("llama"), None, tmp_path / "art", backend="onnx", runs=1, warmup=0)
    files = {row["path"]: row["sha256"] for row in art.manifest["files"]}
    assert files == {k: v for k, v in _tree(art.path).items() if k != "cwca_manifest.json"}
    assert not (art.path / "cwca_files.json").exists()  # the manifest is the artifact's record
    assert _cli("inspect", "--verify", art.path).exit_code == 0
    with (art.path / "model.onnx").open("r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 1]))
    res = _cli("inspect", "--verify", art.path)
    assert res.exit_code == 1 and res.output.strip() == "changed: model.onnx (sha256 differs from cwca_manifest.json)"


def test_verify_refuses_a_folder_the_tool_did_not_write(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    _refused(_cli("inspect", "--verify", tmp_path), "no cwca_files.json or cwca_manifest.json")


# ---- permissions and stale scratch ----------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_output_folders_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        with Staging(tmp_path / "out") as staging:
            folder = staging.new_folder()
            fd = os.open(folder / "weights.bin", os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors does
            os.close(fd)
            (folder / "sub").mkdir(mode=0o700)
            out = staging.commit(folder)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((out / "weights.bin").stat().st_mode) == 0o666 & ~mask


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_clean_stale_removes_only_dead_runs_of_this_host(tmp_path):
    dead = _dead_pid()
    stale_dir = tmp_path / f".art.cwca-{HOST_TAG}-{dead}-x1y2.partial"
    stale_dir.mkdir()
    (stale_dir / "model.onnx").write_bytes(b"half")
    stale_file = tmp_path / f".scores.json.cwca-{HOST_TAG}-{dead}-z9.tmp"
    stale_file.write_text("{")
    keep = [
        tmp_path / f".art.cwca-{HOST_TAG}-{os.getppid()}-aa.partial",  # a live process
        tmp_path / f".art.cwca-00000000-{dead}-bb.partial",  # another host on a shared disk
        tmp_path / ".art.partial",  # the user's own name
        tmp_path / f"art.cwca-{HOST_TAG}-{dead}-cc.partial",  # not hidden: not ours
    ]
    for path in keep:
        path.mkdir()
    assert sorted(clean_stale(tmp_path)) == sorted([stale_dir, stale_file])
    assert all(path.is_dir() for path in keep)


def test_a_run_killed_between_its_renames_gets_its_old_output_back(tmp_path):
    old = tmp_path / f".art.cwca-{HOST_TAG}-{_dead_pid()}-q1.old"
    (old / "artifact").mkdir(parents=True)
    (old / "artifact" / "model.onnx").write_bytes(b"previous artifact")
    clean_stale(tmp_path)
    assert (tmp_path / "art" / "model.onnx").read_bytes() == b"previous artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
