"""Parameter types and options shared by the verbs: counts >= 1, finite numbers, loading flags.

click's own ``FloatRange`` lets NaN through (every comparison with NaN is false), and a
zero batch size or run count only fails deep inside a pass; these types refuse both at the
flag, in click's one-line form that names the option.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import click

COUNT = click.IntRange(min=1)  # samples, sequence lengths, batch sizes, runs


class FiniteFloat(click.FloatRange):
    """A float that is finite (not nan, not inf) and, optionally, within a range."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


def finite(
    min: float | None = None,
    max: float | None = None,
    *,
    min_open: bool = False,
    max_open: bool = False,
) -> FiniteFloat:
    """A finite float option type, e.g. ``finite(0, 1, max_open=True)`` for a sparsity."""
    return FiniteFloat(min, max, min_open=min_open, max_open=max_open)


class Size(click.ParamType):
    """A byte size such as ``1.5GiB``, ``300MB`` or ``4096`` (see :func:`cwca_export.budget.parse_size`)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from cwca_export.budget import parse_size

        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = Size()


def loading_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--trust-remote-code`` and ``--allow-pickle``, for every verb that reads a model folder."""
    command = click.option(
        "--allow-pickle",
        is_flag=True,
        help="Accept pickle weights (.bin, .pt, .pth, .ckpt) in a folder without safetensors;"
        " unpickling can run code, so only for files you trust.",
    )(command)
    return click.option(
        "--trust-remote-code",
        is_flag=True,
        help="Allow the model folder's own Python code (auto_map in its config); off by default.",
    )(command)
