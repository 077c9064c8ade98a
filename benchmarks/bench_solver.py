"""Time the closed-form solvers against scipy.optimize on the same instances.

docs/design.md 2.2-2.3 promises O(K log 1/eps) dual bisection in pure NumPy; this script checks the
claim against a general-purpose solver (SLSQP, with trust-constr where SLSQP reports failure)
at K = 8 ... 65536 layers, and prints a markdown table of times, objective gaps and constraint
residuals. Run it from the repository root::

    python benchmarks/bench_solver.py
    python benchmarks/bench_solver.py --ks 8 32 80 --repeats 21 --scipy-cap 30
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# One BLAS thread, set before NumPy loads: on a small shared machine a multi-threaded BLAS inside
# SLSQP's least-squares steps oversubscribes the cores and makes scipy look 10-30x slower than
# it is. Export the variables yourself to override.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import scipy  # noqa: E402
from scipy import optimize  # noqa: E402

from cwca_export.planning.solver import (  # noqa: E402
    allocation_objective,
    pruning_objective,
    solve_allocation,
    solve_pruning,
)

SCORES_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "layer-scores"
# Mistral-7B-v0.1 Linear shapes (out, in) per decoder block, from the scores README
MISTRAL_LINEARS = [
    (4096, 4096),
    (1024, 4096),
    (1024, 4096),
    (4096, 4096),
    (14336, 4096),
    (14336, 4096),
    (4096, 14336),
]


@dataclass(frozen=True)
class Instance:
    """One program to solve: ``kind`` is "prune" or "allocate"."""

    name: str
    kind: str
    q: np.ndarray
    size: np.ndarray  # n_k for pruning, c_k for allocation
    level: float  # target sparsity, or budget
    lo: np.ndarray
    hi: np.ndarray
    gamma: float = 64.0  # allocation only: big enough that the budget binds

    def ours(self) -> np.ndarray:
        if self.kind == "prune":
            return solve_pruning(self.q, self.size, self.level, lo=self.lo, hi=self.hi).x
        return solve_allocation(
            self.q, self.size, self.level, gamma=self.gamma, lo=self.lo, hi=self.hi
        ).x

    def value(self, x: np.ndarray) -> float:
        """The objective, signed so that smaller is better for both programs."""
        if self.kind == "prune":
            return pruning_objective(x, self.q)
        return -allocation_objective(x, self.q, gamma=self.gamma)

    def residual(self, x: np.ndarray) -> float:
        """Constraint violation relative to sum(n) (pruning) or the budget (allocation),
        including any bound violation."""
        box = float(np.sum(np.maximum(self.lo - x, 0) + np.maximum(x - self.hi, 0)))
        if self.kind == "prune":
            total = self.size.sum()
            return abs(self.size @ x - self.level * total) / total + box
        return max(self.size @ x - self.level, 0.0) / self.level + box


def random_instance(kind: str, k: int, seed: int) -> Instance:
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.0, 1.0, k) ** 2
    if kind == "prune":
        n = rng.uniform(1e5, 6e7, k)
        return Instance(f"random K={k}", kind, q, n, 0.5, np.zeros(k), np.full(k, 0.95))
    cost = rng.uniform(0.5, 2.0, k)
    return Instance(
        f"random K={k}", kind, q, cost, 4.0 * cost.sum(), np.zeros(k), np.full(k, np.inf)
    )


def mistral_instances() -> list[Instance]:
    """The LayerIF Mistral-7B profile (per block), with the authors' pruning caps."""
    path = SCORES_DIR / "mistral-7b_IF-300-96.npy"
    if not path.exists():
        return []
    q = np.load(path)[::7].astype(float)
    k = q.size
    n = np.full(k, float(sum(o * i for o, i in MISTRAL_LINEARS)))
    rank_cost = np.full(k, float(sum(o + i for o, i in MISTRAL_LINEARS)))
    hi = np.full(k, 0.55)
    hi[0] = 0.3
    return [
        Instance("Mistral-7B IF, caps 0.55/0.3", "prune", q / q.sum(), n, 0.5, np.zeros(k), hi),
        Instance(
            "Mistral-7B IF, LoRA rank 8 avg",
            "allocate",
            q,
            rank_cost,
            8.0 * rank_cost.sum(),
            np.zeros(k),
            np.full(k, 64.0),
        ),
    ]


class _TimeCap(Exception):
    pass


