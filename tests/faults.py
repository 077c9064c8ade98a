"""Fault injection for the CLI: exceptions inside the pipeline's stages and a disk that fills up.

A scenario runs one verb in-process over an output that a previous good run left behind,
with one fault patched in. It survives when the run either completes and its output equals
a clean run's, or fails with one error line and leaves the previous output, and the folder
around it, byte-identical. tests/test_fault_injection.py asserts every scenario survives;
benchmarks/bench_reliability.py counts them.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


class InjectedFault(RuntimeError):
    """The exception a patched stage raises (a stand-in for any bug or crash inside it)."""


# ---------------------------------------------------------------- a disk that fills up


class DiskFull:
    """Accepts ``quota`` bytes of writes in all, then fails every write with ENOSPC."""

    def __init__(self, quota: int) -> None:
        self.quota, self.used, self.fired = quota, 0, False

    def take(self, n: int) -> int:
        """How many of ``n`` bytes still fit; marks the disk full when not all do."""
        room = max(0, self.quota - self.used)
        if n > room:
            self.used, self.fired = self.quota, True
            return room
        self.used += n
        return n

    def error(self) -> OSError:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FillingFile:
    """A writable file object whose writes draw on a :class:`DiskFull`."""

    def __init__(self, raw: Any, disk: DiskFull) -> None:
        self._raw, self._disk = raw, disk

    def write(self, data):
        fits = self._disk.take(len(data))
        if fits < len(data):
            if fits:
                self._raw.write(data[:fits])
            raise self._disk.error()
        return self._raw.write(data)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._raw.__exit__(*exc)

    def __iter__(self):
        return iter(self._raw)

    def __getattr__(self, name: str):
        return getattr(self._raw, name)


def _writing(mode: str) -> bool:
    return any(c in mode for c in "wax+")


def fill_disk(monkeypatch: pytest.MonkeyPatch, quota: int) -> DiskFull:
    """Patch every way the pipeline writes files so that the disk is full after ``quota`` bytes.

    Python file objects (open, io.open, os.fdopen, pathlib), shutil copies (their sendfile
    shortcut off) and safetensors' Rust writer (the file is cut at the quota) all draw on it.
    """
    disk = DiskFull(quota)
    real_open, real_fdopen = builtins.open, os.fdopen

    def fake_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if _writing(mode) and not str(file).startswith(("/dev/", "/proc/")):
            return _FillingFile(handle, disk)
        return handle

    def fake_fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        return _FillingFile(handle, disk) if _writing(mode) else handle

    import safetensors.torch
    import transformers.modeling_utils

    real_save = safetensors.torch.save_file

    def fake_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        size = Path(filename).stat().st_size
        fits = disk.take(size)
        if fits < size:
            os.truncate(filename, fits)
            raise disk.error()

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "fdopen", fake_fdopen)
    monkeypatch.setattr(shutil, "_USE_CP_SENDFILE", False)
    monkeypatch.setattr(safetensors.torch, "save_file", fake_save)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fake_save)
    return disk


# ---------------------------------------------------------------- exceptions inside stages


class Trigger:
    """Raise ``error`` on the ``at``-th call of a patched function (1-based); count calls."""

    def __init__(self, error: BaseException, at: int = 1) -> None:
        self.error, self.at, self.calls, self.fired = error, at, 0, False

    def wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def patched(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                self.fired = True
                raise self.error
            return real(*args, **kwargs)

        return patched

    def wrap_generator(self, real: Callable[..., Any]) -> Callable[..., Any]:
        """For a generator method: raise after ``at - 1`` items were yielded."""

        def patched(*args, **kwargs):
            for item in real(*args, **kwargs):
                self.calls += 1
                if self.calls == self.at:
                    self.fired = True
                    raise self.error
                yield item

        return patched


def patch_stage(monkeypatch: pytest.MonkeyPatch, target: str, error: BaseException, *, at: int = 1,
                generator: bool = False) -> Trigger:
    """Make ``module.path:attribute`` raise ``error`` on its ``at``-th call."""
    import importlib

    module_name, _, attr = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = attr.split(".")
    for part in parents:
        owner = getattr(owner, part)
    trigger = Trigger(error, at)
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, trigger.wrap_generator(real) if generator else trigger.wrap(real))
    return trigger


def _parity_fails(monkeypatch: pytest.MonkeyPatch, _reference: Path) -> Trigger:
    """Verification itself runs, but ONNX Runtime's logits come out wrong."""
    from cwca_export.exporter import verify

    trigger = Trigger(InjectedFault("unused"), at=0)
    real = verify._compare

    def wrong(ort, ref):
        trigger.calls += 1
        trigger.fired = True
        return real(ort + 1.0, ref)

    monkeypatch.setattr(verify, "_compare", wrong)
    return trigger


