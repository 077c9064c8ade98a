"""``--overwrite`` (and a file verb rewriting its ``--out``) replaces only the tool's own output
exactly as it wrote it: for every output kind, an edited file or an added one makes the verb
refuse in one line naming that file and leave everything in place; the unedited output is
replaced; an output from an older cwca-export (no content record) is kept, with a hint.

Snapshots are taken with hashlib over the files themselves, independently of the tool's records.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import sample_text, save_tiny_model, tiny_model

from cwca_export.cli import cli


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A model folder and calibration text."""
    root = tmp_path_factory.mktemp("work")
    save_tiny_model("llama", root / "model", num_hidden_layers=3)
    (root / "calib.txt").write_text(sample_text() * 4, encoding="utf-8")
    return root


def _cli(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _ok(*args) -> object:
    res = _cli(*args)
    assert res.exit_code == 0, res.output
    return res


def _tree(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``path`` (or of ``path`` itself)."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _refused(result, *needles: str) -> str:
    assert result.exit_code != 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _unstamp(path: Path) -> None:
    """Rewrite a JSON file as cwca-export wrote it before content stamps (same indent, no stamp)."""
    data = json.loads(path.read_text())
    data.pop("_content_sha256", None)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _add_note(path: Path) -> None:
    """A user's edit of a JSON file: one more key, file still valid JSON of the same type."""
    data = json.loads(path.read_text())
    data["my_notes"] = "checked by hand on Tuesday"
    path.write_text(json.dumps(data, indent=2) + "\n")


# ---- single JSON files: plan.json, scores.json ------------------------------------------------


@pytest.fixture(scope="module")
def scores(work):
    path = work / "scores.json"
    _ok("score", work / "model", "--data", work / "calib.txt", "--samples", 2, "--seq-len", 16, "--no-progress",
        "--no-wall-time", "--out", path)
    return path


def test_plan_json_edited_by_hand_is_kept(scores, tmp_path):
    plan = tmp_path / "plan.json"
    args = ("plan", scores, "--sparsity", 0.3, "--out", plan)
    _ok(*args)
    _ok(*args)  # unedited: replaced
    data = json.loads(plan.read_text())
    data["blocks"][0]["rho"] = 0.0  # the user pins block 0 by hand
    plan.write_text(json.dumps(data, indent=2) + "\n")
    before = _tree(plan)
    _refused(_cli(*args), f"--out {plan} was edited", "hint: move plan.json away", "or pass another --out")
    assert _tree(plan) == before
    # re-indenting loses nothing of the user's: the content, not the layout, is what counts
    plan.unlink()
    _ok(*args)
    plan.write_text(json.dumps(json.loads(plan.read_text()), indent=4))
    _ok(*args)


def test_scores_json_edited_or_unstamped_is_kept(work, scores, tmp_path):
    out = tmp_path / "scores.json"
    args = ("score", work / "model", "--data", work / "calib.txt", "--samples", 2, "--seq-len", 16,
            "--no-progress", "--no-wall-time", "--out", out)
    _ok(*args)
    _ok(*args)
    _add_note(out)
    before = _tree(out)
    _refused(_cli(*args), "was edited", "scores.json")
    assert _tree(out) == before
    # written by an older cwca-export: no stamp, so an edit cannot be ruled out
    out.write_bytes(scores.read_bytes())
    _unstamp(out)
    before = _tree(out)
    _refused(_cli(*args), "no content stamp", "older cwca-export", "hint: move scores.json away")
    assert _tree(out) == before


def test_refine_keeps_an_edited_plan(work, scores, tmp_path):
    plan = tmp_path / "plan.json"
    _ok("plan", scores, "--sparsity", 0.3, "--out", plan)
    _add_note(plan)
    before = _tree(plan)
    _refused(_cli("refine", work / "model", "--scores", scores, "--sparsity", 0.3, "--data", work / "calib.txt",
                  "--samples", 2, "--seq-len", 16, "--max-evals", 2, "--no-tune", "--out", plan), "was edited")
    assert _tree(plan) == before


# ---- folders: compress, export, run, demo ----------------------------------------------------


@pytest.fixture(scope="module")
def plan(scores):
    path = scores.with_name("plan.json")
    _ok("plan", scores, "--sparsity", 0.3, "--out", path)
    return path


def _compress(work, plan, out, *extra):
    return _cli("compress", work / "model", "--plan", plan, "--method", "magnitude", "--out", out, *extra)


@pytest.mark.parametrize("edit", ["config.json", "model.safetensors", "README.md", "cwca_files.json"])
def test_compressed_folder_with_an_edited_or_added_file_is_kept(work, plan, tmp_path, edit):
    out = tmp_path / "small"
    assert _compress(work, plan, out).exit_code == 0
    assert _compress(work, plan, out, "--overwrite").exit_code == 0  # unedited: replaced
    if edit == "config.json":  # notes in the model's config
        _add_note(out / "config.json")
    elif edit == "model.safetensors":  # weights replaced by the user's own, same size
        data = bytearray((out / edit).read_bytes())
        data[-1] ^= 1
        (out / edit).write_bytes(bytes(data))
    elif edit == "README.md":  # a file the tool never wrote
        (out / edit).write_text("# my model card\n")
    else:  # the record itself, edited
        _add_note(out / edit)
    before = _tree(out)
    line = _refused(_compress(work, plan, out, "--overwrite"), f"--out {out}", edit, "hint:", "another --out")
    fix = "move the folder away" if edit == "cwca_files.json" else f"move {edit} out of it"  # the file named
    assert fix in line, line
    assert _tree(out) == before


def test_compressed_folder_a_file_moved_away_is_replaced_and_older_records_are_kept(work, plan, tmp_path):
    out = tmp_path / "small"
    assert _compress(work, plan, out).exit_code == 0
    (out / "config.json").unlink()  # the fix the refusal names: the user's file moved out; nothing of theirs left
    assert _compress(work, plan, out, "--overwrite").exit_code == 0
    assert (out / "config.json").is_file()
    _unstamp(out / "cwca_files.json")  # a folder from a cwca-export without content stamps
    before = _tree(out)
    _refused(_compress(work, plan, out, "--overwrite"), "cwca_files.json has no content stamp",
             "move the folder away")
    assert _tree(out) == before


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    import cwca_export

    root = tmp_path_factory.mktemp("art")
    model = tiny_model("llama")
    art = cwca_export.export(model, None, root / "art", backend="onnx", runs=1, warmup=0)
    return model, art.path


@pytest.mark.parametrize("edit", ["model.onnx", "cwca_manifest.json", "notes.txt"])
def test_artifact_with_an_edited_or_added_file_is_kept(work, artifact, tmp_path, edit, monkeypatch):
    import shutil

    import cwca_export
    from cwca_export import loading
    from cwca_export.outputs import UnsafeOutputError

    model, source = artifact
    out = tmp_path / "art"
    shutil.copytree(source, out)
    if edit == "model.onnx":
        with (out / edit).open("r+b") as fh:
            fh.seek(64)
            byte = fh.read(1)
            fh.seek(64)
            fh.write(bytes([byte[0] ^ 1]))
    elif edit == "cwca_manifest.json":
        _add_note(out / edit)
    else:
        (out / edit).write_text("measured on my laptop")
    before = _tree(out)
    with pytest.raises(UnsafeOutputError, match=edit.replace(".", r"\.")):
        cwca_export.export(model, None, out, backend="onnx", runs=1, warmup=0, overwrite=True)
    # the CLI refuses before it loads the model
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    fix = "move the folder away" if edit == "cwca_manifest.json" else f"move {edit} out of it"
    _refused(_cli("export", work / "model", "--out", out, "--overwrite"), edit, f"hint: {fix}")
    assert _tree(out) == before


def test_unedited_artifact_is_replaced(artifact, tmp_path):
    import shutil

    import cwca_export

    model, source = artifact
    out = tmp_path / "art"
    shutil.copytree(source, out)  # a copy: new mtimes and inodes, so every file is hashed again
    cwca_export.export(model, None, out, backend="onnx", runs=1, warmup=0, overwrite=True)
    assert _cli("inspect", "--verify", out).exit_code == 0
    # the new artifact's manifest stamps its own content: sha256 of its canonical JSON without the stamp
    manifest = json.loads((out / "cwca_manifest.json").read_text())
    stamp = manifest.pop("_content_sha256")
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert stamp == hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@pytest.fixture()
def recipe(work, tmp_path, monkeypatch):
    monkeypatch.setenv("CWCA_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(work / "model"), "data": str(work / "calib.txt"), "samples": 2, "seq_len": 16,
        "score": {"method": "gradnorm"}, "plan": {"program": "prune", "sparsity": 0.5},
        "compress": {"method": "magnitude"},
    }))
    return path


