"""Measured damage: block-alone probes from cached inputs equal full forwards of the compressed model."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import factorise, sample_text, save_tiny_model, tiny_model, tiny_tokenizer

import cwca_export
from cwca_export.blocks import find_blocks, model_fingerprint, weight_out_in
from cwca_export.cli import cli
from cwca_export.data import calibration_data
from cwca_export.planning.damage import (
    calibration_loss,
    final_norm,
    measure_damage,
    plan_loss,
    probe_rank,
)
from cwca_export.planning.plan import Plan, damage_curves
from cwca_export.scores import LayerScores
from cwca_export.scoring import score


@pytest.fixture(scope="module")
def ids():
    return calibration_data([sample_text()], tiny_tokenizer(), num_samples=6, seq_len=24).input_ids


def reference_loss(model, ids) -> float:
    """Independent of the module under test: one HF forward, F.cross_entropy over every token."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def make_plan(model, x, program="prune", **parameters) -> Plan:
    blocks = find_blocks(model)
    k = len(blocks)
    return Plan(program, x=list(x), q=[1 / k] * k, n_params=[b.n_params for b in blocks], lo=[0] * k,
                hi=[1e9] * k, block_names=[b.name for b in blocks], parameters=parameters)


def compressed_reference(model, ids, x, method, **options) -> float:
    work = copy.deepcopy(model)
    program = cwca_export.compression.get_method(method).program
    cwca_export.compress(work, make_plan(model, x, program), method=method, data=ids, batch_size=4, **options)
    return reference_loss(work, ids)


@pytest.mark.parametrize(
    ("family", "method"),
    [("llama", "magnitude"), ("llama", "wanda"), ("llama", "sparsegpt"), ("llama", "width"),
     ("gpt2", "magnitude")],
)
def test_probe_loss_equals_a_full_forward_with_that_block_compressed(family, method, ids):
    model = tiny_model(family, num_hidden_layers=3)
    before = model_fingerprint(model)
    curves = measure_damage(model, ids, method=method, points=(0.0, 0.5, 0.9), batch_size=4)
    assert model_fingerprint(model) == before  # probes compress copies only
    assert curves.base_loss == pytest.approx(reference_loss(model, ids), abs=1e-5)
    for k in range(3):
        assert abs(curves.loss_increase[k][0]) < 1e-5  # point 0 changes nothing
        for i, rho in enumerate(curves.points[1:], start=1):
            x = [0.0, 0.0, 0.0]
            x[k] = rho
            ref = compressed_reference(model, ids, x, method)
            assert curves.base_loss + curves.loss_increase[k][i] == pytest.approx(ref, abs=1e-5), (k, rho)


@pytest.mark.parametrize("method", ["lowrank", "asvd"])
def test_low_rank_probes_equal_compress_where_every_linear_gets_the_same_rank(method, ids):
    # 4 KV heads: every Linear has min(m, n) = 32, so a probe's rank is compress's rank_step * units
    model = tiny_model("llama", num_hidden_layers=3, num_key_value_heads=4)
    curves = measure_damage(model, ids, method=method, points=(0.625, 0.75), batch_size=4)
    for k in range(3):
        for i, units in enumerate((3, 2)):  # ranks 12 and 8 with rank_step 4; 8 units = rank 32 stays dense
            assert probe_rank(32, 32, curves.points[i]) == 4 * units
            x = [8.0, 8.0, 8.0]
            x[k] = float(units)
            ref = compressed_reference(model, ids, x, method, rank_step=4)
            assert curves.base_loss + curves.loss_increase[k][i] == pytest.approx(ref, abs=1e-5), (k, units)


