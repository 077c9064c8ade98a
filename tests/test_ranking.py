"""A budget search passes over a plain export's storage only for a candidate proven better on
held-out windows of the calibration text, or on the calibration sequences where it has none
(docs/design.md 3.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import cwca_export
from cwca_export.exporter.ranking import build_order, compare
from cwca_export.planning.damage import calibration_loss, sequence_losses


def test_compare_is_scipys_paired_t_statistic():
    rng = np.random.default_rng(0)
    peer = rng.normal(3.0, 0.4, 32)
    candidate = peer + rng.normal(-0.01, 0.02, 32)
    c = compare(candidate, peer)
    t = stats.ttest_rel(candidate, peer).statistic
    assert c.sigmas == pytest.approx(-t, rel=1e-12)
    assert c.difference == pytest.approx(np.mean(candidate - peer), rel=1e-12)
    assert c.sequences == 32
    # proven at 2 sigmas exactly when scipy's one-sided test with the normal quantile agrees
    assert c.proven(2.0) == (-t > 2.0)
    assert c.proven(0.0)


def test_compare_refuses_unpaired_losses_and_one_sequence_proves_nothing():
    with pytest.raises(ValueError, match="paired"):
        compare([1.0, 2.0], [1.0])
    one = compare([1.0], [2.0])
    assert math.isinf(one.standard_error) and not one.proven(1.0) and one.proven(0.0)


class Opt:
    def __init__(self, name, losses, peer=False):
        self.name, self.losses, self.peer = name, np.asarray(losses, dtype=float), peer

    def __repr__(self):
        return self.name


def _order(options, sigmas):
    options = sorted(options, key=lambda o: o.losses.mean())
    order, held = build_order(options, losses=lambda o: o.losses, is_peer=lambda o: o.peer, sigmas=sigmas)
    names = {id(o): o.name for o in options}
    return [o.name for o in order], {names[k]: [(p.name, c) for p, c in peers.values()] for k, peers in held.items()}


BASE = np.linspace(2.0, 4.0, 16)
NOISE = np.tile([1.0, -1.0], 8) * 0.01


def test_a_peer_goes_ahead_of_a_candidate_better_only_by_noise():
    noisy = Opt("planned", BASE - 0.001 + NOISE)  # 0.001 nats better, spread 0.01: about 0.4 sigma
    peer = Opt("blocks int8", BASE, peer=True)
    worse = Opt("int4", BASE + 0.05)
    order, held = _order([noisy, peer, worse], 2.0)
    assert order == ["blocks int8", "planned", "int4"]
    ((peer_name, c),) = held["planned"]
    assert peer_name == "blocks int8" and 0 < c.sigmas < 2.0


def test_a_candidate_proven_better_goes_first_and_zero_sigmas_is_loss_order():
    proven = Opt("planned", BASE - 0.01 + NOISE * 0.1)
    noisy = Opt("planned 2", BASE - 0.02 + NOISE * 10)
    peer = Opt("blocks int8", BASE, peer=True)
    order, _ = _order([proven, noisy, peer], 2.0)
    assert order == ["planned", "blocks int8", "planned 2"]  # 'planned 2' has the lower mean, not proven
    assert _order([proven, noisy, peer], 0.0)[0] == ["planned 2", "planned", "blocks int8"]


def test_when_the_peer_misses_the_held_candidates_face_the_next_peer():
    a = Opt("planned", BASE - 0.003 + NOISE)
    p1 = Opt("blocks int8", BASE, peer=True)
    b = Opt("planned b", BASE + 0.01 + NOISE * 0.01)
    p2 = Opt("all int4", BASE + 0.02, peer=True)
    order, held = _order([a, p1, b, p2], 2.0)
    # after p1: 'planned' vs p2 is 0.023 nats better at spread 0.01: proven, then 'planned b' too
    assert order == ["blocks int8", "planned", "planned b", "all int4"]
    assert [p for p, _ in held["planned"]] == ["blocks int8"]


def test_sequence_losses_are_transformers_own_loss_per_sequence():
    from helpers import tiny_model

    model = tiny_model("llama").eval()
    ids = torch.randint(0, model.config.vocab_size, (5, 12), generator=torch.Generator().manual_seed(1))
    losses = sequence_losses(model, ids, batch_size=2)
    with torch.no_grad():
        reference = [float(model(input_ids=row[None], labels=row[None]).loss) for row in ids]
    np.testing.assert_allclose(losses.numpy(), reference, rtol=1e-5)
    assert float(losses.mean()) == pytest.approx(calibration_loss(model, ids), rel=1e-6)


WORKLOAD = dict(prompt_len=8, context=24)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One tiny model searched at half its fp32 bytes with the margin off, and with a huge one
    tested on held-out windows."""
    from helpers import tiny_model

    from cwca_export.data import calibration_data

    model = tiny_model("llama", hidden_size=64, intermediate_size=256, num_hidden_layers=3)
    stream = torch.randint(0, model.config.vocab_size, (16 * 32,), generator=torch.Generator().manual_seed(0))
    calib = calibration_data([stream.tolist()], num_samples=8, seq_len=32, seed=0, held_out=8)
    dense = 4 * sum(p.numel() for p in model.parameters())
    out = {}
    for sigmas in (0.0, 1e9):
        art = cwca_export.export(model, None, tmp_path_factory.mktemp("s") / "a", backend="onnx",
                                 calibration=calib.input_ids if sigmas == 0 else calib,
                                 budget=cwca_export.Budget(max_disk=int(0.5 * dense), **WORKLOAD),
                                 runs=2, warmup=1, search_options={"significance": sigmas})
        out[sigmas] = art.manifest["budget"]["search"]
    return out


