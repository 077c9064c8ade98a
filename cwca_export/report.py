"""Reports people can look at: a per-layer figure and a self-contained HTML page.

:func:`build_report` reads what a pipeline left in a folder (``plan.json`` at least; also
``scores.json``, every ``*/cwca_manifest.json`` and the demo's ``report.json``) and writes

* ``layers.png``: zeta2 per block (log scale), the qualities q_k, and the plan's rho_k or
  units beside baseline plans (uniform at the same global target; plans solved from the
  other statistics in ``scores.json``, e.g. ||g||^2 and tr F, with the plan's settings);
* ``report.html``: one file with no external resource (the figure as a data URI, inline
  CSS): the figure, the plan table, the measured numbers of each artifact, the side-by-side
  rows of ``report.json`` and the commands that produced them.

NumPy and matplotlib only (matplotlib is imported when a figure is drawn, Agg canvas, no
pyplot state), so ``cwca-export report DIR`` rebuilds both files from the JSON alone.

The page's last line stamps both files (:func:`stamp_page`): the sha256 of the page above it
and of the figure, so a rebuild replaces them only while they are exactly as written
(:func:`report_files_intact`), never a page or figure someone edited.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cwca_export.jsonio import trailing_stamp, write_bytes_atomic
from cwca_export.planning.plan import Plan
from cwca_export.scores import LayerScores

FIGURE_NAME = "layers.png"
HTML_NAME = "report.html"
MANIFEST_NAME = "cwca_manifest.json"  # same as cwca_export.exporter.manifest (which imports torch)

_STAMP = re.compile(rb"<!-- cwca-export stamp: page sha256 ([0-9a-f]{64}), layers\.png sha256 ([0-9a-f]{64}) -->\n")

# statistics of scores.json that rank blocks the way a baseline scoring method would
_BASELINE_STATS = {
    "grad_sq_norm": "||g||² (gradnorm)",
    "fisher_trace": "tr F (Fisher trace)",
}


@dataclass
class Baseline:
    """A comparison plan: its label, per-block x, and how it was made."""

    label: str
    x: list[float]
    how: str


@dataclass
class ReportInputs:
    """Everything :func:`build_report` found in the folder."""

    folder: Path
    plan: Plan
    scores: LayerScores | None = None
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    demo: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- files


def load_inputs(folder: str | os.PathLike) -> ReportInputs:
    """Read plan.json (required), scores.json, manifests and report.json from ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder; hint: pass the --out folder of `cwca-export demo`")
    plan_path = folder / "plan.json"
    if not plan_path.is_file():
        raise ValueError(
            f"{folder}: no plan.json, nothing to report; hint: run"
            f" `cwca-export plan scores.json --out {folder / 'plan.json'}` or `cwca-export demo --out {folder}`"
        )
    inputs = ReportInputs(folder=folder, plan=Plan.load(plan_path))
    plan = inputs.plan
    if (folder / "scores.json").is_file():
        scores = LayerScores.load(folder / "scores.json")
        if scores.num_blocks == plan.num_blocks:
            inputs.scores = scores
        else:
            inputs.notes.append(
                f"scores.json has {scores.num_blocks} blocks, plan.json {plan.num_blocks}: scores not shown"
            )
    for path in sorted([folder / MANIFEST_NAME, *folder.glob(f"*/{MANIFEST_NAME}")]):
        if not path.is_file():
            continue
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            inputs.notes.append(f"{path.relative_to(folder)}: not valid JSON ({exc.msg}), skipped")
            continue
        if isinstance(manifest, dict):
            name = "." if path.parent == folder else path.parent.name
            inputs.manifests[name] = manifest
    if (folder / "report.json").is_file():
        try:
            demo = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            inputs.notes.append(f"report.json: not valid JSON ({exc.msg}), skipped")
        else:
            inputs.demo = demo if isinstance(demo, dict) else None
    return inputs


# ---------------------------------------------------------------------------- baselines


