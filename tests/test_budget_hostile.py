"""A hostile user of the budget search and its peers: hardware profiles, precision plans,
budgets no storage can meet, recipes. Each case failed before its fix."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from helpers import sample_text, save_tiny_model

import cwca_export.exporter.api
import cwca_export.exporter.search
import cwca_export.planning.precision
from cwca_export.cli import cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    save_tiny_model("llama", root / "model", num_hidden_layers=2)
    (root / "calib.txt").write_text(sample_text() * 4)
    return root


@pytest.fixture()
def no_export(monkeypatch):
    """Fail the test if anything is exported: a bad input must be refused before any work."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the export ran")

    monkeypatch.setattr(cwca_export.exporter.api, "build_candidate", refuse)
    monkeypatch.setattr(cwca_export.exporter.search, "fit_budget", refuse)


def _export(*args):
    return CliRunner().invoke(cli, ["export", *[str(a) for a in args]])


# ------------------------------------------------------------------ --hardware YAML values
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # YAML's `true` is a Python int: it was taken as a 1-byte memory limit and a search ran
        ({"memory": True}, "memory: expected a size"),
        ({"memory": -1}, "memory: size -1 must be positive"),
        ({"memory": [1]}, "memory: expected a size"),
        # these named --ep / --dtype (flags that do not fix a file), not the file
        ({"ep": "tpu"}, "ep: 'tpu'; choose one of cpu, cuda"),
        ({"dtype": "float16"}, "dtype: 'float16'; choose one of fp32, fp16"),
        ({"description": ["x"]}, "description: expected text"),
    ],
)
def test_bad_hardware_profile_values_name_the_file(tiny, tmp_path, no_export, body, expected):
    profile = tmp_path / "hw.yaml"
    profile.write_text(yaml.safe_dump({"description": "x", "memory": "1GB", "ep": "cpu", "dtype": "fp32", **body}))
    res = _export(tiny / "model", "--hardware", profile, "--out", tmp_path / "out")
    assert res.exit_code != 0, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert f"{profile}: {expected}" in lines[0] and "--hardware" in lines[0], res.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ recipes: export.hardware
BASE = {
    "model": "model", "data": "calib.txt", "samples": 4, "seq_len": 16,
    "score": {"method": "gradnorm"},
    "plan": {"program": "prune", "sparsity": 0.5},
    "compress": {"method": "magnitude"},
}


def _recipe(folder, tiny, body):
    folder.mkdir(exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({**BASE, "model": str(tiny / "model"), "data": str(tiny / "calib.txt"), **body}))
    return path


