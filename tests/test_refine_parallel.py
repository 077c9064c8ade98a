"""Refinement split across processes (gloo on CPU) against the same refinement in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import sample_text, save_tiny_model, tiny_model

from cwca_export.data_parallel import Processes

PLANS = [[0.5, 0.2, 0.7], [0.3, 0.2, 0.0], [0.6, 0.6, 0.6]]
UNITS = [[2, 1, 3], [4, 4, 4]]


def test_share_deals_whole_batches_in_turn():
    ids = torch.arange(11).reshape(11, 1)  # batches of 3: [0 1 2] [3 4 5] [6 7 8] [9 10]
    first, second = Processes(0, 2).share(ids, 3), Processes(1, 2).share(ids, 3)
    assert first.flatten().tolist() == [0, 1, 2, 6, 7, 8]
    assert second.flatten().tolist() == [3, 4, 5, 9, 10]
    # split again, each share gives back the very batches of one process (the short one last)
    assert [b.flatten().tolist() for b in second.split(3)] == [[3, 4, 5], [9, 10]]
    assert torch.equal(Processes().share(ids, 3), ids)
    with pytest.raises(ValueError, match=r"--batch-size 8: 11 calibration sequences make 2 batches for 3 processes"
                                         r"; pass --batch-size 3"):
        Processes(0, 3).share(ids, 8)


def _ids(model):
    return torch.randint(0, model.config.vocab_size, (10, 16), generator=torch.Generator().manual_seed(3))


def _losses(processes: Processes) -> dict[str, list[float]]:
    """Dense and plan losses of every PlanLoss kind, measured on this process's share."""
    from cwca_export.planning.plan_probe import PlanLoss, RankPlanLoss

    model = tiny_model("llama", num_hidden_layers=3).eval()
    ids = _ids(model)
    share = processes.share(ids, 3)
    reduce = processes.reduce_sum if processes.world > 1 else None
    out = {}
    for method in ("wanda", "sparsegpt"):  # statistics summed across processes before pruning
        measure = PlanLoss(model, share, method=method, batch_size=3, reduce=reduce)
        out[method] = [measure.dense_loss, *(measure(rho) for rho in PLANS)]
        measure.close()
    measure = RankPlanLoss(model, share, method="asvd", rank_step=2, batch_size=3, reduce=reduce)
    out["asvd"] = [measure.dense_loss, *(measure(units) for units in UNITS)]
    measure.close()
    return out


def _worker(rank: int, world: int, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        losses = _losses(Processes(rank, world))
        with open(os.path.join(folder, f"rank{rank}.json"), "w", encoding="utf-8") as f:
            json.dump(losses, f)
        dist.barrier()  # both done before either tears down (gloo aborts a peer still reading)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two interpreters; the torchrun CLI test below covers the same equality by default
def test_plan_losses_in_two_gloo_processes_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    one = _losses(Processes())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every process measured the same (reduced) losses
    for name, values in one.items():
        # float32 noise of another summation order is ~1e-7; a share's loss alone differs by ~1e-2
        assert ranks[0][name] == pytest.approx(values, rel=2e-6), name
    # the shares alone do not give the losses: the reduction is what makes them equal
    model = tiny_model("llama", num_hidden_layers=3).eval()
    from cwca_export.planning.damage import calibration_loss

    alone = calibration_loss(model, Processes(0, 2).share(_ids(model), 3), batch_size=3)
    assert abs(alone - one["wanda"][0]) > 1e-4


def test_refine_cli_under_torchrun_writes_the_plan_of_one_process(tmp_path):
    from click.testing import CliRunner

    from cwca_export.cli import cli
    from cwca_export.planning.plan import Plan

    folder = save_tiny_model("llama", tmp_path / "m", num_hidden_layers=3)
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text() * 4, encoding="utf-8")
    data = ["--data", str(calib), "--samples", "6", "--seq-len", "16"]
    scored = CliRunner().invoke(cli, ["score", str(folder), *data, "--estimator", "damage", "--option",
                                      "pruner=magnitude", "--out", str(tmp_path / "damage.json"), "--no-progress"])
    assert scored.exit_code == 0, scored.output
    common = [str(folder), "--scores", str(tmp_path / "damage.json"), "--sparsity", "0.5", "--method", "wanda",
              *data, "--batch-size", "2", "--max-evals", "12"]
    one = CliRunner().invoke(cli, ["refine", *common, "--out", str(tmp_path / "one" / "plan.json")])
    assert one.exit_code == 0, one.output
    (tmp_path / "two").mkdir()
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "cwca_export", "refine", *common, "--out", str(tmp_path / "two" / "plan.json")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=180,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("wrote ") == 1  # the main process alone reports and writes
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["plan.json"]
    a, b = Plan.load(tmp_path / "one" / "plan.json"), Plan.load(tmp_path / "two" / "plan.json")
    ra, rb = a.parameters["refinement"], b.parameters["refinement"]
    assert (ra["processes"], rb["processes"]) == (1, 2)
    assert ra["forwards"] == rb["forwards"] and ra["start"] == rb["start"] and ra["moves"] == rb["moves"]
    assert b.x == pytest.approx(a.x, abs=1e-12)
    for key in ("dense_loss", "calib_loss_start", "calib_loss"):
        assert rb[key] == pytest.approx(ra[key], rel=2e-6), key
    assert rb["candidates"] == pytest.approx(ra["candidates"], rel=2e-6)


def test_refine_cli_refuses_too_few_batches_before_joining_the_processes(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cwca_export.cli import cli

    folder = save_tiny_model("llama", tmp_path / "m", num_hidden_layers=2)
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text() * 4, encoding="utf-8")
    scores = tmp_path / "s.json"
    res = CliRunner().invoke(cli, ["score", str(folder), "--data", str(calib), "--samples", "4", "--seq-len", "16",
                                   "--estimator", "uniform", "--out", str(scores), "--no-progress"])
    assert res.exit_code == 0, res.output
    # as torchrun --nproc_per_node 2 would launch it: the refusal comes before the group forms
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = CliRunner().invoke(cli, ["refine", str(folder), "--scores", str(scores), "--sparsity", "0.5",
                                   "--data", str(calib), "--samples", "4", "--seq-len", "16",
                                   "--out", str(tmp_path / "p.json")])
    assert res.exit_code == 1 and not (tmp_path / "p.json").exists()
    assert res.output.strip() == (
        "Error: --batch-size 8: 4 calibration sequences make 1 batch for 2 processes; pass --batch-size 2"
        " (or more --samples)")
