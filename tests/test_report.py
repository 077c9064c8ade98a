"""`cwca-export report`: a per-layer PNG and a self-contained HTML page rebuilt from a folder."""

from __future__ import annotations

import base64
import io
import json
import shlex
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cwca_export.cli import cli
from cwca_export.planning.plan import Plan, plan_allocation, plan_pruning
from cwca_export.report import FIGURE_NAME, HTML_NAME, baseline_plans, build_report
from cwca_export.scores import LayerScores

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path("/usr/bin/chromium")
K = 6


# ---------------------------------------------------------------------------- fixtures


def _scores() -> LayerScores:
    rng = np.random.default_rng(0)
    zeta2 = [0.4, 0.0, 0.02, 0.05, 0.01, 0.08]  # one zero gain: the log panel must cope
    names = [f"model.layers.{i}" for i in range(K)]
    names[2] = 'blk<2>&"odd"'  # must come out escaped
    return LayerScores(
        "fisher",
        zeta2=zeta2,
        n_params=[1000, 1000, 2000, 1000, 1000, 3000],
        block_names=names,
        stats={
            "grad_sq_norm": rng.uniform(0.1, 1.0, K).tolist(),
            "fisher_trace": rng.uniform(1.0, 5.0, K).tolist(),
        },
        samples=16,
        tokens=2048,
        settings={"num_samples": 16, "seq_len": 128, "seed": 0},
        model={"name_or_path": "models/tiny llama", "fingerprint": "sha256:abc"},
    )


def _manifest(disk: int, resident: int, quantize: str | None) -> dict:
    return {
        "_type": "CwcaManifest",
        "schema_version": 1,
        "model": {"name_or_path": "models/tiny llama", "parameters": 123456},
        "backend": {"name": "optimum", "options": {}},
        "postprocess": {"dtype": "fp32", "quantize": {"method": quantize} if quantize else None},
        "disk_bytes": disk,
        "measurement": {
            "resident_bytes": resident,
            "latency_ms": {"prefill": {"p50": 3.25, "p90": 3.75}, "decode": {"p50": 1.5, "p90": 1.75}},
            "workload": {"ep": "cpu", "batch": 1, "prompt_len": 32, "context": 128},
        },
        "verification": {"final": {"parity": {"rel_rms": 0.0153, "tolerance": 0.12, "passed": True}}},
        "budget": {"limits": {"max_memory": 50331648, "max_latency_ms": 50.0}, "met": True},
        "savings": [{"kind": "int8 weights", "disk": True, "memory": True, "latency": True, "why": "<int8>"}],
    }


def _folder(root: Path, *, program: str = "prune", demo: dict | None = None) -> tuple[Path, Plan]:
    root.mkdir(parents=True, exist_ok=True)
    scores = _scores()
    scores.save(root / "scores.json")
    if program == "prune":
        plan = plan_pruning(scores, 0.4, hi=0.8, hi_blocks={0: 0.3})
    else:
        plan = plan_allocation(scores, 24, lo=1)
    plan.save(root / "plan.json")
    for name, disk, resident, q in (("artifact", 5_527_019, 35_880_960, "int8"),
                                    ("dense-artifact", 22_802_256, 65_855_488, None)):
        (root / name).mkdir()
        manifest = _manifest(disk, resident, q)
        manifest["plan"] = plan.to_dict() if q else None
        (root / name / "cwca_manifest.json").write_text(json.dumps(manifest))
    if demo is not None:
        (root / "report.json").write_text(json.dumps(demo))
    return root, plan


_DEMO = {
    "rows": {
        "dense": {"disk_bytes": 22802256, "resident_bytes": 65855488, "prefill_ms_p50": 3.89,
                  "decode_ms_p50": 1.75, "perplexity_torch": 39.4286, "perplexity": 39.4287},
        "compressed": {"disk_bytes": 5527019, "resident_bytes": 35880960, "prefill_ms_p50": 3.48,
                       "decode_ms_p50": 1.67, "perplexity_torch": 40.2087, "perplexity": 40.2434},
    },
    "budget": {"met": True, "checks": [{"name": "disk_bytes", "measured": 5527019, "limit": 50331648,
                                        "met": True}]},
    "seconds": {"score": 13.8, "plan": 0.0},
    "commands": ["cwca-export demo --out here", "cwca-export report here"],
}