def global_target(plan: Plan) -> float:
    """The plan's global target: sparsity (prune) or budget (allocate)."""
    if plan.program == "prune":
        return float(plan.parameters.get("sparsity", plan.global_sparsity))
    cost = np.asarray(plan.cost if plan.cost is not None else [1.0] * plan.num_blocks)
    return float(plan.parameters.get("budget", cost @ np.asarray(plan.x)))


def baseline_plans(plan: Plan, scores: LayerScores | None = None) -> list[Baseline]:
    """Comparison plans at the plan's global target.

    * uniform: every block gets the same rho (prune) or the same units (allocate, the budget
      spread evenly over the blocks' costs);
    * when ``scores`` carries ``grad_sq_norm`` / ``fisher_trace``: the plan re-solved with
      :func:`~cwca_export.planning.plan.plan_pruning` / :func:`~cwca_export.planning.plan.plan_allocation`
      from that statistic instead of zeta2, with the plan's own settings and bounds.
    """
    target = global_target(plan)
    k = plan.num_blocks
    if plan.program == "prune":
        uniform = [target] * k
        how = f"rho = {target:g} in every block"
    else:
        cost = np.asarray(plan.cost if plan.cost is not None else [1.0] * k, dtype=np.float64)
        units = target / float(cost.sum())
        uniform = [units] * k
        how = f"budget {target:g} spread evenly: {units:.4g} units per block"
    out = [Baseline("uniform", uniform, how)]
    if scores is None:
        return out
    for stat, label in _BASELINE_STATS.items():
        values = scores.stats.get(stat)
        if values is None or scores.method in _stat_methods(stat):
            continue
        v = np.asarray(values, dtype=np.float64)
        if v.shape != (k,) or not np.all(np.isfinite(v)) or np.any(v < 0) or v.sum() <= 0:
            continue
        try:
            alt = _resolve(plan, LayerScores(stat, zeta2=v.tolist(), n_params=scores.n_params,
                                             block_names=scores.block_names))
        except ValueError:  # a setting the solver refuses for this statistic: no baseline
            continue
        out.append(Baseline(label, alt.x, f"plan re-solved from scores.json stats[{stat!r}]"))
    return out


def _stat_methods(stat: str) -> set[str]:
    # the statistic that *is* zeta2 for these methods would only repeat the plan
    return {"grad_sq_norm": {"gradnorm"}, "fisher_trace": set()}[stat]


def _resolve(plan: Plan, scores: LayerScores) -> Plan:
    from cwca_export.planning.plan import plan_allocation, plan_pruning

    p = plan.parameters
    tau = float(p.get("tau", 0.05))
    if plan.program == "prune":
        return plan_pruning(
            scores, global_target(plan), eta=float(p.get("eta", 2.0)), kappa=float(p.get("kappa", 1.0)),
            lo=plan.lo, hi=plan.hi, psi=p.get("psi", "quadratic"), tau=tau,
        )
    return plan_allocation(
        scores, global_target(plan), cost=plan.cost if plan.cost is not None else 1.0,
        gamma=float(p.get("gamma", 0.9)), beta=float(p.get("beta", 2.0)), alpha=p.get("alpha", 0.5),
        lo=plan.lo, hi=plan.hi, integer=bool(p.get("integer", True)), tau=tau,
    )


# ---------------------------------------------------------------------------- figure