def test_recipe_hardware_path_is_relative_to_the_recipe(tiny, tmp_path, monkeypatch):
    """recipes/README.md: paths are relative to the recipe file (the profile was looked up in the
    working directory, so a recipe run from elsewhere was refused)."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "hw.yaml").write_text(yaml.safe_dump(
        {"description": "x", "memory": "64MB", "ep": "cpu", "dtype": "fp32"}))
    recipe = _recipe(tmp_path / "recipes", tiny, {"export": {"hardware": "hw.yaml"}})
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["run", str(recipe), "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["export"]["hardware"] == str(tmp_path / "recipes" / "hw.yaml")


def test_recipe_hardware_contents_checked_before_any_step(tiny, tmp_path):
    """A profile whose contents are bad passed --dry-run and failed only at the export step."""
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "hw.yaml").write_text("description: x\nmemory: true\nep: cpu\ndtype: fp32\n")
    recipe = _recipe(tmp_path / "r", tiny, {"export": {"hardware": "hw.yaml"}})
    res = CliRunner().invoke(cli, ["run", str(recipe), "--dry-run"])
    assert res.exit_code == 1, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert "export.hardware:" in res.output and "memory: expected a size" in res.output
    assert "--set export.hardware=" in res.output


def test_recipe_union_errors_give_a_valid_set_flag(tiny, tmp_path):
    """`max_latency_ms: 0` named the key `export.max_latency_ms.constrained-float`, and its fix
    flag `--set export.max_latency_ms.constrained-float=VALUE` is no key of a recipe."""
    recipe = _recipe(tmp_path / "r", tiny, {"export": {"max_latency_ms": 0}})
    res = CliRunner().invoke(cli, ["run", str(recipe), "--dry-run"])
    assert res.exit_code == 1, res.output
    assert "export.max_latency_ms: Input should be greater than 0" in res.output, res.output
    assert "constrained" not in res.output
    flag = res.output.split("fix: --set ")[1].split()[0]
    fixed = CliRunner().invoke(cli, ["run", str(recipe), "--dry-run", "--set", flag])
    assert fixed.exit_code == 0, fixed.output


# ------------------------------------------------------------------ --precision FILE
@pytest.mark.parametrize(
    ("formats", "expected"),
    [
        # these built a graph that failed verification ("try another backend (onnx)")
        ({"tied": "int4-b32"}, "group tied: int4-b32 is not a format it can be stored in"),
        ({"model.layers.0": "int8", "embed": "int4-b32", "tied": "int8"}, "either tied"),
        # exported the whole model, then failed in the quantizer without naming the file
        ({"embed": "int4-b32-a8"}, "group embed: int4-b32-a8"),
        # named neither the file nor the flag
        ({"model.layers.9": "int8"}, "unknown group(s) ['model.layers.9']"),
        ({"model.layers.0": "int4-b33"}, "block size must be a power of two"),
    ],
)
def test_bad_precision_plans_are_refused_before_export(tiny, tmp_path, no_export, formats, expected):
    model = tiny / "model"
    if "tied" in formats:  # a model whose head reads the embedding's table
        model = save_tiny_model("llama", tmp_path / "tied", num_hidden_layers=2, tie_word_embeddings=True)
    path = tmp_path / "formats.json"
    path.write_text(json.dumps({"formats": formats}))
    res = _export(model, "--precision", path, "--out", tmp_path / "out")
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert "--precision" in last and str(path) in last and expected in last, res.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ budgets no storage can meet
def _size(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


def test_a_budget_below_every_storage_is_refused_before_the_damage_table(tiny, tmp_path, monkeypatch):
    """A disk limit below the most compact storage measured every group's damage in every format
    (minutes on the shipped model, hours on a large one) before saying no candidate fits; bytes
    are exact from shapes, so it is refused first, with the smallest size it could reach. That
    size must not exceed a real artifact in that storage (files on disk), or a budget the search
    could meet would be refused."""
    from cwca_export.loading import load_model
    from cwca_export.planning.precision import precision_groups

    model, _ = load_model(tiny / "model")
    plan = {g.name: "int4-b32" for g in precision_groups(model)}
    (tmp_path / "int4.json").write_text(json.dumps({"formats": plan}))
    res = _export(tiny / "model", "--precision", tmp_path / "int4.json", "--rounding", "rtn",
                  "--out", tmp_path / "int4")
    assert res.exit_code == 0, res.output
    real = sum(f.stat().st_size for f in (tmp_path / "int4").iterdir() if f.name != "cwca_manifest.json")

    def no_table(*_a, **_k):
        raise AssertionError("the damage table was measured for a budget nothing can meet")

    monkeypatch.setattr(cwca_export.planning.precision, "measure_precision_damage", no_table)
    monkeypatch.setattr(cwca_export.planning.precision, "fisher_precision_estimate", no_table)
    res = _export(tiny / "model", "--data", tiny / "calib.txt", "--samples", 4, "--seq-len", 32,
                  "--formats", "fp32,int4-b32", "--max-disk", int(real * 0.5), "--out", tmp_path / "out")
    assert res.exit_code == 1, res.output
    line = res.output.strip().splitlines()[-1]
    assert "no setting meets the budget" in line and "Traceback" not in res.output, res.output
    predicted = _size(line.split("is predicted at ")[1].split(" on disk")[0])
    assert 0.9 * real <= predicted <= real, (predicted, real)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ eval on too little text
def test_eval_of_a_single_token_names_the_file(tiny, tmp_path):
    """One token of held-out text said only "need at least 2 tokens ... got 1", naming neither
    the file nor a flag."""
    from transformers import AutoTokenizer

    one = tmp_path / "one.txt"
    one.write_text("a")
    assert len(AutoTokenizer.from_pretrained(tiny / "model")("a").input_ids) == 1  # the reference count
    res = CliRunner().invoke(cli, ["eval", str(tiny / "model"), "--data", str(one)])
    assert res.exit_code == 1, res.output
    line = res.output.strip().splitlines()[-1]
    assert str(one) in line and "--data" in line and "1 token(s)" in line, res.output


# ------------------------------------------------------------------ the shipped model, used as HF documents it
def test_shipped_model_generates_from_its_tokenizer_output():
    """`model.generate(**tokenizer(text, return_tensors="pt"))`, the Hugging Face snippet, failed on
    the shipped model and on every artifact exported from it (which copy its tokenizer): the
    tokenizer returned token_type_ids, which Llama's generate() refuses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cwca_export.demo import DEMO_MODEL

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype="float32")
    out = model.generate(**tokenizer("def open(file):", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == len(tokenizer("def open(file):").input_ids) + 3


# ------------------------------------------------------------------ storage flags with no storage to plan
@pytest.mark.parametrize(
    ("extra", "flag", "why"),
    [
        (["--formats", "int4-b32"], "--formats", "no limit"),
        (["--quantize", "int8", "--formats", "int4-b32", "--max-disk", "30MB"], "--formats", "--quantize fixes"),
        (["--dtype", "float16", "--max-disk", "30MB", "--formats", "int4-b32"], "--formats", "float16"),
        (["--precision-estimate", "fisher"], "--precision-estimate", "no limit"),
        (["--quantize", "int8", "--rounding", "rtn"], "--rounding", "drop --rounding"),
    ],
)
def test_storage_flags_that_would_change_nothing_are_refused(tiny, tmp_path, no_export, extra, flag, why):
    """These exported an artifact as if the flag had not been given (an int8 artifact for
    `--quantize int8 --formats int4-b32`), without a word."""
    res = _export(tiny / "model", *extra, "--out", tmp_path / "out")
    assert res.exit_code == 2, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith(f"Error: {flag} applies to") and why in line, res.output
    assert not (tmp_path / "out").exists()