# ---------------------------------------------------------------- the runs


def tree_state(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``path`` (or of ``path`` itself)."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.exists():
        return {}
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "dir"
        for f in sorted(path.rglob("*"))
    }


@dataclass(frozen=True)
class Verb:
    """A verb run over a previous output: its argv (``@out`` is the output, ``@x`` an input)."""

    name: str
    argv: str
    output: str  # the output's name under the work folder
    deterministic: tuple[str, ...]  # files whose bytes a clean rerun reproduces ("." = the file itself)


def overwrite_flag(verb: str) -> list[str]:
    """``--overwrite`` where the verb has one (single-file outputs may gain it)."""
    from cwca_export.cli import cli

    command = cli.commands[verb]
    return ["--overwrite"] if any(p.name == "overwrite" for p in command.params) else []


VERBS = {
    "score": Verb("score", "score @llama --data @calib.txt --samples 2 --seq-len 16 --no-progress --no-wall-time"
              " --out @out", "scores.json", (".",)),
    "plan": Verb("plan", "plan @scores.json --sparsity 0.4 --out @out", "plan.json", (".",)),
    "refine": Verb("refine", "refine @llama --scores @scores.json --sparsity 0.3 --data @calib.txt --samples 2"
               " --seq-len 16 --max-evals 3 --no-tune --method magnitude --out @out", "refined.json", ()),
    "compress": Verb("compress", "compress @llama --plan @plan.json --method magnitude --out @out", "compressed",
                 ("model.safetensors",)),
    "export": Verb("export", "export @llama --backend onnx --runs 1 --warmup 0 --out @out", "artifact", ()),
    "export-int8": Verb("export-int8", "export @llama --backend onnx --quantize int8 --runs 1 --warmup 0 --out @out",
                    "artifact-int8", ()),
    "run": Verb("run", "run @recipe-good.yaml --out @out", "run", ("scores.json", "plan.json")),
    "report": Verb("report", "report @out", "reported", ()),
}


@dataclass(frozen=True)
class Scenario:
    """One fault in one verb: ``inject(monkeypatch, reference)`` patches it in and returns its
    trigger (``reference`` is a clean run's output, for faults placed by its file sizes)."""

    id: str
    verb: str
    inject: Callable[[pytest.MonkeyPatch, Path], Any]


def _raise(target: str, error: BaseException, *, at: int = 1, generator: bool = False):
    return lambda mp, _ref: patch_stage(mp, target, error, at=at, generator=generator)


def _disk(quota: int):
    return lambda mp, _ref: fill_disk(mp, quota)


def _disk_after(*names: str):
    """The disk fills just after the reference's files ``names`` were written."""
    return lambda mp, ref: fill_disk(mp, sum((ref / n).stat().st_size for n in names) + 16)


_KEEP = "cwca_export.compression.methods:_apply_keep"
_LOSSES = "cwca_export.scoring.passes:ScoringRun.losses"

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("score-exception-mid-pass", "score",
             _raise(_LOSSES, InjectedFault("scoring broke"), at=2, generator=True)),
    Scenario("score-out-of-memory", "score", _raise(_LOSSES, MemoryError(), at=1, generator=True)),
    Scenario("score-disk-full-at-once", "score", _disk(0)),
    Scenario("score-disk-full-mid-write", "score", _disk(600)),
    Scenario("plan-solver-exception", "plan",
             _raise("cwca_export.planning.solver:solve_pruning", InjectedFault("solver broke"))),
    Scenario("plan-disk-full-mid-write", "plan", _disk(300)),
    Scenario("refine-exception-mid-search", "refine", _raise(_KEEP, InjectedFault("pruning broke"), at=9)),
    Scenario("refine-disk-full", "refine", _disk(200)),
    Scenario("compress-exception-mid-model", "compress", _raise(_KEEP, InjectedFault("pruning broke"), at=5)),
    Scenario("compress-type-error-in-save", "compress",
             _raise("cwca_export.compression.saving:record_step", TypeError("unexpected None"))),
    Scenario("compress-disk-full-at-once", "compress", _disk(0)),
    Scenario("compress-disk-full-in-weights", "compress", _disk(40_000)),
    Scenario("compress-disk-full-after-weights", "compress",
             _disk_after("config.json", "generation_config.json", "model.safetensors")),  # the tokenizer does not fit
    Scenario("export-backend-exception", "export", _raise("torch.onnx:export", InjectedFault("exporter broke"))),
    Scenario("export-verification-exception", "export",
             _raise("cwca_export.exporter.build:check_parity", InjectedFault("verifier broke"))),
    Scenario("export-verification-mismatch", "export", _parity_fails),
    Scenario("export-measurement-out-of-memory", "export",
             _raise("cwca_export.exporter.build:measure_runtime", MemoryError())),
    Scenario("export-disk-full-at-once", "export", _disk(0)),
    Scenario("export-disk-full-mid-graph", "export", _disk(150_000)),
    Scenario("export-quantization-exception", "export-int8",
             _raise("cwca_export.exporter.postprocess:quantize_int8", InjectedFault("quantizer broke"))),
    Scenario("export-quantization-disk-full", "export-int8", _disk(1_200_000)),
    Scenario("run-exception-in-compress", "run", _raise(_KEEP, InjectedFault("pruning broke"), at=3)),
    Scenario("run-disk-full", "run", _disk(100_000)),
    Scenario("report-disk-full-in-figure", "report", _disk(5_000)),
    Scenario("report-disk-full-after-figure", "report", _disk_after("layers.png")),
    Scenario("report-figure-exception", "report",
             _raise("cwca_export.report:render_figure", InjectedFault("plot broke"))),
)


