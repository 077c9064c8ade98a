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

OVERWRITE_HELP = (
    "Replace an existing --out folder, atomically, only when it is exactly what cwca-export wrote there: every"
    " file as its cwca_files.json / cwca_manifest.json records it (sha256), none added or edited; otherwise"
    " refuse, naming the file that differs (move it out, or pass another --out). A folder from an older"
    " cwca-export, without a content stamp, is refused likewise (move it away)."
)


class FiniteFloat(click.FloatRange):
    """A float that is finite (not nan, not inf) and, optionally, within a range."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv

    def _describe_range(self) -> str:
        # click describes a range with neither bound as "x<=None" in --help; there is none to show
        if self.min is None and self.max is None:
            return ""
        return super()._describe_range()


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


class LatencyLimit(click.ParamType):
    """Milliseconds (finite, > 0) or a peer's name (``int8``: as fast as the model's plain
    dynamic int8 export, measured on this machine)."""

    name = "ms|int8"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from cwca_export.budget import LATENCY_PEERS

        if isinstance(value, str) and value.strip().lower() in LATENCY_PEERS:
            return value.strip().lower()
        try:
            return finite(0, min_open=True).convert(value, param, ctx)
        except click.BadParameter:
            self.fail(f"{value!r}: give milliseconds (a positive number) or {' or '.join(LATENCY_PEERS)}", param, ctx)


LATENCY_LIMIT = LatencyLimit()


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


class DtypeChoice(click.Choice):
    """``--dtype`` on every verb: ``float32 | bfloat16 | float16`` (one vocabulary).

    The artifact spellings ``fp32`` / ``fp16`` that ``export`` used to take still parse, with a
    one-line deprecation warning, as ``float32`` / ``float16``.
    """

    name = "dtype"
    ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

    def __init__(self) -> None:
        from cwca_export.dtypes import DTYPE_NAMES

        super().__init__(list(DTYPE_NAMES))

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value in self.ALIASES:
            from cwca_export.cli.verbosity import warning_line

            warning_line(f"--dtype {value} is deprecated; pass --dtype {self.ALIASES[value]}")
            value = self.ALIASES[value]
        return super().convert(value, param, ctx)


DTYPE = DtypeChoice()


class RegisteredName(click.ParamType):
    """A name looked up in a registry (estimators or compression methods), plug-ins included.

    The lookup happens when the flag is parsed, not at ``--help``, so help stays free of torch;
    an unknown name is click's one-line error listing the registered names.
    """

    name = "name"

    def __init__(self, registry: str) -> None:
        self.registry = registry  # "module:ATTRIBUTE" of the Registry

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        import importlib

        module, _, attribute = self.registry.partition(":")
        registry = getattr(importlib.import_module(module), attribute)
        if value not in registry.names():
            self.fail(f"{value!r} is not one of: {', '.join(registry.names())}", param, ctx)
        return value


ESTIMATOR = RegisteredName("cwca_export.scoring.registry:ESTIMATORS")
METHOD = RegisteredName("cwca_export.compression.registry:METHODS")


def deprecated_alias(old: str, new: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A callback for a hidden old flag: one warning line naming the new flag when it is used."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value not in (None, False, ()):
            from cwca_export.cli.verbosity import warning_line

            warning_line(f"{old} is deprecated; pass {new}")
        return value

    return callback
