"""Plan rules beside the MDL program: the OWL / LayerIF band map and measured-damage curves."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from cwca_export.cli import cli
from cwca_export.planning.plan import Plan, damage_curves, plan_band, plan_from_damage
from cwca_export.scores import LayerScores


def _owl_reference(outlier_ratio, sparsity, lamda):
    """OWL's published rule (equal-sized layers): min-max to [0, 2 lambda], re-centred on 1 - S."""
    d = np.asarray(outlier_ratio, dtype=np.float64)
    density = (d - d.min()) / (d.max() - d.min()) * lamda * 2
    density = density - density.mean() + (1 - sparsity)
    return 1 - density


def test_band_matches_owl_rule_on_equal_blocks():
    rng = np.random.default_rng(0)
    ratio = rng.uniform(0.5, 6.0, size=12)
    scores = LayerScores("owl", zeta2=ratio, n_params=[1000] * 12)
    plan = plan_band(scores, 0.7, width=0.08)
    assert plan.x == pytest.approx(_owl_reference(ratio, 0.7, 0.08).tolist(), abs=1e-9)
    assert plan.global_sparsity == pytest.approx(0.7)


def test_band_keeps_the_target_when_clipping_and_orders_by_score():
    scores = LayerScores("layerif", zeta2=[5.0, 1.0, 0.2, 3.0], n_params=[100, 300, 200, 100])
    plan = plan_band(scores, 0.8, width=0.3, hi=0.95)
    x = np.array(plan.x)
    assert plan.global_sparsity == pytest.approx(0.8, abs=1e-9)
    assert x.max() <= 0.95 + 1e-12
    assert np.all(np.diff(x[np.argsort(scores.zeta2)]) <= 1e-12)  # higher score, lower ratio
    with pytest.raises(ValueError, match="width"):
        plan_band(scores, 0.5, width=-1)


def _damage_scores():
    points = [0.3, 0.5, 0.7, 0.9]
    a = np.array([0.05, 1.0, 0.3])
    stats = {f"damage@{p:g}": (a * p**4).tolist() for p in points}
    return LayerScores("damage", zeta2=a * 0.5**4, n_params=[100, 100, 100], stats=stats)


def test_plan_from_damage_reads_curves_and_reaches_the_target():
    scores = _damage_scores()
    points, damage = damage_curves(scores)
    assert points.tolist() == [0.3, 0.5, 0.7, 0.9] and damage.shape == (3, 4)
    plan = plan_from_damage(scores, 0.5)
    assert plan.global_sparsity == pytest.approx(0.5)
    assert plan.x[0] > plan.x[2] > plan.x[1]  # the cheapest block pruned most
    with pytest.raises(ValueError, match="--estimator damage"):
        damage_curves(LayerScores("fisher", zeta2=[1.0], n_params=[3]))


def test_cli_rules(tmp_path):
    runner = CliRunner()
    damage = tmp_path / "damage.json"
    _damage_scores().save(damage)
    out = tmp_path / "plan.json"
    res = runner.invoke(cli, ["plan", str(damage), "--sparsity", "0.5", "--band", "0.2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "rule damage" in res.output
    rho = Plan.load(out).x
    assert min(rho) >= 0.3 - 1e-9 and max(rho) <= 0.7 + 1e-9

    res = runner.invoke(cli, ["plan", str(damage), "--sparsity", "0.5", "--rule", "band", "--out", str(out)])
    assert res.exit_code != 0 and "--band" in res.output

    fisher = tmp_path / "fisher.json"
    LayerScores("fisher", zeta2=[1.0, 2.0], n_params=[3, 3]).save(fisher)
    res = runner.invoke(cli, ["plan", str(fisher), "--sparsity", "0.5", "--rule", "damage", "--out", str(out)])
    assert res.exit_code == 1 and "hint: cwca-export score" in res.output
    res = runner.invoke(cli, ["plan", str(fisher), "--sparsity", "0.5", "--out", str(out)])
    assert res.exit_code == 0 and "rule cwca" in res.output
