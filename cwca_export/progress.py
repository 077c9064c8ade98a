"""Progress bars for the long steps (scoring, compression, refinement, the export search, eval).

One switch for all of them: bars go to stderr, only when stderr is a terminal, and never under
the CLI's ``--quiet`` or ``--json`` (:func:`set_enabled`), so piped output and JSON stay clean.
"""

from __future__ import annotations

import sys
from typing import Any

_state = {"enabled": True}


def set_enabled(enabled: bool) -> None:
    """Turn every progress bar on (still only on a terminal) or off, process-wide."""
    _state["enabled"] = bool(enabled)


def enabled() -> bool:
    """Whether bars may show (the CLI turns them off under ``--quiet`` and ``--json``)."""
    return _state["enabled"]


def bar(iterable: Any = None, *, total: int | None = None, desc: str, unit: str = "it", show: bool = True,
        **kwargs: Any):
    """A tqdm bar on stderr; disabled when ``show`` is false, bars are off, or stderr is not a terminal."""
    from tqdm.auto import tqdm

    # disable=None: tqdm's own test for a terminal
    disable = True if not (show and _state["enabled"]) else None
    kwargs.setdefault("leave", False)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable, **kwargs)