def test_held_out_windows_leave_the_calibration_windows_as_they_are():
    from helpers import sample_text, tiny_tokenizer

    from cwca_export.data import calibration_data

    tok, text = tiny_tokenizer(), sample_text() * 4
    plain = calibration_data([text], tok, num_samples=6, seq_len=16, seed=3)
    split = calibration_data([text], tok, num_samples=6, seq_len=16, seed=3, held_out=6)
    assert torch.equal(plain.input_ids, split.input_ids) and split.held_out.shape == (6, 16)
    assert split.calibration_only().data_hash == plain.data_hash and split.calibration_only().held_out is None
    calibration_rows = {tuple(r) for r in plain.input_ids.tolist()}
    assert not calibration_rows & {tuple(r) for r in split.held_out.tolist()}


def _is_peer(candidate):
    return candidate["t"] == 0 and candidate["formats"] and not candidate["storage"].startswith("planned")


def test_without_a_margin_the_lowest_calibration_loss_that_fits_ships(searched):
    search = searched[0.0]
    chosen = search["chosen"]
    priced = [c for c in search["candidates"] if c["calib_loss"] is not None and c["formats"]]
    unbuilt_lower = [c for c in priced if c["calib_loss"] < chosen["calib_loss"] and c["measured"] is None]
    assert not unbuilt_lower and "--significance 0" in search["why"]


def test_with_a_huge_margin_a_plain_storage_ships_and_the_passed_over_are_named(searched):
    search = searched[1e9]
    chosen = search["chosen"]
    assert _is_peer(chosen), chosen["storage"]
    assert search["significance_sigmas"] == 1e9
    assert search["significance_tested_on"].startswith("8 held-out windows of 32 tokens")
    assert searched[0.0]["significance_tested_on"] is None
    passed = [c for c in search["candidates"] if c["calib_loss"] is not None and c["calib_loss"] < chosen["calib_loss"]
              and c["measured"] is None]
    for c in passed:
        assert not _is_peer(c) and c["status"].startswith(f"not built: not proven better than {chosen['storage']}")
    if passed:
        assert "kept over" in search["why"]
    # the same peers were priced the same way in both searches (same calibration, same storage)
    other = {(c["t"], c["storage"]): c["calib_loss"] for c in searched[0.0]["candidates"]}
    assert other[(chosen["t"], chosen["storage"])] == pytest.approx(chosen["calib_loss"], rel=1e-9)


def test_the_cli_refuses_a_margin_where_no_storage_is_searched_or_a_negative_one(tmp_path):
    from click.testing import CliRunner
    from helpers import save_tiny_model

    from cwca_export.cli import cli

    model_dir = save_tiny_model("llama", tmp_path / "m")
    for extra, flag in ((["--quantize", "int8", "--max-disk", "1MB"], "--significance"),
                        (["--max-disk", "1MB", "--significance", "-1"], "--significance"),
                        (["--max-disk", "1MB", "--significance", "nan"], "--significance")):
        args = ["export", str(model_dir), "--backend", "onnx", "--out", str(tmp_path / "a"), *extra]
        if "--significance" not in extra:
            args += ["--significance", "1"]
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2 and flag in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "a").exists()