class _Page(HTMLParser):
    """Tables by id (rows of cell texts), every tag's attributes, the <pre> text."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.attrs: list[tuple[str, dict[str, str | None]]] = []
        self.pre: list[str] = []
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None
        self._in_pre = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.attrs.append((tag, a))
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id") or f"#{len(self.tables)}", [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "pre":
            self._in_pre = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "pre":
            self._in_pre = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_pre:
            self.pre.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _column(table: list[list[str]], name: str) -> list[str]:
    col = table[0].index(name)
    return [row[col] for row in table[1:]]


# ---------------------------------------------------------------------------- tests


def test_report_writes_a_png_and_a_self_contained_html(tmp_path):
    folder, plan = _folder(tmp_path / "run", demo=_DEMO)
    page_path = build_report(folder)
    assert page_path == folder / HTML_NAME
    png = (folder / FIGURE_NAME).read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        img.verify()
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG" and img.width > 300 and img.height > 300

    page = _parse(page_path)
    # every resource is inline: the figure is a data URI holding the very bytes of layers.png
    for tag, attrs in page.attrs:
        for key in ("src", "href"):
            value = attrs.get(key)
            assert value is None or not value.lower().startswith(("http://", "https://", "//")), (tag, value)
    assert not any(tag == "link" for tag, _ in page.attrs)
    assert not any(tag == "script" and a.get("src") for tag, a in page.attrs)
    (img,) = [a for tag, a in page.attrs if tag == "img"]
    prefix = "data:image/png;base64,"
    assert img["src"].startswith(prefix)
    assert base64.b64decode(img["src"][len(prefix):]) == png


def test_plan_table_holds_the_plan_numbers_escaped(tmp_path):
    folder, plan = _folder(tmp_path / "run")
    build_report(folder)
    text = (folder / HTML_NAME).read_text(encoding="utf-8")
    assert 'blk<2>&"odd"' not in text and "blk&lt;2&gt;&amp;&quot;odd&quot;" in text
    table = _parse(folder / HTML_NAME).tables["plan"]
    assert table[0][:3] == ["block", "name", "n_params"] and "rho" in table[0]
    assert [int(v) for v in _column(table, "block")] == list(range(K))
    assert _column(table, "name") == plan.block_names  # unescaped back by the parser
    assert [int(v.replace(",", "")) for v in _column(table, "n_params")] == plan.n_params
    for shown, x in zip(_column(table, "rho"), plan.x, strict=True):
        assert float(shown) == pytest.approx(x, rel=1e-5, abs=1e-12)
    for shown, q in zip(_column(table, "q"), plan.q, strict=True):
        assert float(shown) == pytest.approx(q, rel=1e-5)
    assert _column(table, "at bound")[1] == "hi"  # the zero-gain block sits at the cap 0.8


def test_manifest_numbers_and_side_by_side_rows(tmp_path):
    folder, _ = _folder(tmp_path / "run", demo=_DEMO)
    page = _parse(build_report(folder))
    artifacts = {row[0]: row[1:] for row in page.tables["artifacts"][1:]}
    assert page.tables["artifacts"][0][1:] == ["artifact", "dense-artifact"]
    assert "5,527,019 B" in artifacts["disk"][0] and "22,802,256 B" in artifacts["disk"][1]
    assert "35,880,960 B" in artifacts["resident memory"][0]
    assert artifacts["prefill p50 (ms)"] == ["3.250", "3.250"]
    assert artifacts["decode p90 (ms/token)"] == ["1.750", "1.750"]
    assert artifacts["parity"] == ["passed", "passed"]
    side = {row[0]: row[1:] for row in page.tables["side-by-side"][1:]}
    assert side["perplexity (ONNX Runtime)"][:2] == ["39.4287", "40.2434"]
    assert side["disk"][2] == f"{5527019 / 22802256:.3f}x"
    # commands recorded in report.json are shown as they are
    assert "".join(page.pre).splitlines() == _DEMO["commands"]


def test_without_recorded_commands_the_cli_equivalents_are_reconstructed(tmp_path):
    folder, plan = _folder(tmp_path / "run")
    page = _parse(build_report(folder))
    commands = "".join(page.pre).splitlines()
    verbs = [shlex.split(c)[1] for c in commands]
    assert verbs == ["score", "plan", "export", "export", "report"]
    plan_args = shlex.split(commands[1])
    assert plan_args[plan_args.index("--sparsity") + 1] == "0.4"
    assert plan_args[plan_args.index("--hi") + 1] == "0.8"
    assert "0:0.3" in plan_args  # the per-block cap
    assert "--quantize" in shlex.split(commands[2]) or "--quantize" in shlex.split(commands[3])
    # the reconstructed plan command re-solves the same plan
    out = folder / "again.json"
    args = plan_args[1:]
    args[args.index("--out") + 1] = str(out)
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert Plan.load(out).x == pytest.approx(plan.x, rel=1e-9)


def test_baselines_are_at_the_plan_global_target(tmp_path):
    scores = _scores()
    plan = plan_pruning(scores, 0.4, hi=0.8, hi_blocks={0: 0.3})
    baselines = baseline_plans(plan, scores)
    assert [b.label.split()[0] for b in baselines] == ["uniform", "||g||²", "tr"]
    n = np.asarray(plan.n_params, dtype=float)
    for b in baselines:
        assert float(n @ np.asarray(b.x) / n.sum()) == pytest.approx(0.4, abs=1e-6)
    assert baselines[0].x == [0.4] * K
    # the method's own statistic is not repeated as a baseline
    gradnorm = LayerScores("gradnorm", zeta2=scores.stats["grad_sq_norm"], n_params=scores.n_params,
                           stats=scores.stats)
    labels = [b.label for b in baseline_plans(plan_pruning(gradnorm, 0.4), gradnorm)]
    assert not any("gradnorm" in label for label in labels)


def test_allocation_plans_report_units(tmp_path):
    folder, plan = _folder(tmp_path / "run", program="allocate")
    page = _parse(build_report(folder))
    table = page.tables["plan"]
    assert "units" in table[0]
    assert [float(v) for v in _column(table, "units")] == pytest.approx(plan.x)
    assert _column(table, "hi") == ["inf"] * K
    uniform = _column(page.tables["baselines"], "uniform")
    assert [float(v) for v in uniform] == pytest.approx([24 / K] * K)


def test_only_a_plan_is_needed(tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    plan = plan_pruning(_scores(), 0.3)
    plan.save(folder / "plan.json")
    page = _parse(build_report(folder))
    assert len(page.tables["plan"]) == K + 1 and "zeta2" not in page.tables["plan"][0]
    assert (folder / FIGURE_NAME).read_bytes().startswith(PNG_MAGIC)


def test_cli_report_prints_both_paths(tmp_path):
    folder, _ = _folder(tmp_path / "run")
    r = CliRunner().invoke(cli, ["report", str(folder)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [f"figure: {folder / FIGURE_NAME}", f"report: {folder / HTML_NAME}"]
    assert (folder / HTML_NAME).is_file()
    assert not list(folder.glob(".*.tmp"))  # atomic writes leave no temp file


def test_cli_report_json_names_both_files(tmp_path):
    folder, _ = _folder(tmp_path / "run")
    r = CliRunner().invoke(cli, ["report", str(folder), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"figure": str(folder / FIGURE_NAME), "report": str(folder / HTML_NAME)}
    assert (folder / FIGURE_NAME).read_bytes().startswith(PNG_MAGIC)


def test_cli_report_without_a_plan_is_one_line(tmp_path):
    (tmp_path / "scores.json").write_text(json.dumps(_scores().to_dict()))
    r = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and r.output.startswith("Error: ")
    assert "plan.json" in r.output and "hint" in r.output
    assert not (tmp_path / HTML_NAME).exists()


def test_demo_commands_parse_with_the_cli(tmp_path):
    from cwca_export.demo import DemoConfig, demo_commands

    out = tmp_path / "demo out"
    for name in ("dense-artifact", "dense-int8-artifact", "dense-int4-artifact", "artifact"):
        (out / name).mkdir(parents=True)
    for name in ("scores.json", "plan.json"):
        (out / name).write_text("{}")
    assert any("--max-disk MAX_DISK" in c for c in demo_commands(out, DemoConfig()))  # before the dense one is measured
    commands = demo_commands(out, DemoConfig(), max_disk=3_000_000)
    assert any("--max-disk 3000000 " in c for c in commands)
    assert commands[0].startswith("cwca-export demo ") and commands[-1].startswith("cwca-export report ")
    for command in commands:
        if command.startswith("#"):
            continue
        args = shlex.split(command)
        assert args[0] == "cwca-export"
        verb = cli.commands[args[1]]
        verb.make_context(args[1], args[2:])  # raises on an unknown option or a bad value
    assert demo_commands(out, DemoConfig(samples=8))[0].startswith("# Python: run_demo(")


def test_lm_eval_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    from helpers import save_tiny_model

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    model = save_tiny_model("llama", tmp_path / "model")
    r = CliRunner().invoke(cli, ["eval", str(model), "--lm-eval-tasks", "hellaswag,arc_easy"])
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and r.output.startswith("Error: ")
    assert "cwca-export[eval]" in r.output


def test_lm_eval_refuses_onnx_artifacts_and_empty_task_lists(tmp_path):
    from cwca_export.lm_eval_bridge import parse_tasks, run_lm_eval

    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "model.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="not ONNX artifacts.*compress"):
        run_lm_eval(artifact, "hellaswag")
    with pytest.raises(ValueError, match="none given"):
        parse_tasks(" , ")
    assert parse_tasks("a, b,") == ["a", "b"]
    r = CliRunner().invoke(cli, ["eval", str(artifact)])
    assert r.exit_code == 2 and "--lm-eval-tasks" in r.output


def test_lm_eval_bridge_calls_simple_evaluate_on_the_torch_folder(tmp_path, monkeypatch):
    import types

    calls = []

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        return {"results": {t: {"alias": t, "acc,none": np.float64(0.25)} for t in kwargs["tasks"]},
                "versions": {"arc_easy": 1.0}, "samples": "not kept"}

    from helpers import save_tiny_model

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    model = save_tiny_model("llama", tmp_path / "model")
    r = CliRunner().invoke(cli, ["eval", str(model), "--lm-eval-tasks", "arc_easy, hellaswag", "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    (call,) = calls
    assert call["model"] == "hf" and call["model_args"] == f"pretrained={model},trust_remote_code=False"
    assert call["tasks"] == ["arc_easy", "hellaswag"] and call["log_samples"] is False
    report = json.loads(r.output)["lm_eval"]
    assert report["results"]["hellaswag"]["acc,none"] == 0.25 and "samples" not in report


def test_lm_eval_bridge_hands_compressed_folders_over_as_loaded_models(tmp_path, monkeypatch):
    """A compressed folder's shapes differ from its config: lm-eval must get the loaded model."""
    import types

    from helpers import shrink_mlp, tiny_model

    from cwca_export.compression import save_compressed
    from cwca_export.compression.saving import record_step

    model = tiny_model("llama", num_hidden_layers=2)
    shrink_mlp(model, 0, 16)
    record_step(model, {"method": "width"})
    save_compressed(model, tmp_path / "narrow")
    built, calls = [], []

    class HFLM:
        def __init__(self, pretrained, tokenizer=None, batch_size=1):
            built.append(pretrained)

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        return {"results": {}}

    fake = types.SimpleNamespace(simple_evaluate=simple_evaluate)
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.models", types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", types.SimpleNamespace(HFLM=HFLM))
    from cwca_export.lm_eval_bridge import run_lm_eval

    run_lm_eval(tmp_path / "narrow", "arc_easy")
    (loaded,) = built
    assert loaded.model.layers[0].mlp.up_proj.out_features == 16  # the compressed shapes, rebuilt
    assert isinstance(calls[0]["model"], HFLM) and "model_args" not in calls[0]


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_report_renders_in_headless_chromium(tmp_path):
    folder, plan = _folder(tmp_path / "run", demo=_DEMO)
    page = build_report(folder)
    url = page.resolve().as_uri()
    base = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert 'data-img-ok="true"' in dom  # the figure decoded: complete with a non-zero naturalWidth
    rendered = _Page()
    rendered.feed(dom)
    table = rendered.tables["plan"]
    assert len(table) == K + 1
    for shown, x in zip(_column(table, "rho"), plan.x, strict=True):
        assert float(shown) == pytest.approx(x, rel=1e-5, abs=1e-12)

    shot = tmp_path / "shot.png"
    subprocess.run([*base, "--window-size=1200,1600", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120, check=True)
    assert shot.is_file() and shot.stat().st_size > 0
    from PIL import Image

    with Image.open(shot) as img:
        extrema = img.convert("L").getextrema()
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert extrema[0] < extrema[1]  # not one flat colour
    assert colours is None or len(colours) > 50  # text, table rules and the figure's colours



def test_budget_search_frontier_is_plotted_from_the_manifest(tmp_path):
    """Every priced candidate is a point; the page states why the shipped one won."""
    folder, _ = _folder(tmp_path / "run")
    manifest_path = folder / "artifact" / "cwca_manifest.json"
    manifest = json.loads(manifest_path.read_text())

    def cand(t, disk, loss, status, measured=None):
        return {"t": t, "target": t * 0.8, "storage": "all int4-b32", "formats": {"embed": "int4-b32"},
                "predicted": {"disk_bytes": disk}, "calib_loss": loss, "status": status, "measured": measured,
                "met": status.startswith("built: met")}

    chosen = cand(0.5, 3_000_000, 3.4, "built: met the budget", {"disk_bytes": 3_010_000})
    manifest["budget"] = {"limits": {"max_disk": 3_100_000}, "met": True, "search": {
        "candidates": [cand(0.25, 3_200_000, 3.3, "built: disk_bytes 3.2e6 > 3.1e6", {"disk_bytes": 3_210_000}),
                       chosen, cand(1.0, 2_000_000, 4.1, "not built: a lower-loss candidate met the budget"),
                       {**cand(0.0, 9_000_000, None, "predicted over the memory limits")}],
        "chosen": chosen, "why": "lowest calibration loss (3.4) among the candidates measured to meet the budget",
        "calibration": "--data"}}
    manifest_path.write_text(json.dumps(manifest))
    build_report(folder)
    page = (folder / HTML_NAME).read_text()
    assert "Budget search frontier (artifact)" in page and "lowest calibration loss (3.4)" in page
    from cwca_export.report import render_frontier, search_records

    records = search_records({"artifact": manifest, "dense": _manifest(1, 1, None)})
    assert list(records) == ["artifact"]
    png = render_frontier(records["artifact"])
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size[0] > 400