def scipy_solve(inst: Instance, method: str, cap_s: float) -> tuple[np.ndarray | None, bool, int]:
    """scipy's answer, success flag and iterations, given a gradient, a tight tolerance and a
    feasible start; the answer is None when the run passes ``cap_s`` seconds."""
    k, s, lo, hi = inst.q.size, inst.size, inst.lo, inst.hi
    if inst.kind == "prune":
        w = 2.0 * inst.q
        need = inst.level * s.sum()
        t = (need - s @ lo) / (s @ (hi - lo))
        x0 = lo + t * (hi - lo)
        scale = max(float(np.sum(w * hi**2)), 1e-300)

        def fun(x):
            return float(np.sum(w * x**2)) / scale

        def jac(x):
            return 2.0 * w * x / scale

        total = s.sum()
        cons_dict = {
            "type": "eq",
            "fun": lambda x: (s @ x - need) / total,
            "jac": lambda x: s / total,
        }
        cons_lin = optimize.LinearConstraint(s[None, :] / total, need / total, need / total)
    else:
        g = inst.gamma * inst.q**2
        cap = np.minimum(hi, lo + 1.0)
        x0 = lo + min(1.0, 0.5 * (inst.level - s @ lo) / (s @ (cap - lo))) * (cap - lo)
        scale = max(float(g.sum()), 1e-300)

        def fun(x):
            return -float(np.sum(g * np.log1p(x) - 0.5 * x)) / scale

        def jac(x):
            return -(g / (1.0 + x) - 0.5) / scale

        budget = inst.level
        cons_dict = {
            "type": "ineq",
            "fun": lambda x: (budget - s @ x) / budget,
            "jac": lambda x: -s / budget,
        }
        cons_lin = optimize.LinearConstraint(s[None, :] / budget, -np.inf, 1.0)
    assert x0.shape == (k,)
    start = time.perf_counter()

    def stop_if_late(*_):
        if time.perf_counter() - start > cap_s:
            raise _TimeCap

    bounds = optimize.Bounds(lo, hi)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if method == "SLSQP":
                res = optimize.minimize(
                    fun,
                    x0,
                    jac=jac,
                    bounds=bounds,
                    constraints=[cons_dict],
                    method="SLSQP",
                    callback=stop_if_late,
                    options={"ftol": 1e-15, "maxiter": 1000},
                )
            else:
                res = optimize.minimize(
                    fun,
                    x0,
                    jac=jac,
                    bounds=bounds,
                    constraints=[cons_lin],
                    method="trust-constr",
                    callback=stop_if_late,
                    options={"gtol": 1e-12, "xtol": 1e-15, "maxiter": 5000},
                )
        except _TimeCap:
            return None, False, 0
    return np.clip(res.x, lo, hi), bool(res.success), int(res.nit)


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of one call, from ``repeats`` batches sized to last >= 20 ms each."""
    fn()  # warm up
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        if time.perf_counter() - t0 >= 0.02 or number >= 1 << 16:
            break
        number *= 2
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times)


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def bench(inst: Instance, args: argparse.Namespace) -> str:
    """One markdown row: our median time, scipy's, and both answers' quality."""
    k = inst.q.size
    ours_s = median_time(inst.ours, args.repeats)
    x = inst.ours()
    f_ours, r_ours = inst.value(x), inst.residual(x)
    row = [str(k), inst.kind, inst.name, _fmt_time(ours_s), f"{ours_s / k * 1e9:,.0f} ns"]
    if k > args.scipy_max_k:
        return _row(
            row + [f"skipped (K > {args.scipy_max_k})", "-", "-", "-", f"{r_ours:.1e}", "-"]
        )
    notes, runs = [], []
    method, xs, ok, nit = "SLSQP", None, False, 0
    for _ in range(args.scipy_repeats):
        t0 = time.perf_counter()
        xs, ok, nit = scipy_solve(inst, method, args.scipy_cap)
        runs.append(time.perf_counter() - t0)
        if xs is None or not ok:
            break
    if xs is None or not ok:  # SLSQP failed or ran past the cap: fall back to trust-constr
        notes.append(f"SLSQP {'over the cap' if xs is None else 'failed'}")
        method, runs = "trust-constr", []
        t0 = time.perf_counter()
        xs, ok, nit = scipy_solve(inst, method, args.scipy_cap)
        runs.append(time.perf_counter() - t0)
    if xs is None:
        notes.append(f"trust-constr over the cap ({args.scipy_cap:g} s)")
        return _row(row + ["; ".join(notes), "-", "-", "-", f"{r_ours:.1e}", "-"])
    scipy_s = statistics.median(runs)
    f_sp = inst.value(xs)
    gap = (f_sp - f_ours) / max(abs(f_sp), abs(f_ours), 1e-300)  # > 0: ours is better
    label = "; ".join(notes + [f"{method}, {nit} it" + ("" if ok else ", not converged")])
    return _row(
        row
        + [
            label,
            _fmt_time(scipy_s),
            f"{scipy_s / ours_s:,.0f}x",
            f"{gap:+.1e}",
            f"{r_ours:.1e}",
            f"{inst.residual(xs):.1e}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ks",
        type=int,
        nargs="+",
        default=[8, 32, 80, 1024, 65536],
        help="layer counts of the random instances",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=15,
        help="timed batches of our solvers (the median is reported)",
    )
    parser.add_argument(
        "--scipy-repeats",
        type=int,
        default=3,
        help="timed scipy runs per instance (the median is reported)",
    )
    parser.add_argument("--scipy-max-k", type=int, default=1024, help="skip scipy above this K")
    parser.add_argument(
        "--scipy-cap", type=float, default=60.0, help="seconds after which a scipy run is abandoned"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random instances")
    args = parser.parse_args()

    instances = []
    for k in args.ks:
        for kind in ("prune", "allocate"):
            instances.append(random_instance(kind, k, args.seed + k))
    instances += mistral_instances()  # K = 32, sorted in beside the random K = 32 rows
    instances.sort(key=lambda inst: inst.q.size)
    blas = os.environ.get("OPENBLAS_NUM_THREADS")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}"
        f", {platform.machine()}, {os.cpu_count()} CPUs, OPENBLAS_NUM_THREADS={blas}"
    )
    print()
    print(
        "| K | program | instance | ours | ours / K | scipy | scipy time | scipy / ours"
        " | objective gap | residual (ours) | residual (scipy) |"
    )
    print("|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for inst in instances:
        print(bench(inst, args), flush=True)
    print()
    print(
        "objective gap = (F_scipy - F_ours) / max|F|, with F the cost to minimise (the negated"
        " value for allocation): positive means ours is better. residual: |sum n rho - S| /"
        " sum n (pruning) or max(sum c e - B, 0) / B (allocation), plus any bound violation."
    )


if __name__ == "__main__":
    main()
