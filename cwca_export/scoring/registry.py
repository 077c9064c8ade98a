"""The estimator registry: every curvature estimator registers itself here by name.

``score(method=...)`` looks the name up; nothing branches on method names. Each entry
declares the options it accepts (with defaults), so a typo in an option is an error, and
whether it needs per-sequence gradients or a held-out split. Third-party estimators register
under the entry-point group ``cwca_export.estimators`` (a module that uses
:func:`register_estimator`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cwca_export.registry import Registry

if TYPE_CHECKING:
    from cwca_export.scoring.passes import ScoringRun


@dataclass
class Estimate:
    """What an estimator hands back: per-block scores and every raw statistic it has.

    Attributes:
        zeta2: non-negative score per block.
        stats: other per-block statistics by name (one value per block).
        settings: resolved estimator settings worth recording (e.g. CG iterations).
    """

    zeta2: list[float]
    stats: dict[str, list[float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Estimator:
    """A registered estimator.

    Attributes:
        name: the method name users pass (``fisher``, ``kfac``, ...).
        run: ``run(scoring_run) -> Estimate``.
        options: method-specific options and their defaults.
        per_sequence: needs each sequence's own gradient (the pass splits it from a batch, see
            :mod:`cwca_export.scoring.passes`; batch size 1 where it cannot).
        needs_held_out: needs a held-out split (LayerIF).
        summary: one line for ``--help`` and docs.
        needs_resident: why the estimator cannot run on weights accelerate offloads, or None.
        resumable: every pass hands its accumulators to the run (``state=``), so a checkpoint
            can save them and a resumed run reaches the same scores.
    """

    name: str
    run: Callable[[ScoringRun], Estimate]
    options: dict[str, Any]
    per_sequence: bool
    needs_held_out: bool
    summary: str
    needs_resident: str | None = None
    resumable: bool = False


ESTIMATORS: Registry[Estimator] = Registry(
    "scoring method",
    flag="--estimator",
    group="cwca_export.estimators",
    builtins=(
        "cwca_export.scoring.baselines",
        "cwca_export.scoring.exact",
        "cwca_export.scoring.fisher",
        "cwca_export.scoring.kfac",
        "cwca_export.scoring.layerif",
        # measured damage compresses blocks: it lives in planning and plugs in here
        "cwca_export.planning.damage_score",
    ),
)


def register_estimator(
    name: str,
    *,
    summary: str,
    options: dict[str, Any] | None = None,
    per_sequence: bool = True,
    needs_held_out: bool = False,
    needs_resident: str | None = None,
    resumable: bool = False,
) -> Callable[[Callable[[ScoringRun], Estimate]], Callable[[ScoringRun], Estimate]]:
    """Register ``fn(run) -> Estimate`` under ``name``; duplicate or malformed names are refused.

    Example:
        >>> @register_estimator("ones_demo", summary="every block scores 1")
        ... def _ones(run):
        ...     return Estimate([1.0] * len(run.blocks))
        >>> ESTIMATORS.pop("ones_demo").per_sequence
        True
    """
    ESTIMATORS.check_name(name)

    def decorator(fn: Callable[[ScoringRun], Estimate]) -> Callable[[ScoringRun], Estimate]:
        ESTIMATORS.add(name, Estimator(
            name=name,
            run=fn,
            options=dict(options or {}),
            per_sequence=per_sequence,
            needs_held_out=needs_held_out,
            summary=summary,
            needs_resident=needs_resident,
            resumable=resumable,
        ))
        return fn

    return decorator


def get_estimator(name: str) -> Estimator:
    """The estimator registered as ``name``; an unknown name lists the known ones."""
    return ESTIMATORS.get(name)