def test_lowrank_probe_factorises_each_linear_at_its_own_rank(ids):
    model = tiny_model("llama", num_hidden_layers=2)  # GQA: k/v are (16, 32), the rest min 32
    curves = measure_damage(model, ids, method="lowrank", points=(0.0, 0.5, 0.9), batch_size=4)
    for block in find_blocks(model):
        for i, p in enumerate(curves.points):
            work = copy.deepcopy(model)
            for path, linear in block.linears.items():
                factorise(work, path, probe_rank(*weight_out_in(linear).shape, p))
            expected = reference_loss(work, ids) - curves.base_loss
            assert curves.loss_increase[block.index][i] == pytest.approx(expected, abs=1e-5)
    assert all(abs(row[0]) < 1e-5 for row in curves.loss_increase)  # full rank changes nothing


def test_damage_grows_with_the_ratio_on_the_trained_demo_model():
    # Random tiny models sit near the uniform-prediction loss, where pruning can even help;
    # the shipped demo model is trained, so its damage curves rise.
    from cwca_export.demo import ASSETS, DEMO_MODEL
    from cwca_export.loading import load_model

    model, tok = load_model(DEMO_MODEL, dtype="float32")
    text = (ASSETS / "text" / "train.txt").read_text(encoding="utf-8")
    calib = calibration_data([text], tok, num_samples=4, seq_len=64)
    curves = measure_damage(model, calib, method="magnitude", points=(0.1, 0.9), blocks=[0, 6, 11], batch_size=4)
    assert curves.block_names == ["model.layers.0", "model.layers.6", "model.layers.11"]
    for low, high in curves.loss_increase:
        assert high > low and high > 0


def test_probe_count_forward_fraction_and_block_subsets(ids):
    model = tiny_model("llama", num_hidden_layers=4)
    full = measure_damage(model, ids, method="magnitude", points=(0.4, 0.8), batch_size=6)
    assert full.probes == 4 * 2 and full.num_blocks == 4
    assert full.forward_fraction == pytest.approx(sum((4 - k) / 4 for k in range(4)) / 4)
    assert full.n_params == [b.n_params for b in find_blocks(model)] and full.points == [0.4, 0.8]
    part = measure_damage(model, ids, method="magnitude", points=(0.8, 0.4), batch_size=6, blocks=[3, 1])
    assert part.block_indices == [1, 3] and part.block_names == ["model.layers.1", "model.layers.3"]
    assert part.probes == 4 and part.forward_fraction == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert part.points == [0.4, 0.8]
    for row, k in zip(part.loss_increase, (1, 3), strict=True):
        assert row == pytest.approx(full.loss_increase[k], abs=1e-9)
    assert full.wall_time_s > 0


def test_estimator_records_every_point_and_round_trips_through_scores_json(ids, tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)
    result = score(model, [sample_text()], tokenizer=tiny_tokenizer(), method="damage", num_samples=6,
                   seq_len=24, batch_size=3, progress=False,
                   options={"pruner": "magnitude", "points": "0.2,0.6", "at": 0.6})
    assert {"damage@0.2", "damage@0.6", "damage_base_loss"} <= set(result.stats)
    settings = result.settings
    assert settings["probes"] == 3 * 2 and settings["points"] == [0.2, 0.6] and settings["pruner"] == "magnitude"
    assert settings["forward_fraction"] == pytest.approx((1 + 2 / 3 + 1 / 3) / 3) and settings["probe_time_s"] > 0
    assert result.zeta2 == [max(v, 0.0) for v in result.stats["damage@0.6"]]

    direct = measure_damage(model, ids, method="magnitude", points=(0.2, 0.6), batch_size=3)
    loaded = LayerScores.load(result.save(tmp_path / "damage.json"))
    points, damage = damage_curves(loaded)
    assert points.tolist() == [0.2, 0.6] and loaded.settings["probes"] == 6
    assert loaded.block_names == direct.block_names and loaded.n_params == direct.n_params
    assert loaded.stats["damage_base_loss"][0] == pytest.approx(direct.base_loss, abs=1e-9)
    for a, b in zip(damage.tolist(), direct.loss_increase, strict=True):
        assert a == pytest.approx(b, abs=1e-9)
    with pytest.raises(ValueError, match="no measured damage curves"):
        damage_curves(LayerScores("gradnorm", zeta2=[1.0, 2.0, 3.0], n_params=[1, 1, 1]))


