"""export --low-memory against checkpoints that do not say what they hold (issue 14, hostile use).

A low-memory export without compression loads a checkpoint in the precision its weights are
stored in and widens it to float32 itself; the artifact must be the ordinary float32 export of
the same weights, byte for byte, whatever the folder's config.json claims. The reference is
the ordinary export (transformers loading the folder in float32)."""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import tiny_model, tiny_tokenizer
from safetensors.torch import load_file, save_file

from cwca_export.cli import cli
from cwca_export.exporter.manifest import MANIFEST_NAME

COMMON = ["--backend", "onnx", "--external-data-threshold", "1KiB", "--prompt-len", "8", "--context", "24",
          "--runs", "1", "--warmup", "0"]


def _save(model, folder: Path, *, dtype: str | None, tensors=None) -> Path:
    """``model`` saved with safetensors, its config's dtype fields then set to ``dtype`` (None: removed)."""
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    if tensors is not None:
        save_file(tensors(load_file(folder / "model.safetensors")), folder / "model.safetensors",
                  metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    if dtype is not None:
        config["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _assert_same_artifact(folder: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ordinary = runner.invoke(cli, ["export", str(folder), *COMMON, "--out", str(tmp_path / "ordinary")])
    assert ordinary.exit_code == 0, ordinary.output
    lean = runner.invoke(cli, ["export", str(folder), *COMMON, "--low-memory", "--out", str(tmp_path / "lean")])
    assert lean.exit_code == 0, lean.output
    names = sorted(p.name for p in (tmp_path / "ordinary").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "lean").iterdir())
    for name in names:
        if name != MANIFEST_NAME:
            assert filecmp.cmp(tmp_path / "ordinary" / name, tmp_path / "lean" / name, shallow=False), name


def test_float32_weights_under_a_config_that_says_bfloat16_are_not_rounded(tmp_path):
    """A config's dtype is a claim (hand-edited, copied from the upstream model): the weights
    stored in float32 must not be loaded as bfloat16 and rounded."""
    folder = _save(tiny_model("llama"), tmp_path / "claims-bf16", dtype="bfloat16")
    _assert_same_artifact(folder, tmp_path)


def test_bfloat16_matrices_beside_float32_norms_keep_the_norms(tmp_path):
    """Mixed storage (matrices bf16, norms kept in float32 as some trainers save them)."""

    def mixed(tensors):
        out = {}
        for name, value in tensors.items():
            if value.dim() >= 2:
                out[name] = value.to(torch.bfloat16)
            else:  # norm weights that bfloat16 cannot hold exactly
                out[name] = value + 1e-3 * torch.arange(value.numel(), dtype=torch.float32)
        return out

    folder = _save(tiny_model("llama"), tmp_path / "mixed", dtype="bfloat16", tensors=mixed)
    _assert_same_artifact(folder, tmp_path)


def _to_bfloat16(tensors):
    return {name: value.to(torch.bfloat16) if value.is_floating_point() else value for name, value in tensors.items()}


def test_a_compressed_bfloat16_folder_keeps_its_rotary_table_in_float32(tmp_path):
    """A folder written by ``compress`` (lowrank: factorised Linears) whose weights are stored in
    bfloat16: loading it as stored must not round the rotary inv_freq table the model builds."""
    from compress_plans import make_plan

    model = tiny_model("llama")
    dense = _save(model, tmp_path / "dense", dtype="float32")
    make_plan(model, "allocate", [1, 2]).save(tmp_path / "ranks.json")
    done = CliRunner().invoke(cli, ["compress", str(dense), "--plan", str(tmp_path / "ranks.json"), "--method",
                                    "lowrank", "--rank-step", "4", "--out", str(tmp_path / "lowrank")])
    assert done.exit_code == 0, done.output
    folder = tmp_path / "lowrank-bf16"
    shutil.copytree(tmp_path / "lowrank", folder)
    save_file(_to_bfloat16(load_file(folder / "model.safetensors")), folder / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "bfloat16"  # the dtype the ordinary float32 load does not write back
    (folder / "config.json").write_text(json.dumps(config))
    _assert_same_artifact(folder, tmp_path)


@pytest.mark.parametrize(("dtype", "claim", "expected"), [
    (torch.bfloat16, None, "bfloat16"),  # a config without a dtype field: the headers still say bf16
    (torch.float16, "float32", "float16"),
    (torch.float32, "float16", "float32"),
])
def test_the_stored_dtype_is_what_the_safetensors_headers_hold(tmp_path, dtype, claim, expected):
    from cwca_export.loading import stored_dtype

    folder = _save(tiny_model("gpt2").to(dtype), tmp_path / "m", dtype=claim)
    assert {v.dtype for v in load_file(folder / "model.safetensors").values()} == {dtype}  # what was written
    assert stored_dtype(folder) == expected


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write to: a read-only tmpfs for root (who ignores permission bits), mode 0555 otherwise."""
    import os
    import subprocess

    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("root without permission to mount a read-only tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("out", ["artifact", "new/artifact"])
def test_a_read_only_out_is_refused_before_the_model_loads(tmp_path, read_only_folder, out, monkeypatch):
    """One line naming --out with a fix, exit 1, before minutes of loading a large checkpoint."""
    import cwca_export.loading

    folder = _save(tiny_model("llama").to(torch.bfloat16), tmp_path / "bf16", dtype="bfloat16")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cwca_export.loading, "load_model", no_load)
    result = CliRunner().invoke(cli, ["export", str(folder), *COMMON, "--low-memory",
                                      "--out", str(read_only_folder / out)])
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert "hint:" in result.output and "--out" in result.output.split("hint:")[1], result.output


@pytest.mark.parametrize("low_memory", [False, True])
def test_a_model_of_mixed_precision_is_refused_by_dtype_not_by_torch(tmp_path, low_memory):
    """A float32 embedding in front of bfloat16 blocks: checking the first parameter alone let the
    ordinary export reach torch's own dtype error; the refusal names the dtype and the fix."""
    import cwca_export
    from cwca_export.budget import Budget

    model = tiny_model("llama").to(torch.bfloat16)
    model.model.embed_tokens.float()
    assert next(model.parameters()).dtype == torch.float32
    from compress_plans import make_plan

    options = {"budget": Budget(prompt_len=8, context=24), "runs": 1, "warmup": 0, "backend": "onnx"}
    plan = None
    if low_memory:  # widening is for an uncompressed export; a method compresses in the precision given
        options["method"], plan = "magnitude", make_plan(model, "prune", [0.3, 0.6])
    with pytest.raises(ValueError, match=r"float32 torch model, got .*bfloat16.*hint"):
        cwca_export.export(model, plan, tmp_path / "out", low_memory=low_memory, **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra", [["--optimize", "all", "--dtype", "float16"],
                                   ["--quantize", "int8", "--optimize", "basic"]])
def test_every_float_session_of_a_low_memory_export_runs_without_prepacking(tmp_path, monkeypatch, extra):
    """ONNX Runtime prepacks every constant MatMul weight into memory of its own at session
    creation (about one fp32 copy more: measured 116 MiB for 98 MiB of weights writing an
    --optimize graph); a low-memory export opens no float graph's session that does. A quantized
    artifact's final sessions prepack (its quantized bytes; without, int4 ran 8x slower at 550M),
    so it is checked and measured as deployed. Asked of ONNX Runtime's own options for every
    session the process creates."""
    import onnxruntime

    folder = _save(tiny_model("llama").to(torch.bfloat16), tmp_path / "bf16", dtype="bfloat16")
    seen = []
    real = onnxruntime.InferenceSession

    class Recording(real):
        def __init__(self, path, options=None, *args, **kwargs):
            try:
                seen.append(options.get_session_config_entry("session.disable_prepacking"))
            except (AttributeError, RuntimeError):  # no options, or the entry never set: prepacking on
                seen.append(None)
            super().__init__(path, options, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", Recording)
    result = CliRunner().invoke(cli, ["export", str(folder), *COMMON, "--low-memory", *extra,
                                      "--out", str(tmp_path / "lean")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "lean" / MANIFEST_NAME).read_text())
    if "--quantize" in extra:  # the optimiser's and the fp32 check's sessions, then the int8 check's
        assert seen == ["1", "1", None], seen
        assert manifest["measurement"]["workload"]["prepack"] is True  # the measuring child's session
    else:
        assert seen and all(entry == "1" for entry in seen), seen
        assert manifest["measurement"]["workload"]["prepack"] is False


def test_low_memory_with_a_hardware_profile_names_the_profile(tmp_path):
    """--hardware brings limits of its own: the refusal must name the flag the user passed."""
    folder = _save(tiny_model("llama").to(torch.bfloat16), tmp_path / "bf16", dtype="bfloat16")
    result = CliRunner().invoke(cli, ["export", str(folder), *COMMON, "--low-memory", "--hardware", "cpu-2core-24gb",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "--hardware" in result.output.split("hint:")[1], result.output


@pytest.mark.parametrize("threshold", ["1KiB", "2GiB"])
def test_the_small_model_note_appears_exactly_when_the_graph_is_written_inline(tmp_path, threshold):
    """The note says --low-memory saves nothing because the graph is written inline and rewritten
    whole: true only when the artifact has no external data file, whatever --external-data-threshold."""
    folder = _save(tiny_model("llama").to(torch.bfloat16), tmp_path / "bf16", dtype="bfloat16")
    args = [a if a != "1KiB" else threshold for a in COMMON]
    result = CliRunner().invoke(cli, ["export", str(folder), *args, "--low-memory", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    inline = not (tmp_path / "out" / "model.onnx_data").exists()
    assert ("written inline" in result.output) == inline, result.output


def test_eval_low_memory_on_a_torch_folder_is_refused_with_lm_eval_tasks_too(tmp_path):
    """--low-memory applies to ONNX artifacts; with --lm-eval-tasks (a torch folder's path) it was
    silently ignored (or the missing extra reported instead)."""
    folder = _save(tiny_model("llama"), tmp_path / "folder", dtype="float32")
    result = CliRunner().invoke(cli, ["eval", str(folder), "--lm-eval-tasks", "hellaswag", "--low-memory"])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "hint: drop --low-memory" in result.output


def test_a_stored_rotary_table_does_not_make_a_bfloat16_checkpoint_load_in_float32(tmp_path):
    """Checkpoints converted with older transformers carry each layer's rotary ``inv_freq`` in
    float32 beside bfloat16 weights; transformers recomputes it and never reads it, so the load
    stays bfloat16 (low memory) and the artifact is still the ordinary one."""
    from cwca_export.loading import stored_dtype

    def with_tables(tensors):
        table = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
        return {**tensors, **{f"model.layers.{i}.self_attn.rotary_emb.inv_freq": table.clone() for i in range(2)}}

    folder = _save(tiny_model("llama").to(torch.bfloat16), tmp_path / "old", dtype="bfloat16", tensors=with_tables)
    assert stored_dtype(folder) == "bfloat16"
    _assert_same_artifact(folder, tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_eval_of_a_damaged_artifact_is_one_line_with_a_fix(tmp_path, damage):
    """A copy cut short (a full disk, an interrupted transfer) or without its data file: ONNX
    Runtime refuses it (bounds-checked, also when mapped without prepacking); the user gets one
    line that says the artifact is damaged and how to get a whole one, not ORT's internals alone."""
    import os

    from helpers import sample_text

    folder = _save(tiny_model("llama").to(torch.bfloat16), tmp_path / "bf16", dtype="bfloat16")
    made = CliRunner().invoke(cli, ["export", str(folder), *COMMON, "--low-memory", "--out", str(tmp_path / "art")])
    assert made.exit_code == 0, made.output
    data = tmp_path / "art" / "model.onnx_data"
    if damage == "truncated":
        os.truncate(data, data.stat().st_size // 2)
    else:
        data.unlink()
    text = tmp_path / "heldout.txt"
    text.write_text(sample_text())
    for flags in ([], ["--low-memory"]):
        result = CliRunner().invoke(cli, ["eval", str(tmp_path / "art"), "--data", str(text), "--seq-len", "32",
                                          *flags])
        assert result.exit_code == 1, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
        assert "damaged" in result.output and "--overwrite" in result.output.split("hint:")[1], result.output