def render_figure(plan: Plan, scores: LayerScores | None, baselines: list[Baseline]) -> bytes:
    """The per-layer figure as PNG bytes (matplotlib's Agg canvas; no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = plan.num_blocks
    idx = np.arange(k)
    fig = Figure(figsize=(max(7.0, 0.35 * k + 3.0), 8.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_z, ax_q, ax_x = fig.subplots(3, 1, sharex=True)

    if scores is not None:
        z = np.asarray(scores.zeta2, dtype=np.float64)
        positive = z > 0
        ax_z.plot(idx[positive], z[positive], "o-", color="#3465a4", label=f"zeta² ({scores.method})")
        if (~positive).any():  # a zero gain has no place on a log axis: mark it at the bottom
            floor = z[positive].min() if positive.any() else 1.0
            ax_z.plot(idx[~positive], np.full((~positive).sum(), floor), "v", color="#cc0000",
                      label="zeta² = 0")
        if positive.any():
            ax_z.set_yscale("log")
        ax_z.legend(loc="best", fontsize=8)
    else:
        ax_z.text(0.5, 0.5, "no scores.json in this folder", ha="center", va="center",
                  transform=ax_z.transAxes, color="#555555")
    ax_z.set_ylabel("zeta² (log)")
    ax_z.set_title("per-block gain zeta²_k")

    ax_q.bar(idx, plan.q, color="#73d216", edgecolor="#4e9a06")
    ax_q.set_ylabel("q_k")
    ax_q.set_title("floored quality q_k the solver saw")

    value = "rho_k (fraction removed)" if plan.program == "prune" else "units e_k"
    ax_x.bar(idx, plan.x, color="#fcaf3e", edgecolor="#ce5c00", label="plan")
    styles = ["--", ":", "-."]
    for i, b in enumerate(baselines):
        ax_x.plot(idx, b.x, styles[i % len(styles)], marker=".", label=b.label)
    finite_hi = [h for h in plan.hi if math.isfinite(h)]
    if finite_hi and len(set(finite_hi)) == 1 and plan.program == "prune":
        ax_x.axhline(finite_hi[0], color="#888888", lw=0.8, label=f"cap {finite_hi[0]:g}")
    ax_x.set_ylabel(value)
    ax_x.set_title(f"plan ({plan.program}) against baselines at the same global target")
    ax_x.legend(loc="best", fontsize=8)

    for ax in (ax_z, ax_q, ax_x):
        ax.set_xlabel("block index")
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xticks(idx if k <= 40 else idx[:: max(1, k // 20)])
        ax.grid(True, axis="y", alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def search_records(manifests: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The budget-search records (``budget.search``) of the manifests that have candidates."""
    out = {}
    for name, manifest in manifests.items():
        search = ((manifest.get("budget") or {}).get("search") or {})
        if search.get("candidates"):
            out[name] = {**search, "limits": (manifest.get("budget") or {}).get("limits") or {}}
    return out


def render_frontier(search: dict[str, Any]) -> bytes:
    """The budget search's frontier as PNG bytes: every priced candidate's predicted bytes
    against its calibration loss, built ones at their measured bytes, the winner marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 5.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    groups = {"predicted to fit, not built": ("o", "#babdb6"), "built: met the budget": ("o", "#4e9a06"),
              "built: missed a limit": ("x", "#cc0000"), "failed verification": ("s", "#ce5c00")}
    points: dict[str, list[tuple[float, float]]] = {k: [] for k in groups}
    for c in search["candidates"]:
        if c.get("calib_loss") is None:
            continue
        status = c.get("status", "")
        measured = c.get("measured") or {}
        mib = (measured.get("disk_bytes") or c["predicted"]["disk_bytes"]) / 2**20
        key = ("built: met the budget" if status.startswith("built: met") else
               "built: missed a limit" if status.startswith("built") else
               "failed verification" if status.startswith("failed") else "predicted to fit, not built")
        points[key].append((mib, c["calib_loss"]))
    for key, (marker, color) in groups.items():
        if points[key]:
            xs, ys = zip(*points[key], strict=True)
            ax.scatter(xs, ys, marker=marker, color=color, label=f"{key} ({len(xs)})")
    chosen = search.get("chosen") or {}
    if chosen.get("calib_loss") is not None:
        mib = (chosen.get("measured") or {}).get("disk_bytes", chosen["predicted"]["disk_bytes"]) / 2**20
        ax.scatter([mib], [chosen["calib_loss"]], marker="*", s=250, color="#204a87", label="shipped", zorder=5)
    limits = search.get("limits") or {}
    for key in ("max_disk", "max_memory"):
        if limits.get(key):
            ax.axvline(limits[key] / 2**20, color="#555555", ls="--", lw=1,
                       label=f"{key} {limits[key] / 2**20:.3g} MiB")
    ax.set_xlabel("artifact MiB (measured where built, else predicted)")
    ax.set_ylabel("calibration loss (nats/token)")
    ax.set_title("budget search: candidates (structure level x precision plan)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# ---------------------------------------------------------------------------- commands


def _q(value: Any) -> str:
    return shlex.quote(str(value))


def _bound_options(plan: Plan) -> list[str]:
    """--lo / --hi / --bounds reproducing the plan's per-block bounds."""
    args: list[str] = []
    lo_mode = Counter(plan.lo).most_common(1)[0][0]
    hi_mode = Counter(plan.hi).most_common(1)[0][0]
    if lo_mode != 0.0:
        args += ["--lo", f"{lo_mode:g}"]
    default_hi = 0.95 if plan.program == "prune" else math.inf
    if hi_mode != default_hi and math.isfinite(hi_mode):
        args += ["--hi", f"{hi_mode:g}"]
    for i, (lo, hi) in enumerate(zip(plan.lo, plan.hi, strict=True)):
        if lo != lo_mode:
            args += ["--bounds", f"{i}:{lo:g}:{hi:g}"]
        elif hi != hi_mode:
            args += ["--bounds", f"{i}:{hi:g}"]
    return args