# ---------------------------------------------------------------- one scenario, judged


@dataclass(frozen=True)
class FaultOutcome:
    """What one scenario did; ``problems`` empty means the user lost nothing."""

    scenario: Scenario
    fired: bool
    exit_code: int
    stderr: str
    problems: tuple[str, ...]
    files_lost: int

    @property
    def survived(self) -> bool:
        return not self.problems


def prepare_previous(world_root: Path, work: Path, verb: Verb) -> Path:
    """A previous good run's output of ``verb`` in the empty folder ``work``; returns its path."""
    from click.testing import CliRunner

    from cwca_export.cli import cli

    out = work / verb.output
    if verb.name == "report":  # the report is written into a folder the user already has
        shutil.copytree(world_root / "report-source", out)
    argv = [_expand(a, world_root, out) for a in verb.argv.split()] + overwrite_flag(verb.name.split("-")[0])
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0, f"the clean run of {verb.name} failed: {result.output}"
    return out


def _expand(arg: str, root: Path, out: Path) -> str:
    if arg == "@out":
        return str(out)
    return str(root / arg[1:]) if arg.startswith("@") else arg


def run_scenario(world_root: Path, work: Path, reference: Path, scenario: Scenario) -> FaultOutcome:
    """Run ``scenario`` over a previous output in ``work`` and judge what is left."""
    from click.testing import CliRunner

    from cwca_export.cli import cli

    verb = VERBS[scenario.verb]
    out = work / verb.output  # the previous output: a copy of a clean run's
    if reference.is_dir():
        shutil.copytree(reference, out)
    else:
        shutil.copyfile(reference, out)
    before, around = tree_state(out), sorted(p.name for p in work.iterdir())
    argv = [_expand(a, world_root, out) for a in verb.argv.split()] + overwrite_flag(verb.name.split("-")[0])
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CWCA_DEBUG", raising=False)
        trigger = scenario.inject(mp, reference)
        result = CliRunner().invoke(cli, argv)
    after = tree_state(out)
    problems = []
    lost = sum(1 for name, digest in before.items() if after.get(name) != digest)
    if result.exit_code == 0:
        expected = tree_state(reference)
        for name in verb.deterministic:
            if after.get(name) != expected.get(name):
                problems.append(f"completed, but {name} differs from a clean run's")
        if not after:
            problems.append("completed without output")
        lost = 0  # a completed run replaces its previous output by design
    else:
        lines = result.stderr.strip().splitlines()  # progress lines may come before the error
        if not lines or not lines[-1].startswith("Error: ") or sum(x.startswith("Error: ") for x in lines) != 1:
            problems.append("no single closing Error: line on stderr")
        if "Traceback" in result.output:
            problems.append("a traceback")
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            problems.append(f"{type(result.exception).__name__} escaped")
        if after != before:
            problems.append(f"previous output changed ({lost} files lost or altered)")
        if sorted(p.name for p in work.iterdir()) != around:
            problems.append(f"debris beside the output: {sorted(p.name for p in work.iterdir())}")
    fired = bool(getattr(trigger, "fired", False))
    if not fired and result.exit_code != 0:
        problems.append("failed without the fault firing")
    return FaultOutcome(scenario, fired, result.exit_code, result.stderr, tuple(problems), lost)
