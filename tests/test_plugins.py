"""Entry-point plug-ins: an estimator, a compression method and a backend from an installed package.

A temporary distribution (a package plus a ``*.dist-info`` folder with ``entry_points.txt``) is
put on the path of a fresh interpreter, the way pip leaves an installed package: nothing of it is
imported by hand. The plug-ins must appear in the registries on first lookup and run through the
public API; their results are checked against the same quantities computed by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cwca_export import registry

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
"""A third-party package adding one estimator, one compression method and one backend."""

import torch

from cwca_export.blocks import weight_out_in
from cwca_export.compression.registry import register_method
from cwca_export.scoring.registry import Estimate, register_estimator


@register_estimator("weight_energy", summary="sum of squared weights of the block's Linears", per_sequence=False)
def weight_energy(run):
    return Estimate(zeta2=[sum(float(weight_out_in(m).double().pow(2).sum()) for m in b.linears.values())
                           for b in run.blocks])


@register_method("row_drop", program="prune", summary="zero each Linear's smallest-norm output rows")
def row_drop(job):
    dropped = 0
    for linear in job.block.linears.values():
        w = weight_out_in(linear)
        n = int(round(job.target * w.shape[0]))
        rows = torch.argsort(w.norm(dim=1))[:n]
        with torch.no_grad():
            w[rows] = 0.0
        dropped += n
    return {"index": job.block.index, "rows_dropped": dropped}


class CopyBackend:
    def export(self, model, tokenizer, out_dir, **options):
        raise NotImplementedError("listed only")
'''

ENTRY_POINTS = """
[cwca_export.estimators]
weight_energy = cwca_demo_plugin

[cwca_export.methods]
row_drop = cwca_demo_plugin

[cwca_export.backends]
copy-demo = cwca_demo_plugin:CopyBackend
"""


def _distribution(root: Path, entry_points: str, source: str = PLUGIN) -> Path:
    (root / "cwca_demo_plugin.py").write_text(textwrap.dedent(source), encoding="utf-8")
    info = root / "cwca_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cwca-demo-plugin\nVersion: 0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(entry_points, encoding="utf-8")
    return root


CHECK = '''
import json, sys
import torch
from helpers import sample_text, tiny_model, tiny_tokenizer
from compress_plans import make_plan
import cwca_export
from cwca_export.backends import available_backends, get_backend
from cwca_export.compression.registry import METHODS
from cwca_export.scoring.registry import ESTIMATORS

out = {"estimators": ESTIMATORS.names(), "methods": METHODS.names(), "backends": available_backends()}
model = tiny_model("llama")
# by hand: every nn.Linear inside decoder layer k
expected = [sum(float(m.weight.double().pow(2).sum()) for m in layer.modules() if isinstance(m, torch.nn.Linear))
            for layer in model.model.layers]
scores = cwca_export.score(model, [sample_text()], tokenizer=tiny_tokenizer(), method="weight_energy",
                           num_samples=2, seq_len=16, progress=False)
out["scores"], out["expected_scores"] = list(scores.zeta2), expected

dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
plan = make_plan(model, "prune", [0.25, 0.5])
cwca_export.compress(model, plan, method="row_drop")
zero_rows = {}
for name, w in dense.items():
    if not name.startswith("model.layers."):
        continue
    now = dict(model.named_modules())[name].weight
    rho = [0.25, 0.5][int(name.split(".")[2])]
    smallest = set(torch.argsort(w.norm(dim=1))[: int(round(rho * w.shape[0]))].tolist())
    zeroed = set(torch.nonzero(now.abs().sum(dim=1) == 0).flatten().tolist())
    kept_equal = all(torch.equal(now[i], w[i]) for i in range(w.shape[0]) if i not in smallest)
    zero_rows[name] = [zeroed == smallest, kept_equal]
out["rows"] = zero_rows
out["backend"] = type(get_backend("copy-demo")).__name__
print(json.dumps(out))
'''


def _run(plugin_root: Path, code: str) -> subprocess.CompletedProcess:
    paths = [str(plugin_root), str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


def test_plugins_from_an_installed_package_register_and_run(tmp_path):
    result = _run(_distribution(tmp_path, ENTRY_POINTS), CHECK)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert "weight_energy" in out["estimators"] and "fisher" in out["estimators"]
    assert "row_drop" in out["methods"] and "wanda" in out["methods"]
    assert {"copy-demo", "onnx", "optimum"} <= set(out["backends"])
    assert out["scores"] == pytest.approx(out["expected_scores"], rel=1e-6)
    assert out["rows"] and all(same and kept for same, kept in out["rows"].values()), out["rows"]
    assert out["backend"] == "CopyBackend"


def test_a_broken_plugin_is_one_line_naming_it_and_its_group(tmp_path):
    broken = "import not_installed_dependency_xyz\n"
    root = _distribution(tmp_path, "[cwca_export.methods]\nbroken_demo = cwca_demo_plugin\n", source=broken)
    code = ("import warnings\nfrom cwca_export.compression.registry import get_method\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    print(get_method('wanda').name)\n"
            "print(*[str(w.message) for w in caught], sep='\\n')\n"
            "try:\n    get_method('broken_demo')\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n")
    result = _run(root, code)
    assert result.returncode == 0, result.stderr[-3000:]
    wanda, warning, error = result.stdout.strip().splitlines()
    assert wanda == "wanda"  # the built-ins keep working beside a broken plug-in
    start = "plug-in 'broken_demo' (cwca_demo_plugin, entry-point group cwca_export.methods) failed to load"
    assert warning.startswith(start) and "not_installed_dependency_xyz" in warning
    assert error == "PluginError " + warning


def test_a_plugin_module_that_registers_nothing_is_refused(tmp_path, monkeypatch):
    root = _distribution(tmp_path, "[cwca_test.colours]\nred = cwca_demo_plugin\n", source="")
    monkeypatch.syspath_prepend(str(root))
    colours = registry.Registry("colour", flag="--colour", group="cwca_test.colours")
    with pytest.warns(RuntimeWarning, match="registered no colour named 'red'"):
        assert colours.names() == []
    with pytest.raises(registry.PluginError, match="registered no colour named 'red'"):
        colours.get("red")
