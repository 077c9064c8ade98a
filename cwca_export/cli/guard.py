"""The output guard every writing verb declares: which parameter is written, which are read.

``@guards_output(...)`` sits under a command's click options and runs
:func:`cwca_export.outputs.check_output` on the parsed values before the command does any
work, so an unsafe ``--out`` fails in a second with one line, not after an hour of scoring.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def guards_output(
    *,
    inputs: dict[str, str],
    out: str = "out",
    flag: str = "--out",
    kind: str = "folder",
    json_types: Iterable[str] = (),
    recognise: Callable[[Path], bool] | None = None,
    overwrite: str | None = "overwrite",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Check parameter ``out`` against the input parameters (name -> what the message calls it)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def guarded(**params: Any) -> Any:
            from cwca_export.outputs import check_output

            if params.get(out) is not None:
                check_output(
                    params[out],
                    inputs=[(label, params.get(name)) for name, label in inputs.items()],
                    overwrite=bool(params.get(overwrite)) if overwrite else False,
                    kind=kind, json_types=json_types, recognise=recognise, flag=flag,
                    refuse_existing=overwrite is not None,  # the verb has --overwrite: say it now
                )
            return command(**params)

        return guarded

    return decorate