def test_estimator_refuses_bad_options():
    model = tiny_model("llama")
    kwargs = {"tokenizer": tiny_tokenizer(), "method": "damage", "num_samples": 2, "seq_len": 16, "progress": False}
    with pytest.raises(ValueError, match="must be one of the probe points"):
        score(model, [sample_text()], options={"points": "0.3,0.6", "at": 0.5}, **kwargs)
    with pytest.raises(ValueError, match="unknown compression method 'wandaa'"):
        score(model, [sample_text()], options={"pruner": "wandaa"}, **kwargs)
    with pytest.raises(ValueError, match="must lie in"):
        score(model, [sample_text()], options={"points": "0.5,1.5", "at": 0.5}, **kwargs)


def test_plan_loss_equals_an_independent_compress_and_forward(ids):
    model = tiny_model("llama", num_hidden_layers=3)
    before = model_fingerprint(model)
    plan = make_plan(model, [0.3, 0.6, 0.5])
    got = plan_loss(model, plan, ids, method="wanda", batch_size=4)
    assert got == pytest.approx(compressed_reference(model, ids, plan.x, "wanda"), abs=1e-5)
    assert model_fingerprint(model) == before


def test_calibration_loss_is_the_token_mean_cross_entropy(ids):
    model = tiny_model("gpt2")
    with torch.no_grad():
        hf = float(model(input_ids=ids, labels=ids).loss)  # one batch: HF's mean over B(L-1) tokens
    assert calibration_loss(model, ids, batch_size=6) == pytest.approx(hf, abs=1e-6)
    assert calibration_loss(model, ids, batch_size=4) == pytest.approx(hf, abs=1e-6)


def test_final_norm_is_found_generically_or_refused_clearly():
    llama, gpt2 = tiny_model("llama"), tiny_model("gpt2")
    assert final_norm(llama) is llama.model.norm and final_norm(gpt2) is gpt2.transformer.ln_f
    del llama.model.norm
    with pytest.raises(ValueError, match="found no final norm on model"):
        measure_damage(llama, torch.zeros(2, 8, dtype=torch.long), method="magnitude")


