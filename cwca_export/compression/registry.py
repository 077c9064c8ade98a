"""The compression-method registry: every method registers itself here by name.

``compress(method=...)`` looks the name up; nothing branches on method names. Each entry
declares which plan program it reads (pruning ratios or capacity units), the options it
accepts with their defaults (a typo in an option is an error), and the per-Linear input
statistic it needs from calibration data, if any. Third-party methods register under the
entry-point group ``cwca_export.methods`` (a module that uses :func:`register_method`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from cwca_export.blocks import Block
from cwca_export.registry import Registry


@dataclass
class BlockJob:
    """What a method's handler gets for one decoder block.

    Attributes:
        block: the block (its module is on the working device).
        target: the plan's value for the block: rho_k (``prune``) or units e_k (``allocate``).
        stats: finalized statistic per Linear, keyed by path relative to the block
            (e.g. ``"mlp.down_proj"``); None for data-free methods.
        options: the method's resolved options.
    """

    block: Block
    target: float
    stats: dict[str, torch.Tensor] | None
    options: dict[str, Any]

    def relative(self, path: str) -> str:
        """A Linear's path relative to the block: ``model.layers.3.mlp.up`` -> ``mlp.up``."""
        return path[len(self.block.name) + 1 :]


@dataclass(frozen=True)
class CompressionMethod:
    """A registered compression method.

    Attributes:
        name: what users pass (``magnitude``, ``wanda``, ...).
        program: the plan program it reads, ``"prune"`` (rho_k) or ``"allocate"`` (units).
        apply_block: ``apply_block(job) -> report row`` compresses one block in place.
        options: accepted options and their defaults.
        statistic: ``statistic(options) -> name or None``: the per-Linear input statistic
            (see :data:`cwca_export.compression.stats.STATISTICS`) the method needs.
        finish: optional ``finish(model, options) -> report`` run once after all blocks
            (e.g. pruning ``lm_head`` when asked).
        prepare: optional ``prepare(options, plan) -> options`` that validates the resolved
            options and fills plan-dependent ones, before any block is touched.
        summary: one line for ``--help`` and docs.
        dense_storage: the method only writes zeros into dense tensors (unstructured, N:M):
            ONNX Runtime stores and runs them dense, so it changes no artifact bytes or latency.
    """

    name: str
    program: str
    apply_block: Callable[[BlockJob], dict[str, Any]]
    options: dict[str, Any]
    statistic: Callable[[Mapping[str, Any]], str | None]
    finish: Callable[[torch.nn.Module, Mapping[str, Any]], dict[str, Any]] | None
    prepare: Callable[[dict[str, Any], Any], dict[str, Any]] | None
    summary: str
    dense_storage: bool = False

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overridden by ``given``; an unknown option names the accepted ones."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise ValueError(
                f"method {self.name!r} does not take option(s) {unknown};"
                f" it takes {sorted(self.options)}"
            )
        return {**self.options, **given}


METHODS: Registry[CompressionMethod] = Registry(
    "compression method",
    flag="--method",
    group="cwca_export.methods",
    builtins=("cwca_export.compression.methods",),
)


def register_method(
    name: str,
    *,
    program: str,
    summary: str,
    options: Mapping[str, Any] | None = None,
    statistic: str | None | Callable[[Mapping[str, Any]], str | None] = None,
    finish: Callable[[torch.nn.Module, Mapping[str, Any]], dict[str, Any]] | None = None,
    prepare: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None,
    dense_storage: bool = False,
) -> Callable[[Callable[[BlockJob], dict[str, Any]]], Callable[[BlockJob], dict[str, Any]]]:
    """Register ``apply_block(job) -> report row`` under ``name``.

    Duplicate or malformed names and unknown programs are refused.

    Example:
        >>> @register_method("noop_demo", program="prune", summary="leaves every block as is")
        ... def _noop(job):
        ...     return {"index": job.block.index}
        >>> METHODS.pop("noop_demo").program
        'prune'
    """
    METHODS.check_name(name)
    if program not in ("prune", "allocate"):
        raise ValueError(f"method {name!r}: program must be 'prune' or 'allocate', got {program!r}")
    needs = statistic if callable(statistic) else (lambda _options, fixed=statistic: fixed)

    def decorator(fn: Callable[[BlockJob], dict[str, Any]]) -> Callable[[BlockJob], dict[str, Any]]:
        METHODS.add(name, CompressionMethod(
            name=name,
            program=program,
            apply_block=fn,
            options=dict(options or {}),
            statistic=needs,
            finish=finish,
            prepare=prepare,
            summary=summary,
            dense_storage=dense_storage,
        ))
        return fn

    return decorator


def get_method(name: str) -> CompressionMethod:
    """The method registered as ``name``; an unknown name lists the known ones."""
    return METHODS.get(name)