def reconstruct_commands(inputs: ReportInputs) -> list[str]:
    """The CLI commands equivalent to what produced the folder's files, as far as they tell.

    Paths the files do not record are CAPITALISED placeholders (CALIB.txt, MODEL_DIR, ...).
    """
    folder, plan, scores = inputs.folder, inputs.plan, inputs.scores
    commands = []
    if scores is not None:
        s = scores.settings
        model = scores.model.get("name_or_path") or "MODEL_DIR"
        cmd = ["cwca-export", "score", _q(model), "--data", "CALIB.txt", "--estimator", scores.method]
        if "num_samples" in s:
            cmd += ["--samples", str(s["num_samples"])]
        if "seq_len" in s:
            cmd += ["--seq-len", str(s["seq_len"])]
        if "seed" in s:
            cmd += ["--seed", str(s["seed"])]
        cmd += ["--out", _q(folder / "scores.json")]
        commands.append(" ".join(cmd))
    p = plan.parameters
    cmd = ["cwca-export", "plan", _q(folder / "scores.json"), "--program", plan.program]
    if plan.program == "prune":
        cmd += ["--sparsity", f"{global_target(plan):g}"]
        for key, default in (("eta", 2.0), ("kappa", 1.0)):
            if key in p and float(p[key]) != default:
                cmd += [f"--{key}", f"{float(p[key]):g}"]
        if p.get("psi", "quadratic") != "quadratic":
            cmd += ["--psi", str(p["psi"])]
    else:
        cmd += ["--budget", f"{global_target(plan):g}"]
        costs = set(plan.cost or [1.0])
        if len(costs) == 1 and costs != {1.0}:
            cmd += ["--cost", f"{costs.pop():g}"]
        for key, default in (("gamma", 0.9), ("beta", 2.0), ("alpha", 0.5)):
            if key in p and np.ndim(p[key]) == 0 and float(p[key]) != default:
                cmd += [f"--{key}", f"{float(p[key]):g}"]
        if p.get("integer", True) is False:
            cmd.append("--continuous")
    if "tau" in p and float(p["tau"]) != 0.05:
        cmd += ["--tau", f"{float(p['tau']):g}"]
    cmd += _bound_options(plan) + ["--out", _q(folder / "plan.json")]
    commands.append(" ".join(cmd))
    for name, manifest in inputs.manifests.items():
        model = (manifest.get("model") or {}).get("name_or_path") or "MODEL_DIR"
        out = folder if name == "." else folder / name
        cmd = ["cwca-export", "export", _q(model), "--out", _q(out)]
        backend = (manifest.get("backend") or {}).get("name")
        if backend and backend != "optimum":
            cmd += ["--backend", backend]
        if manifest.get("plan"):
            cmd += ["--plan", _q(folder / "plan.json")]
        post = manifest.get("postprocess") or {}
        if post.get("quantize"):
            cmd += ["--quantize", str(post["quantize"].get("method"))]
        if post.get("dtype") not in (None, "fp32"):
            cmd += ["--dtype", str(post["dtype"])]
        limits = (manifest.get("budget") or {}).get("limits") or {}
        if limits.get("max_memory"):
            cmd += ["--max-memory", str(limits["max_memory"])]
        if limits.get("latency_peer"):
            cmd += ["--max-latency-ms", str(limits["latency_peer"])]
        elif limits.get("max_latency_ms"):
            cmd += ["--max-latency-ms", f"{limits['max_latency_ms']:g}"]
        workload = (manifest.get("measurement") or {}).get("workload") or {}
        for key, flag in (("ep", "--ep"), ("prompt_len", "--prompt-len"), ("context", "--context")):
            if workload.get(key) is not None:
                cmd += [flag, str(workload[key])]
        commands.append(" ".join(cmd))
    commands.append(f"cwca-export report {_q(folder)}")
    return commands


