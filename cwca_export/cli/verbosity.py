"""``--verbose`` / ``--quiet`` on every verb: log levels, library chatter, one-line warnings, bars.

The group attaches both flags to every verb it registers (plug-in verbs included), and runs the
verb inside :func:`verbosity`:

- the ``cwca_export`` logger writes to stderr at DEBUG under ``--verbose``, WARNING by default and
  ERROR under ``--quiet``;
- the libraries' own loggers (transformers, optimum, onnxruntime, torch.onnx, accelerate, ...) and
  their Python warnings (tracer warnings, deprecations) are silent unless ``--verbose``;
- a Python warning prints as one ``Warning: <message>`` line, not the default two lines with the
  source code; ``--quiet`` drops warnings too;
- progress bars (:mod:`cwca_export.progress`) are off under ``--quiet`` and ``--json``.

Everything is restored when the verb returns, so a verb run in-process (tests, notebooks) leaves
the interpreter's logging and warnings as it found them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import click

#: loggers of the libraries under the tool: silent (errors only) unless --verbose
LIBRARY_LOGGERS = (
    "transformers", "optimum", "onnxruntime", "onnx", "torch.onnx", "accelerate", "datasets",
    "huggingface_hub", "lm_eval", "onnxscript",
)
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
_state = {"quiet": False, "verbose": False}


def verbosity_options() -> list[click.Option]:
    """The two flags every verb gets."""
    return [
        click.Option(["--verbose", "-v"], is_flag=True,
                     help="Debug logging on stderr, with the libraries' own messages and warnings."),
        click.Option(["--quiet", "-q"], is_flag=True,
                     help="Only results and errors: no warnings, no progress bars."),
    ]


def is_ours(category: type[Warning], filename: str) -> bool:
    """A warning the tool raised (its own category, or issued from its own code) rather than a library's."""
    return category.__module__.split(".")[0] == "cwca_export" or str(filename).startswith(_PACKAGE_DIR)


def warning_line(message: object) -> None:
    """Print ``Warning: <message>`` as one stderr line (nothing under --quiet)."""
    if not _state["quiet"]:
        click.echo(f"Warning: {' '.join(str(message).split())}", err=True)


def note_line(message: str) -> None:
    """Print a status or note line on stderr (what the verb is doing, a hint about its flags);
    nothing under --quiet, which keeps only results and errors."""
    if not _state["quiet"]:
        click.echo(message, err=True)


def _show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001 (the hook's signature)
    if is_ours(category, filename):
        warning_line(message)
    elif _state["verbose"]:
        warning_line(f"{message} [{category.__name__} from {Path(filename).name}:{lineno}]")


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.name}: {record.getMessage()}"


@contextlib.contextmanager
def verbosity(*, verbose: bool = False, quiet: bool = False, machine_output: bool = False) -> Iterator[None]:
    """Run a verb with its logging, warnings and progress settings; all restored on the way out."""
    from cwca_export import progress

    if verbose and quiet:
        raise click.UsageError("--verbose and --quiet contradict each other; pass one of them")
    ours = logging.getLogger("cwca_export")
    handler = logging.StreamHandler(sys.stderr)  # the stderr of this call (a test runner swaps it)
    handler.setFormatter(_Format())
    library_level = logging.INFO if verbose else logging.ERROR
    saved = {
        "state": dict(_state), "bars": progress.enabled(), "level": ours.level, "propagate": ours.propagate,
        "libraries": {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS},
        "env": os.environ.get("TRANSFORMERS_VERBOSITY"),
    }
    _state.update(quiet=quiet, verbose=verbose)
    progress.set_enabled(saved["bars"] and not (quiet or machine_output))
    ours.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
    ours.addHandler(handler)
    ours.propagate = False
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(library_level)
    if saved["env"] is None:  # transformers and optimum reset their level from it when first imported
        os.environ["TRANSFORMERS_VERBOSITY"] = "info" if verbose else "error"
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show
            if quiet:
                warnings.simplefilter("ignore")
            yield
    finally:
        ours.removeHandler(handler)
        ours.setLevel(saved["level"])
        ours.propagate = saved["propagate"]
        for name, level in saved["libraries"].items():
            logging.getLogger(name).setLevel(level)
        if saved["env"] is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
        progress.set_enabled(saved["bars"])
        _state.clear()
        _state.update(saved["state"])