def test_export_tests_on_held_out_windows_of_its_data_or_says_it_cannot(tmp_path):
    import json

    from click.testing import CliRunner
    from helpers import sample_text, save_tiny_model, tiny_model, tiny_tokenizer

    from cwca_export.cli import cli

    overrides = {"hidden_size": 64, "intermediate_size": 256}
    model_dir = save_tiny_model("llama", tmp_path / "m", **overrides)
    dense = 4 * sum(p.numel() for p in tiny_model("llama", **overrides).parameters())
    (tmp_path / "long.txt").write_text(sample_text() * 4)
    tok = tiny_tokenizer()
    short = next(sample_text()[:n] for n in range(40, 4000, 10)
                 if len(tok(sample_text()[:n])["input_ids"]) >= 4 * 16)  # 4 windows: 3 to price, not 3 more
    (tmp_path / "short.txt").write_text(short)
    common = ["--backend", "onnx", "--max-disk", str(int(0.5 * dense)), "--samples", "3", "--seq-len", "16",
              "--prompt-len", "8", "--context", "24", "--runs", "2", "--warmup", "1"]
    seen = {}
    for name in ("long", "short"):
        r = CliRunner().invoke(cli, ["export", str(model_dir), "--data", str(tmp_path / f"{name}.txt"),
                                     "--out", str(tmp_path / name), *common])
        assert r.exit_code == 0, r.output
        manifest = json.loads((tmp_path / name / "cwca_manifest.json").read_text())
        seen[name] = (r.output, manifest["budget"]["search"]["significance_tested_on"])
    assert seen["long"][1].startswith("3 held-out windows of 16 tokens") and "further windows" not in seen["long"][0]
    assert seen["short"][1].startswith("the calibration sequences")
    assert "holds no 3 further windows of 16 tokens" in seen["short"][0]


def test_below_every_plain_storage_no_held_out_windows_are_read(tmp_path, monkeypatch):
    """A budget only structure reaches (no uniform storage of the model as given is predicted to
    fit): nothing to test against, so the held-out windows cost no forwards, and the manifest says
    so. The int8 prices are of graphs without dead bytes (quantize_dynamic's data file once stayed
    in the calibration graph, inflating every quantized node's overhead about a hundredfold)."""
    from helpers import tiny_model

    import cwca_export.planning.damage as damage
    from cwca_export.blocks import find_blocks, model_fingerprint
    from cwca_export.data import calibration_data
    from cwca_export.planning.rank_plans import plan_ranks_from_damage
    from cwca_export.scores import LayerScores

    model = tiny_model("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=2)
    blocks = find_blocks(model)
    scores = LayerScores("damage", zeta2=[1.0, 3.0], n_params=[b.n_params for b in blocks],
                         block_names=[b.name for b in blocks], settings={"pruner": "lowrank"},
                         model={"fingerprint": model_fingerprint(model)},
                         stats={"damage@0.25": [0.01, 0.2], "damage@0.5": [0.05, 0.6], "damage@0.75": [0.2, 1.5],
                                "damage@1": [0.9, 4.0]})
    plan = plan_ranks_from_damage(scores, 0.9, shapes=model, rank_step=4)
    stream = torch.randint(0, model.config.vocab_size, (16 * 32,), generator=torch.Generator().manual_seed(0))
    calib = calibration_data([stream.tolist()], num_samples=8, seq_len=32, seed=0, held_out=8)
    reads = []
    forward = damage.sequence_losses
    monkeypatch.setattr(damage, "sequence_losses", lambda m, ids, **kw: reads.append(ids) or forward(m, ids, **kw))
    dense = 4 * sum(p.numel() for p in model.parameters())
    art = cwca_export.export(model, plan, tmp_path / "a", backend="onnx", method="lowrank", calibration=calib,
                             formats="int8", levels=3, budget=cwca_export.Budget(max_disk=int(0.2 * dense), **WORKLOAD),
                             runs=2, warmup=1, search_options={"significance": 2})
    search = art.manifest["budget"]["search"]
    assert search["significance_tested_on"].startswith("nothing: no plain export's storage is predicted")
    assert reads and not any(ids is calib.held_out for ids in reads)
    peers = [c for c in search["candidates"] if _is_peer(c)]
    assert peers and all(c["status"] == "predicted over the memory limits" for c in peers)
    chosen = search["chosen"]
    assert chosen["t"] > 0 and chosen["formats"] and art.disk_bytes <= int(0.2 * dense)
    assert chosen["predicted"]["disk_bytes"] == pytest.approx(art.disk_bytes, rel=0.05)



def test_a_model_that_meets_the_budget_as_given_tests_nothing(tmp_path):
    """No candidate competes when the model as given fits: the manifest says nothing was tested
    (it named the held-out windows, which were never read)."""
    from helpers import tiny_model

    from cwca_export.data import calibration_data

    model = tiny_model("llama")
    stream = torch.randint(0, model.config.vocab_size, (16 * 32,), generator=torch.Generator().manual_seed(0))
    calib = calibration_data([stream.tolist()], num_samples=4, seq_len=32, seed=0, held_out=4)
    art = cwca_export.export(model, None, tmp_path / "a", backend="onnx", calibration=calib, runs=2, warmup=1,
                             budget=cwca_export.Budget(max_disk=10**9, **WORKLOAD), search_options={"significance": 2})
    assert art.manifest["budget"]["search"]["significance_tested_on"].startswith("nothing: the model as given met")