# ---------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 70em; padding: 0 1em; color: #1d1d1d; background: #ffffff; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.ok { color: #2e7d32; font-weight: bold; } .fail { color: #c62828; font-weight: bold; }
.note { color: #666; font-size: 0.9em; }
"""

# sets data-img-ok on <body> once the page has loaded: a browser check reads it from the DOM
_SCRIPT = """
window.addEventListener("load", function () {
  var img = document.getElementById("layers-figure");
  document.body.dataset.imgOk = String(!!img && img.complete && img.naturalWidth > 0);
});
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, fmt: str = "{:.6g}") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and fmt == "{:.6g}":
        return f"{value:,}"  # byte counts and limits stay exact
    if isinstance(value, (int, float)):
        return fmt.format(value) if math.isfinite(value) else str(value)
    return str(value)


def _size(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    from cwca_export.budget import format_size

    return f"{format_size(value)} ({int(value):,} B)"


def _table(table_id: str, header: list[str], rows: list[list[tuple[str, bool]]]) -> str:
    """rows of (already formatted text, is_number) cells; everything escaped here."""
    out = [f'<table id="{_e(table_id)}">']
    if header:
        out += ["<thead><tr>", *[f"<th>{_e(h)}</th>" for h in header], "</tr></thead>"]
    out.append("<tbody>")
    for row in rows:
        out.append("<tr>" + "".join(
            f'<td class="num">{_e(text)}</td>' if is_num else f"<td>{_e(text)}</td>" for text, is_num in row
        ) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _passed(flag: Any) -> str:
    if flag is True:
        return '<span class="ok">passed</span>'
    if flag is False:
        return '<span class="fail">failed</span>'
    return "-"


def _plan_section(inputs: ReportInputs, baselines: list[Baseline]) -> str:
    plan, scores = inputs.plan, inputs.scores
    value = "rho" if plan.program == "prune" else "units"
    header = ["block", "name", "n_params"]
    if scores is not None:
        header.append("zeta2")
    header += ["q", value, "lo", "hi", "at bound"]
    rows = []
    for i in range(plan.num_blocks):
        x = plan.x[i]
        at = "lo" if x <= plan.lo[i] else ("hi" if x >= plan.hi[i] else "")
        row = [(str(i), True), (plan.block_names[i], False), (f"{plan.n_params[i]:,}", True)]
        if scores is not None:
            row.append((_num(scores.zeta2[i]), True))
        row += [(_num(plan.q[i]), True), (_num(x), True), (_num(plan.lo[i]), True), (_num(plan.hi[i]), True),
                (at, False)]
        rows.append(row)
    parts = [_table("plan", header, rows)]
    n = np.asarray(plan.n_params, dtype=np.float64)
    if plan.program == "prune":
        summary = f"global sparsity {plan.global_sparsity:.6g} (target {global_target(plan):g})"
    else:
        cost = np.asarray(plan.cost if plan.cost is not None else [1.0] * plan.num_blocks)
        summary = f"spent {float(cost @ np.asarray(plan.x)):g} of budget {global_target(plan):g}"
    parts.append(
        f"<p>{_e(summary)}; dual {_e(_num(plan.dual, '{:.4g}'))}, objective"
        f" {_e(_num(plan.objective))}, {_e(plan.iterations)} dual evaluations;"
        f" {_e(plan.num_blocks)} blocks, {_e(f'{int(n.sum()):,}')} prunable weights.</p>"
    )
    parts.append(f"<p>parameters: <code>{_e(json.dumps(plan.parameters, default=str))}</code></p>")
    if plan.scores:
        parts.append(f"<p>scores: <code>{_e(json.dumps(plan.scores, default=str))}</code></p>")
    # baselines beside the plan
    header = ["block", f"plan {value}", *[b.label for b in baselines]]
    rows = [
        [(str(i), True), (_num(plan.x[i]), True), *[(_num(b.x[i]), True) for b in baselines]]
        for i in range(plan.num_blocks)
    ]
    parts.append("<h3>Baselines at the same global target</h3>")
    parts.append("<ul>" + "".join(f"<li>{_e(b.label)}: {_e(b.how)}</li>" for b in baselines) + "</ul>")
    parts.append(_table("baselines", header, rows))
    return "".join(parts)


def _manifest_section(manifests: dict[str, dict[str, Any]]) -> str:
    if not manifests:
        return '<p class="note">No artifact (cwca_manifest.json) in this folder.</p>'
    header = ["", *manifests]
    lines: list[tuple[str, list[Any]]] = []

    def get(m: dict[str, Any], *keys: str) -> Any:
        for key in keys:
            if not isinstance(m, dict):
                return None
            m = m.get(key)
        return m

    def parity(m: dict[str, Any]) -> dict[str, Any]:
        ver = m.get("verification") or {}
        return (ver.get("final") or ver.get("fp32") or {}).get("parity") or {}

    lines.append(("disk", [_size(m.get("disk_bytes")) for m in manifests.values()]))
    lines.append(("resident memory", [_size(get(m, "measurement", "resident_bytes")) for m in manifests.values()]))
    for phase in ("prefill", "decode"):
        for pct in ("p50", "p90"):
            unit = "ms" if phase == "prefill" else "ms/token"
            lines.append((f"{phase} {pct} ({unit})", [
                _num(get(m, "measurement", "latency_ms", phase, pct), "{:.3f}") for m in manifests.values()
            ]))
    lines.append(("parity rel_rms", [_num(parity(m).get("rel_rms"), "{:.3g}") for m in manifests.values()]))
    lines.append(("parity tolerance", [_num(parity(m).get("tolerance"), "{:.3g}") for m in manifests.values()]))
    lines.append(("parity", [
        "passed" if parity(m).get("passed") else ("failed" if parity(m).get("passed") is False else "-")
        for m in manifests.values()
    ]))
    lines.append(("weights", [
        (get(m, "postprocess", "quantize", "method") or get(m, "postprocess", "dtype") or "-")
        for m in manifests.values()
    ]))
    lines.append(("backend", [get(m, "backend", "name") or "-" for m in manifests.values()]))
    lines.append(("parameters", [_num(get(m, "model", "parameters"), "{:,}") for m in manifests.values()]))
    lines.append(("workload", [
        ", ".join(f"{k}={v}" for k, v in (get(m, "measurement", "workload") or {}).items()) or "-"
        for m in manifests.values()
    ]))
    lines.append(("budget met", [
        {True: "yes", False: "no"}.get(get(m, "budget", "met"), "-") for m in manifests.values()
    ]))
    rows = [[(label, False), *[(str(v), True) for v in values]] for label, values in lines]
    parts = [_table("artifacts", header, rows)]
    for name, m in manifests.items():
        savings = m.get("savings") or []
        if savings:
            parts.append(f"<p><b>{_e(name)}</b>: savings on ONNX Runtime</p><ul>")
            for s in savings:
                real = [k for k in ("disk", "memory", "latency") if s.get(k)]
                parts.append(
                    f"<li>{_e(s.get('kind'))}: {_e(', '.join(real) or 'none')} ({_e(s.get('why', ''))})</li>"
                )
            parts.append("</ul>")
    return "".join(parts)


def _demo_section(demo: dict[str, Any] | None) -> str:
    if not demo or not isinstance(demo.get("rows"), dict):
        return '<p class="note">No report.json (side-by-side rows) in this folder.</p>'
    rows_in = demo["rows"]
    names = list(rows_in)
    fields = [
        ("disk_bytes", "disk", _size),
        ("resident_bytes", "resident memory", _size),
        ("prefill_ms_p50", "prefill p50 (ms)", lambda v: _num(v, "{:.3f}")),
        ("decode_ms_p50", "decode p50 (ms/token)", lambda v: _num(v, "{:.3f}")),
        ("perplexity_torch", "perplexity (torch)", lambda v: _num(v, "{:.4f}")),
        ("perplexity", "perplexity (ONNX Runtime)", lambda v: _num(v, "{:.4f}")),
    ]
    ratio = len(names) == 2
    header = ["", *names, *([f"{names[1]} / {names[0]}"] if ratio else [])]
    rows = []
    for key, label, fmt in fields:
        values = [rows_in[n].get(key) if isinstance(rows_in[n], dict) else None for n in names]
        if all(v is None for v in values):
            continue
        row = [(label, False), *[(fmt(v), True) for v in values]]
        if ratio:
            a, b = values
            ok = all(isinstance(v, (int, float)) for v in values) and a
            row.append((f"{b / a:.3f}x" if ok else "-", True))
        rows.append(row)
    parts = [_table("side-by-side", header, rows)]
    budget = demo.get("budget") or {}
    if budget.get("checks"):
        parts.append("<p>budget: " + _passed(budget.get("met")) + "</p>")
        parts.append(_table("budget", ["check", "measured", "limit", "met"], [
            [(c.get("name", ""), False), (_num(c.get("measured")), True), (_num(c.get("limit")), True),
             ({True: "yes", False: "no"}.get(c.get("met"), "-"), False)]
            for c in budget["checks"]
        ]))
    if demo.get("seconds"):
        parts.append("<p>wall time per step (s): " + _e(", ".join(
            f"{k} {v}" for k, v in demo["seconds"].items())) + "</p>")
    return "".join(parts)


def render_html(inputs: ReportInputs, png: bytes, baselines: list[Baseline], commands: list[str],
                commands_recorded: bool) -> str:
    """The self-contained page (no external resource: the figure is a data URI)."""
    plan, scores = inputs.plan, inputs.scores
    model = plan.model.get("name_or_path") or (scores.model.get("name_or_path") if scores else None)
    title = f"cwca-export report: {Path(str(model)).name if model else inputs.folder.name}"
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    value = "rho_k" if plan.program == "prune" else "units e_k"
    facts = [
        ("folder", str(inputs.folder.resolve())),
        ("model", model or "-"),
        ("fingerprint", plan.model.get("fingerprint") or "-"),
        ("program", plan.program),
        ("scores", f"{scores.method}, {scores.samples} sequences, {scores.tokens:,} tokens" if scores
         else (plan.scores.get("method") or "-")),
        ("cwca-export", plan.versions.get("cwca-export", "-")),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>",
        f"<script>{_SCRIPT}</script>",
        "</head><body>",
        f"<h1>{_e(title)}</h1>",
        _table("facts", [], [[(k, False), (str(v), False)] for k, v in facts]),
        "<h2>Per-layer figure</h2>",
        f'<img id="layers-figure" src="{data_uri}" alt="{_e(f"zeta2, q_k and {value} per block")}">',
        f'<p class="note">Top: zeta2 per block (log scale). Middle: the floored qualities q_k.'
        f" Bottom: the plan's {_e(value)} against the baselines. Also saved as {_e(FIGURE_NAME)}.</p>",
        "<h2>Plan</h2>",
        _plan_section(inputs, baselines),
        "<h2>Artifacts (cwca_manifest.json)</h2>",
        _manifest_section(inputs.manifests),
        *_frontier_section(inputs.manifests),
        "<h2>Dense against compressed (report.json)</h2>",
        _demo_section(inputs.demo),
        "<h2>Commands</h2>",
        "<p class=\"note\">"
        + ("As recorded by the run that wrote report.json." if commands_recorded else
           "Reconstructed from the files' settings; CAPITALISED paths are placeholders for what the"
           " files do not record.")
        + "</p>",
        f'<pre id="commands">{_e(chr(10).join(commands))}</pre>',
    ]
    if inputs.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in inputs.notes) + "</ul>")
    parts.append(f'<p class="note">Rebuild this page with <code>{_e(f"cwca-export report {inputs.folder}")}'
                 "</code>.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _frontier_section(manifests: dict[str, dict[str, Any]]) -> list[str]:
    parts = []
    for name, search in search_records(manifests).items():
        uri = "data:image/png;base64," + base64.b64encode(render_frontier(search)).decode("ascii")
        parts.append(f"<h2>Budget search frontier ({_e(name)})</h2>")
        parts.append(f'<img class="frontier" src="{uri}" alt="{_e("candidates: bytes against calibration loss")}">')
        parts.append(f'<p class="note">{_e(search.get("why") or "")} Calibration: {_e(search.get("calibration"))}.'
                     "</p>")
    return parts


def build_report(folder: str | os.PathLike) -> Path:
    """Write ``layers.png`` and ``report.html`` into ``folder`` from its files; return the HTML path.

    Needs ``plan.json``; uses ``scores.json``, ``*/cwca_manifest.json`` and ``report.json``
    when present. Both files are written atomically.

    Example:
        >>> build_report("cwca-demo")  # doctest: +SKIP
        PosixPath('cwca-demo/report.html')
    """
    inputs = load_inputs(folder)
    baselines = baseline_plans(inputs.plan, inputs.scores)
    png = render_figure(inputs.plan, inputs.scores, baselines)
    recorded = inputs.demo.get("commands") if inputs.demo else None
    if isinstance(recorded, list) and recorded and all(isinstance(c, str) for c in recorded):
        commands, commands_recorded = list(recorded), True
    else:
        commands, commands_recorded = reconstruct_commands(inputs), False
    page = stamp_page(render_html(inputs, png, baselines, commands, commands_recorded).encode("utf-8"), png)
    write_bytes_atomic(inputs.folder / FIGURE_NAME, png)
    return write_bytes_atomic(inputs.folder / HTML_NAME, page)


def stamp_page(page: bytes, png: bytes) -> bytes:
    """``page`` with a last line naming its own sha256 (of the bytes above) and the figure's."""
    page_sha, png_sha = hashlib.sha256(page).hexdigest(), hashlib.sha256(png).hexdigest()
    return page + f"<!-- cwca-export stamp: page sha256 {page_sha}, layers.png sha256 {png_sha} -->\n".encode()


def report_files_intact(folder: str | os.PathLike) -> tuple[bool, bool]:
    """Whether ``report.html`` and ``layers.png`` in ``folder`` are exactly as :func:`build_report` wrote them.

    The page is when its stamp matches the bytes above it; the figure when its sha256 is the one
    an intact page names. A page without a stamp (older cwca-export, or another writer) vouches for neither.
    """
    try:
        page = (Path(folder) / HTML_NAME).read_bytes()
    except OSError:
        return False, False
    found = trailing_stamp(page, _STAMP)
    if found is None:
        return False, False
    try:
        figure = hashlib.sha256((Path(folder) / FIGURE_NAME).read_bytes()).hexdigest()
    except OSError:
        figure = None
    return True, figure == found.group(2).decode()
