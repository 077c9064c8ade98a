"""SIGINT and SIGTERM as exceptions, so an interrupted run unwinds and cleans up like a failed one.

Python already turns SIGINT into ``KeyboardInterrupt``; :func:`install_handlers` makes SIGTERM
raise :class:`Terminated`. Both derive from ``BaseException`` only, so a library's
``except Exception`` cannot swallow them, while every ``finally`` and ``with`` block on the
way out runs: scratch folders and temporary files are removed and outputs stay absent or
whole. The CLI exits with the shell's codes, 128 + the signal number (130 and 143).
:func:`deferred_signals` holds both signals over the few renames that must not be split.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import NoReturn

EXIT_SIGINT = 128 + int(signal.SIGINT)  # 130
EXIT_SIGTERM = 128 + int(signal.SIGTERM)  # 143
_HELD = {signal.SIGINT, signal.SIGTERM}


class Terminated(BaseException):
    """SIGTERM arrived; raised wherever the main thread was, like ``KeyboardInterrupt``."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"terminated by signal {signum}")


def install_handlers() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (a no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def settle_interrupted_exit() -> None:
    """Make the exit status the CLI decided (130 / 143 for a cleaned-up, reported interrupt) the process's own.

    Two things could still replace it. Called once, from the CLI's entry point, on the way out:

    * a further SIGINT / SIGTERM while the process exits (atexit handlers, interpreter shutdown,
      which restores the default action that kills): both are ignored from here on (main thread);
    * CPython itself. When a ``KeyboardInterrupt`` leaves code run by ``exec`` or ``eval`` of a
      *string* (dataclasses and namedtuples are built that way, so a SIGINT during imports often
      lands there), the interpreter notes an "unhandled" interrupt, even though the CLI catches it
      further up. ``python -m`` then ends by killing itself with SIGINT, exit -2 instead of 130
      (cpython bpo-1054041 / bpo-41602; the cause of the interrupted-demo test's rare CI failures
      since the second session). A string ``exec`` that completes resets that note.
    """
    if threading.current_thread() is threading.main_thread():
        for signum in _HELD:
            signal.signal(signum, signal.SIG_IGN)
    exec("")  # noqa: S102 - an empty string: resets CPython's unhandled-KeyboardInterrupt flag


def exit_code(exc: BaseException) -> int | None:
    """The conventional exit status for an interrupt, or None for any other exception."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_SIGINT
    if isinstance(exc, Terminated):
        return EXIT_SIGTERM
    return None


def interrupt_cause(exc: BaseException) -> BaseException | None:
    """The interrupt an exception was raised while unwinding from, if any.

    A signal can land inside a library's C++-backed context (torch.func's transforms keep a
    stack of layers); its cleanup may then fail with an error of its own, which replaces the
    ``KeyboardInterrupt`` / :class:`Terminated` and carries it as ``__context__``. The run was
    still interrupted by the user and exits as such."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if exit_code(current) is not None:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the body runs; a signal that came meanwhile acts after it.

    Held by handlers that only note the signal, not by the main thread's signal mask: the kernel
    hands a process-directed signal to any thread that does not block it, and threads started
    before (OpenBLAS's, started when NumPy first imports, here while click converts a verb's
    options) do not; CPython then raised the interrupt in the main thread mid-body regardless."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: noted.append(signum)) for signum in _HELD}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if noted:
            signal.raise_signal(noted[0])  # acts now, as the restored handler says


# what the verbs that load models import first, whole (import_whole): torch, then transformers'
# model classes, which pull in torch._dynamo, scikit-learn and SciPy (about 3 s on 2 cores). A SIGINT
# landing in that second stack broke NumPy's lazy submodules half-way and surfaced as "Could not import
# module 'GenerationMixin'" (RecursionError inside), exit 1: 2 of 3 compress runs signalled 0.3-1.2 s in
HEAVY_IMPORTS = ("torch", "transformers.models.auto.modeling_auto")


def import_whole(*modules: str) -> None:
    """Import ``modules`` with SIGINT / SIGTERM held until they are done (a signal then acts right after).

    torch's import does not survive a signal half-way. Measured on ``python -m cwca_export demo``
    with SIGINT sent 0.25-0.7 s after start: torch's C initialisation imports NumPy and drops any
    exception from it, KeyboardInterrupt included, which ended in an unrelated ImportError from
    transformers (exit 1, 4 of 60 runs); or a KeyboardInterrupt inside its pybind11 code aborted
    the process (SIGABRT). Held over the import, the signal acts as soon as torch is whole.
    """
    import importlib

    with deferred_signals():
        for module in modules:
            importlib.import_module(module)


def exit_interrupted(exc: BaseException) -> NoReturn:
    """Exit as an interrupt the CLI's own handling never saw asks (130 / 143), with its one line.

    For a signal that lands before the CLI runs (``python -m cwca_export`` importing its verbs)."""
    import sys

    settle_interrupted_exit()  # first: a second signal must not cut the line or the exit
    signal_name = "SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM"
    sys.stderr.write(f"Interrupted ({signal_name}): stopped; no partial output was left\n")
    sys.exit(exit_code(exc))

