"""Real signals on real ``python -m cwca_export`` processes: nothing half-written, conventional exit
codes, stale scratch of a killed run cleaned, and ``score --resume`` reaching the uninterrupted scores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import sample_text, save_tiny_model

from cwca_export.cli import cli
from cwca_export.interrupts import Terminated
from cwca_export.scoring.checkpoint import read_checkpoint_header

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
SAMPLES, SEQ_LEN = 48, 64


@pytest.fixture(scope="module", autouse=True)
def sigint_not_ignored():
    """The processes these tests start take SIGINT as a user's Ctrl-C. A test run started in the
    background of a script (``cmd &``) has SIGINT ignored, which its children inherit and keep, as
    they should (docs/reliability.md); here the run itself takes SIGINT for the module's span."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(sample_text() * 6, encoding="utf-8")
    return path


def _start(*args: object, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cwca_export", *map(str, args)], cwd=cwd, env=ENV,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(
                f"the process ended (rc {proc.returncode}) before the moment to signal it: {proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("timed out waiting for the moment to signal")
        time.sleep(0.002)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _score_args(model: Path, calib: Path, method: str, out: Path) -> list[object]:
    return ["score", model, "--data", calib, "--samples", SAMPLES, "--seq-len", SEQ_LEN, "--estimator", method,
            "--no-progress", "--no-wall-time", "--checkpoint-every", 3, "--out", out]


@pytest.mark.parametrize(
    ("method", "sig", "code", "in_pass"),
    [
        ("fisher", signal.SIGTERM, 143, 0),
        ("kfac", signal.SIGINT, 130, 0),  # K-FAC keeps an integer token count beside its tensors
        pytest.param("layerif", signal.SIGTERM, 143, 2, marks=pytest.mark.slow),  # third of three passes
    ],
)
def test_signalled_score_resumes_to_the_uninterrupted_scores(model, calib, tmp_path, method, sig, code, in_pass):
    from cwca_export.scoring import score

    out = tmp_path / "scores.json"
    checkpoint = tmp_path / "scores.json.checkpoint"
    proc = _start(*_score_args(model, calib, method, out), cwd=tmp_path)

    def saved_mid_pass() -> bool:
        header = read_checkpoint_header(checkpoint) if checkpoint.exists() else None
        return header is not None and len(header["passes"]) > in_pass

    _wait_for(proc, saved_mid_pass)
    proc.send_signal(signal.SIGSTOP)  # freeze it mid-run, so the signal cannot come after the end
    header = read_checkpoint_header(checkpoint)
    assert header is not None
    current = header["passes"][-1]
    assert 0 < current["done"] < current["total"]  # a real mid-pass checkpoint, not a finished run
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Interrupted" in err and "Traceback" not in err
    assert not out.exists() and _hidden(tmp_path) == []  # no scores, no temporary file
    assert read_checkpoint_header(checkpoint) is not None  # the last checkpoint survived whole

    resumed = subprocess.run(
        [sys.executable, "-m", "cwca_export", *map(str, _score_args(model, calib, method, out)), "--resume"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert not checkpoint.exists()  # removed once the scores are saved
    # the reference: one uninterrupted run of the same settings, in this process
    reference = score(str(model), str(calib), method=method, num_samples=SAMPLES, seq_len=SEQ_LEN,
                      progress=False, record_wall_time=False)
    got = json.loads(out.read_text())
    assert got["zeta2"] == pytest.approx(reference.zeta2, rel=1e-9, abs=0)
    for name, values in reference.stats.items():
        assert got["stats"][name] == pytest.approx(values, rel=1e-9, abs=1e-12), name
    assert got["tokens"] == reference.tokens and got["samples"] == SAMPLES


def test_resume_refuses_a_checkpoint_of_another_run(model, calib, tmp_path):
    out = tmp_path / "scores.json"
    args = ["score", str(model), "--data", str(calib), "--samples", 6, "--seq-len", 32, "--no-progress",
            "--checkpoint-every", 2, "--out", str(out)]
    from cwca_export.scoring.checkpoint import ScoreCheckpoint

    ScoreCheckpoint(tmp_path / "scores.json.checkpoint", 2, {"method": "other"}, resume=False).save()
    result = CliRunner().invoke(cli, [*map(str, args), "--resume"])
    assert result.exit_code == 1
    assert "a checkpoint of another run" in result.output and len(result.output.strip().splitlines()) == 1
    (tmp_path / "scores.json.checkpoint").write_text("my notes")
    result = CliRunner().invoke(cli, [*map(str, args)])
    assert result.exit_code == 2 and "not a checkpoint cwca-export wrote" in result.output
    assert (tmp_path / "scores.json.checkpoint").read_text() == "my notes"


def test_exact_cannot_checkpoint(model, calib, tmp_path):
    result = CliRunner().invoke(cli, ["score", str(model), "--data", str(calib), "--samples", "2", "--seq-len", "16",
                                      "--method", "exact", "--checkpoint-every", "1",
                                      "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 1 and "cannot be checkpointed" in result.output and "--checkpoint-every" in result.output


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".partial")]


def test_sigterm_export_leaves_no_partial_folder(model, tmp_path):
    proc = _start("export", model, "--out", "art", "--backend", "onnx", "--runs", 1, "--warmup", 0, cwd=tmp_path)
    _wait_for(proc, lambda: bool(_partials(tmp_path)))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the artifact nor a hidden partial


def test_sigint_run_leaves_no_partial_folder(model, calib, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(model), "data": str(calib), "samples": 4, "seq_len": 16, "score": {"method": "gradnorm"},
        "plan": {"program": "prune", "sparsity": 0.5}, "compress": {"method": "magnitude"},
        "export": {"backend": "onnx"},
    }))
    proc = _start("run", recipe, "--out", "run-out", cwd=tmp_path)
    _wait_for(proc, lambda: any((p / "scores.json").exists() for p in _partials(tmp_path)))  # mid-pipeline
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_sigkill_leaves_a_partial_that_the_next_run_cleans(model, calib, tmp_path):
    proc = _start("export", model, "--out", "art", "--backend", "onnx", "--runs", 1, "--warmup", 0, cwd=tmp_path)
    _wait_for(proc, lambda: bool(_partials(tmp_path)))
    proc.kill()  # SIGKILL: no handler runs, the partial folder stays
    proc.communicate(timeout=60)
    (stale,) = _partials(tmp_path)
    assert f"-{proc.pid}-" in stale.name
    # a live process's partial and a look-alike the user made are not the tool's to clean
    from cwca_export.scratch import HOST_TAG

    live = tmp_path / f".art.cwca-{HOST_TAG}-{os.getpid()}-abc.partial"
    live.mkdir()
    users = tmp_path / ".art.backup.partial"
    users.mkdir()
    scores = tmp_path / "scores.json"
    done = subprocess.run([sys.executable, "-m", "cwca_export", "score", str(model), "--data", str(calib),
                           "--samples", "2", "--seq-len", "16", "--no-progress", "--out", str(scores)],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not stale.exists() and live.is_dir() and users.is_dir()


def test_sigterm_demo_leaves_no_half_built_folder(tmp_path):
    proc = _start("demo", "--out", "demo", cwd=tmp_path)
    # the demo makes its folder first, then measures damage for a while: signal it mid-step
    _wait_for(proc, lambda: (tmp_path / "demo").is_dir())
    time.sleep(3)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sigint_demo_overwrite_puts_the_earlier_demo_back(tmp_path):
    """--overwrite moves the earlier demo aside; interrupted, the new one goes and the old returns."""
    from cwca_export.outputs import write_inventory

    old = tmp_path / "demo"
    old.mkdir()
    (old / "report.json").write_text('{"rows": {}}\n')
    write_inventory(old)  # the tool's own earlier output, so --overwrite may replace it
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    proc = _start("demo", "--out", "demo", "--overwrite", cwd=tmp_path)
    _wait_for(proc, lambda: (tmp_path / "demo").is_dir() and not (tmp_path / "demo" / "report.json").exists())
    time.sleep(3)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before


@pytest.mark.parametrize(("interrupt", "code"), [(KeyboardInterrupt, 130), (lambda: Terminated("sig 15"), 143)])
def test_an_error_raised_while_unwinding_from_a_signal_still_exits_as_interrupted(interrupt, code):
    """A signal that lands inside torch.func can make its cleanup fail with a RuntimeError of its
    own (seen once in CI: functorch's layer-stack assertion). The run was interrupted: exit 128 +
    the signal, one line, no traceback; an error without an interrupt behind it stays an error."""
    import click
    from click.testing import CliRunner

    from cwca_export.cli import cli

    @click.command("boom")
    @click.option("--interrupted/--plain", default=True)
    def boom(interrupted):
        try:
            if interrupted:
                raise interrupt()
        finally:
            raise RuntimeError("!dynamicLayerStack.empty() INTERNAL ASSERT FAILED")

    cli.add_command(boom)
    try:
        result = CliRunner().invoke(cli, ["boom"])
        assert result.exit_code == code, result.output
        assert "Interrupted" in result.output and "Traceback" not in result.output
        plain = CliRunner().invoke(cli, ["boom", "--plain"])
        assert plain.exit_code == 1 and "RuntimeError" in plain.output
    finally:
        cli.commands.pop("boom", None)


@pytest.mark.parametrize(("raised", "sent", "code"), [("KeyboardInterrupt", "SIGINT", 130),
                                                       ("Terminated", "SIGTERM", 143)])
def test_a_signal_while_the_interrupted_cli_exits_changes_nothing(tmp_path, raised, sent, code):
    """Once an interrupt is cleaned up after and reported, a further signal while the process
    exits (here from an atexit handler) neither prints a traceback nor replaces the exit status
    (seen once in CI: an interrupted demo printed its line and then died of SIGINT, -2)."""
    script = tmp_path / "late.py"
    script.write_text(f"""
import atexit, os, signal, time
import click
from cwca_export.cli import cli, main
from cwca_export.interrupts import Terminated

@click.command("boom")
def boom():
    raise {raised}() if "{raised}" == "KeyboardInterrupt" else Terminated("sig 15")

cli.add_command(boom)
atexit.register(lambda: (os.kill(os.getpid(), signal.{sent}), time.sleep(0.3)))
main(["boom"])
""")
    done = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr
    assert "Interrupted" in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("entry", ["-m", "script"])
def test_an_interrupt_inside_string_exec_code_still_exits_130(tmp_path, entry):
    """A SIGINT that lands in code run by exec/eval of a string (dataclasses and namedtuples are
    built so, during imports) makes CPython note an unhandled KeyboardInterrupt; ``python -m``
    then killed itself with SIGINT after the CLI's clean exit 130 (the interrupted demo's -2 in
    CI, interrupts.settle_interrupted_exit). A real signal, through the real entry point."""
    module = tmp_path / "inexec.py"
    module.write_text("""
import click
from cwca_export.cli import cli, main

@click.command("wait")
def wait():
    exec("import sys, time\\nprint('ready', flush=True)\\ntime.sleep(60)")

cli.add_command(wait)
main(["wait"])
""")
    args = ["-m", "inexec"] if entry == "-m" else [str(module)]
    proc = subprocess.Popen([sys.executable, *args, "wait"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, "PYTHONPATH": f"{ROOT}:{tmp_path}"})
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Interrupted (SIGINT)" in err and "Traceback" not in err, err


@pytest.mark.parametrize("other_thread", [False, True])
@pytest.mark.parametrize("held", [True, False])
def test_a_signal_during_a_held_import_acts_once_the_module_is_whole(tmp_path, held, other_thread):
    """torch's C initialisation swallows exceptions from what it imports, KeyboardInterrupt
    included (a Ctrl-C in the first half-second ended in an unrelated ImportError, exit 1):
    interrupts.import_whole holds the signal until the module is imported, then it acts. Also with
    another thread running that does not block signals (OpenBLAS's, once NumPy is imported): a
    signal mask on the main thread alone let the kernel hand the signal to it, and the interrupt
    landed mid-import anyway."""
    (tmp_path / "swallowing.py").write_text("""
import os, signal, time
try:
    os.kill(os.getpid(), signal.SIGINT)  # unheld, the interrupt lands here
    time.sleep(0.2)
except BaseException:
    pass  # what torch's initialisation does with an error from its own imports
whole = True
""")
    importer = "import_whole('swallowing')" if held else "import swallowing"
    (tmp_path / "runner.py").write_text(f"""
import sys, threading, time
from cwca_export.interrupts import import_whole
if {other_thread}:
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
try:
    {importer}
    print("no interrupt", sys.modules["swallowing"].whole)
except KeyboardInterrupt:
    print("interrupted after import:", sys.modules["swallowing"].whole)
""")
    done = subprocess.run([sys.executable, "runner.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**ENV, "PYTHONPATH": f"{ROOT}:{tmp_path}"})
    expected = "interrupted after import: True" if held else "no interrupt True"
    assert done.stdout.strip() == expected, done.stderr


def test_the_verbs_that_hold_signals_over_torchs_import_are_registered():
    from cwca_export.cli import TORCH_VERBS

    assert set(cli.commands) >= TORCH_VERBS


_SIGNAL_ON_IMPORT = """
import os, runpy, signal, sys, atexit

class SignalOnImport:  # the signal lands the moment {module!r} starts importing
    fired = False
    def find_spec(self, name, path=None, target=None):
        if name == {module!r} and not SignalOnImport.fired:
            SignalOnImport.fired = True
            os.kill(os.getpid(), signal.{sig})
        return None

sys.meta_path.insert(0, SignalOnImport())
atexit.register(lambda: print("whole:", {whole!r} in sys.modules, flush=True))
sys.argv = ["cwca-export", *sys.argv[1:]]
runpy.run_module("cwca_export", run_name="__main__", alter_sys=True)
"""


_CONSOLE_SCRIPT = _SIGNAL_ON_IMPORT.replace(
    'runpy.run_module("cwca_export", run_name="__main__", alter_sys=True)',
    # what the installed ``cwca-export`` script runs: its entry point, loaded as pip's wrapper does
    'from importlib.metadata import entry_points\n'
    'sys.exit(entry_points(group="console_scripts")["cwca-export"].load()())')


def _signalled_while_importing(tmp_path, module, sig, code, args, *,
                               whole="transformers.models.auto.modeling_auto", runner=_SIGNAL_ON_IMPORT):
    """Run the CLI (``runner``: ``python -m`` by default) with ``args``, ``sig`` sent to itself while
    ``module`` imports: it must exit ``code`` with the one line, and ``whole`` (unless None) be
    imported by then."""
    (tmp_path / "runner.py").write_text(runner.format(module=module, sig=sig, whole=whole or ""))
    done = subprocess.run([sys.executable, "runner.py", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=240, env=ENV)
    assert done.returncode == code, done.stderr
    assert done.stderr.strip() == f"Interrupted ({sig}): stopped; no partial output was left", done.stderr
    if whole:
        assert done.stdout.strip() == "whole: True"


@pytest.mark.parametrize("runner", [_SIGNAL_ON_IMPORT, _CONSOLE_SCRIPT], ids=["python -m", "console script"])
@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_while_the_verbs_import_exits_as_interrupted(tmp_path, runner, sig, code):
    """``python -m cwca_export`` or the ``cwca-export`` console script interrupted while it imports
    its verbs, before the CLI runs: a SIGINT printed a traceback and the process died of it (-2; 1
    of 27 ``python -m`` runs signalled in the first 2 s), a SIGTERM killed it (-15). The console
    script's entry point (``cwca_export.cli:main`` before) was only reached once they had imported.
    Now the same exit and one line as any other interrupt."""
    _signalled_while_importing(tmp_path, "cwca_export.cli.score", sig, code, ["plan", "--help"], whole=None,
                               runner=runner)


def test_a_signal_while_transformers_imports_acts_once_it_is_whole(model, calib, tmp_path):
    """A SIGINT in transformers' model-class imports (torch._dynamo, scikit-learn, SciPy), after
    torch's: unheld it broke NumPy's lazy submodules half-way and a compress run ended in "Could
    not import module 'GenerationMixin'" (exit 1, 2 of 3 runs signalled 0.3-1.2 s in). Held, the
    stack is imported whole, then the run stops as interrupted."""
    _signalled_while_importing(tmp_path, "sklearn", "SIGINT", 130,
                               ["score", str(model), "--data", str(calib), "--out", str(tmp_path / "s.json")])
    assert not (tmp_path / "s.json").exists()


def test_a_signal_while_a_verbs_options_import_torch_acts_once_it_is_whole(model, calib, tmp_path):
    """``--method`` converts by importing the compression registry, torch and transformers with it,
    while click parses the verb's options, before the verb runs: a SIGTERM there (0.3 s into a
    compress) ended in "Could not import module 'GenerationMixin'", exit 1. Held there too."""
    from compress_plans import make_plan
    from transformers import AutoModelForCausalLM

    make_plan(AutoModelForCausalLM.from_pretrained(model), "prune", [0.3, 0.5]).save(tmp_path / "plan.json")
    _signalled_while_importing(tmp_path, "torch", "SIGTERM", 143,
                               ["compress", str(model), "--plan", "plan.json", "--method", "wanda", "--data",
                                str(calib), "--samples", "2", "--seq-len", "32", "--out", "small"])
    assert not (tmp_path / "small").exists()


@pytest.mark.parametrize("sent", ["SIGINT", "SIGTERM"])
def test_a_signal_as_a_finished_run_exits_keeps_its_status(model, tmp_path, sent):
    """A run that finished (its outputs whole) and is signalled while it exits: a SIGTERM in
    interpreter shutdown, which restores the default action, killed a finished report (-15);
    in an atexit handler either signal printed a traceback. The run's own status stands."""
    script = tmp_path / "finished.py"
    script.write_text(f"""
import atexit, os, signal, time
from cwca_export.cli import main
atexit.register(lambda: (os.kill(os.getpid(), signal.{sent}), time.sleep(0.3)))
main(["inspect", {str(model)!r}])
""")
    done = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "blocks: 2" in done.stdout, done.stderr


def test_a_signal_while_inspect_imports_acts_once_its_libraries_are_whole(model, tmp_path):
    """``inspect`` of a model folder imports torch and transformers too (not one of the torch
    verbs): a SIGTERM 0.34 s in broke NumPy half-way (RecursionError, exit 1). Held as theirs are."""
    _signalled_while_importing(tmp_path, "torch", "SIGTERM", 143, ["inspect", str(model)])


@pytest.mark.parametrize(("interrupt", "code"), [(KeyboardInterrupt, 130), (lambda: Terminated("sig 15"), 143)])
def test_debug_mode_shows_where_an_interrupt_landed_and_still_exits_as_interrupted(monkeypatch, interrupt, code):
    """CWCA_DEBUG=1: the interrupt's traceback, then the usual line and exit (re-raised, click
    turned a KeyboardInterrupt into "Aborted!" and exit 1)."""
    import click

    @click.command("landed")
    def landed():
        raise interrupt()

    monkeypatch.setenv("CWCA_DEBUG", "1")
    cli.add_command(landed)
    try:
        result = CliRunner().invoke(cli, ["landed"])
    finally:
        cli.commands.pop("landed", None)
    assert result.exit_code == code, result.output
    assert "Traceback" in result.output and "in landed" in result.output and "Aborted" not in result.output
    assert result.output.rstrip().endswith("stopped; no partial output was left")