def test_run_folder_with_an_edited_file_is_kept(work, recipe, tmp_path):
    out = tmp_path / "run"
    _ok("run", recipe, "--out", out)
    _ok("run", recipe, "--out", out, "--overwrite")  # unedited: replaced
    # a file the run folder's record lists is still of its own kind: scores never replace its plan
    _refused(_cli("score", work / "model", "--data", work / "calib.txt", "--samples", 2, "--seq-len", 16,
                  "--no-progress", "--out", out / "plan.json"), "a Plan file")
    with (out / "compressed" / "config.json").open("a") as fh:
        fh.write("\n")
    before = _tree(out)
    _refused(_cli("run", recipe, "--out", out, "--overwrite"), "compressed/config.json", "was edited")
    assert _tree(out) == before
    (out / "compressed" / "config.json").unlink()  # moved away: nothing of the user's is left in it
    _ok("run", recipe, "--out", out, "--overwrite")
    _add_note(out / "plan.json")
    _refused(_cli("run", recipe, "--out", out, "--overwrite"), "plan.json", "was edited")


def test_demo_folder_with_an_edited_report_is_kept(work, plan, tmp_path):
    """The demo records its folder like a run (write_inventory); its --overwrite refuses before running."""
    from cwca_export.outputs import write_inventory

    out = tmp_path / "demo"
    out.mkdir()
    (out / "plan.json").write_bytes(plan.read_bytes())
    _ok("report", out)
    (out / "report.json").write_text('{"rows": {}}\n')
    write_inventory(out)
    with (out / "report.json").open("a") as fh:
        fh.write(" ")
    before = _tree(out)
    _refused(_cli("demo", "--out", out, "--overwrite"), "report.json was edited")
    assert _tree(out) == before