def test_cli_scores_damage_with_options(tmp_path):
    folder = save_tiny_model("llama", tmp_path / "llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text(), encoding="utf-8")
    out = tmp_path / "damage.json"
    result = CliRunner().invoke(cli, [
        "score", str(folder), "--data", str(calib), "--estimator", "damage", "--option", "pruner=magnitude",
        "--option", "points=0.5,0.9", "--option", "at=0.9", "--samples", "4", "--seq-len", "24",
        "--batch-size", "2", "--out", str(out), "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    loaded = LayerScores.load(out)
    assert damage_curves(loaded)[0].tolist() == [0.5, 0.9]
    assert loaded.settings["pruner"] == "magnitude" and loaded.settings["probes"] == 4
    bad = CliRunner().invoke(cli, ["score", str(folder), "--data", str(calib), "--seq-len", "16", "--option", "x"])
    assert bad.exit_code != 0 and "KEY=VALUE" in bad.output


def test_two_processes_under_torchrun_match_one_process(tmp_path):
    folder = save_tiny_model("llama", tmp_path / "llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text(), encoding="utf-8")
    common = [str(folder), "--data", str(calib), "--samples", "6", "--seq-len", "24", "--estimator", "damage",
              "--option", "points=0.5,0.9", "--batch-size", "2", "--no-wall-time", "--no-progress", "--device", "cpu"]
    one = CliRunner().invoke(cli, ["score", *common, "--out", str(tmp_path / "one.json")])
    assert one.exit_code == 0, one.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "cwca_export", "score", *common, "--out", str(tmp_path / "two.json")],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = LayerScores.load(tmp_path / "one.json"), LayerScores.load(tmp_path / "two.json")
    assert (a.settings["processes"], b.settings["processes"]) == (1, 2)
    assert b.settings["probes"] == a.settings["probes"] == 4
    # float32 noise of other batch splits is ~1e-7; unsummed wanda statistics would differ by ~1e-4
    for name in ("damage@0.5", "damage@0.9", "damage_base_loss"):
        assert b.stats[name] == pytest.approx(a.stats[name], rel=0, abs=2e-6), name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_capped_input_cache_gives_the_same_curves_in_several_passes(method, ids, monkeypatch):
    import cwca_export.planning.damage as damage_module
    from cwca_export.planning.damage import block_input_bytes

    model = tiny_model("llama", num_hidden_layers=4)
    full = measure_damage(model, ids, method=method, points=(0.3, 0.7), batch_size=4)
    per_block = block_input_bytes(model, ids)
    assert per_block == ids.numel() * model.config.hidden_size * 4
    capture, passes, held = damage_module._capture, [], []

    def counting_capture(*args, **kwargs):
        out = capture(*args, **kwargs)
        passes.append(1)
        held.append(sum(h.numel() * h.element_size() for hs in out[0].hidden.values() for h in hs))
        return out

    monkeypatch.setattr(damage_module, "_capture", counting_capture)
    for cap, runs in ((per_block, 4), (2 * per_block + 5, 2), (1, 4)):
        passes.clear(), held.clear()
        capped = measure_damage(model, ids, method=method, points=(0.3, 0.7), batch_size=4, max_cache=cap)
        assert len(passes) == runs
        assert max(held) <= max(cap, per_block)  # never more than the cap (or one block's inputs)
        assert capped.base_loss == pytest.approx(full.base_loss, abs=1e-9)
        for got, want in zip(capped.loss_increase, full.loss_increase, strict=True):
            assert got == pytest.approx(want, abs=1e-6)
    passes.clear()
    part = measure_damage(model, ids, method=method, points=(0.3, 0.7), batch_size=4, blocks=[3, 1],
                          max_cache=per_block)
    assert len(passes) == 2
    for row, k in zip(part.loss_increase, (1, 3), strict=True):
        assert row == pytest.approx(full.loss_increase[k], abs=1e-6)


def test_score_cli_max_cache_gives_the_same_scores(tmp_path):
    model_dir = save_tiny_model("llama", tmp_path / "m", num_hidden_layers=3)
    text = tmp_path / "calib.txt"
    text.write_text(sample_text() * 4)
    runner = CliRunner()
    common = ["score", str(model_dir), "--data", str(text), "--samples", "4", "--seq-len", "16",
              "--estimator", "damage",
              "--option", "pruner=magnitude", "--batch-size", "2", "--no-progress", "--no-wall-time"]
    res = runner.invoke(cli, [*common, "--out", str(tmp_path / "a.json")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, [*common, "--max-cache", "1KiB", "--out", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    a, b = LayerScores.load(tmp_path / "a.json"), LayerScores.load(tmp_path / "b.json")
    assert b.settings["options"]["max_cache"] == "1KiB"
    assert b.zeta2 == pytest.approx(a.zeta2, abs=1e-6)
    for key in a.stats:
        if key.startswith("damage"):
            assert b.stats[key] == pytest.approx(a.stats[key], abs=1e-6)
    res = runner.invoke(cli, [*common, "--max-cache", "much", "--out", str(tmp_path / "c.json")])
    assert res.exit_code == 2 and "--max-cache" in res.output and not (tmp_path / "c.json").exists()
    res = runner.invoke(cli, ["score", str(model_dir), "--data", str(text), "--samples", "4", "--seq-len", "16",
                              "--estimator", "fisher", "--max-cache", "1GiB", "--out", str(tmp_path / "d.json")])
    assert res.exit_code == 2 and "--max-cache" in res.output and not (tmp_path / "d.json").exists()


def test_one_probe_point_may_be_a_bare_number():
    # `--option points=0.5` parses as JSON to a float, not a list
    from cwca_export.planning.damage import parse_points

    assert parse_points(0.5) == [0.5] and parse_points("0.7,0.3") == [0.3, 0.7]