# ---- report DIR: report.html and layers.png ----------------------------------------------------


@pytest.mark.parametrize("edit", ["report.html", "layers.png"])
def test_report_keeps_an_edited_page_or_figure(plan, tmp_path, edit):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "plan.json").write_bytes(plan.read_bytes())
    _ok("report", folder)
    _ok("report", folder)  # unedited: rebuilt
    page = (folder / "report.html").read_text()
    if edit == "report.html":
        (folder / edit).write_text(page.replace("<h2>Plan</h2>", "<h2>Plan</h2><p>my notes</p>"))
    else:
        data = bytearray((folder / edit).read_bytes())
        data[-1] ^= 1
        (folder / edit).write_bytes(bytes(data))
    before = _tree(folder)
    _refused(_cli("report", folder), f"{edit} exists", "or was edited", f"hint: move {edit} away")
    assert _tree(folder) == before


def test_report_keeps_a_page_from_an_older_cwca_export(plan, tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "plan.json").write_bytes(plan.read_bytes())
    _ok("report", folder)
    page = (folder / "report.html").read_text()
    (folder / "report.html").write_text(page[: page.rindex("<!-- cwca-export stamp:")])  # as written before stamps
    before = _tree(folder)
    _refused(_cli("report", folder), "report.html exists")
    assert _tree(folder) == before


# ---- files for other libraries: plan --llmcompressor-recipe FILE ------------------------------


def test_llmcompressor_recipe_replaces_only_its_own_unedited_file(scores, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    args = ("plan", scores, "--sparsity", 0.3, "--out", tmp_path / "plan.json", "--llmcompressor-recipe", recipe)
    _ok(*args)
    _ok(*args)  # unedited: replaced
    assert yaml.safe_load(recipe.read_text())["sparsity_stage"]  # the stamp is a YAML comment
    with recipe.open("a") as fh:
        fh.write("# calibrate on my data first\n")
    before = _tree(recipe)
    _refused(_cli(*args), f"--llmcompressor-recipe {recipe}", "or was edited", "hint: move recipe.yaml away")
    assert _tree(recipe) == before
    mine = tmp_path / "mine.yaml"
    mine.write_text("quant_stage: {}\n")
    _refused(_cli(*args[:-1], mine), "not a file cwca-export wrote")
    assert mine.read_text() == "quant_stage: {}\n"
    _refused(_cli(*args[:-1], scores), "is also the input SCORES")


def test_run_demo_called_from_python_keeps_an_edited_demo_folder(tmp_path, monkeypatch):
    """``run_demo(out, overwrite=True)`` checks the folder too (the CLI moves it aside first)."""
    from cwca_export import loading
    from cwca_export.demo import run_demo
    from cwca_export.outputs import UnsafeOutputError, write_inventory

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the demo started"))
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.json").write_text('{"rows": {}}\n')
    write_inventory(out)
    (out / "report.json").write_text('{"rows": {}, "mine": 1}\n')
    before = _tree(out)
    with pytest.raises(UnsafeOutputError, match="report.json was edited"):
        run_demo(out, overwrite=True, echo=lambda _: None)
    assert _tree(out) == before
