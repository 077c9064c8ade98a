"""``damage``: measured single-block damage as a score (no curvature model).

zeta2_k = max(D_k(at), 0), D_k(p) the calibration-loss increase of compressing block k alone
at probe point p with ``pruner`` (see :mod:`cwca_export.planning.damage`); every probe point's D_k is
recorded as ``damage@p`` so a planner can read whole curves back with
:func:`cwca_export.planning.plan.damage_curves`. Option ``max_cache`` (a size, ``score --max-cache``)
caps the cached block inputs; over it the probes run in several dense passes, same scores.

It lives with the planning stage because it compresses blocks to measure them; the scoring
registry loads it as a built-in plug-in (by module name, like an entry point), so the scoring
package imports nothing from later stages.
"""

from __future__ import annotations

import math

from cwca_export.planning.damage import measure_damage, parse_points
from cwca_export.scoring.passes import ScoringRun
from cwca_export.scoring.registry import Estimate, register_estimator


@register_estimator(
    "damage",
    summary="measured loss increase of compressing each block alone (forward probes only)",
    options={"pruner": "wanda", "points": "0.3,0.5,0.7,0.9", "at": 0.5, "max_cache": None},
    per_sequence=False,
    needs_resident="it deep-copies and compresses each block, and a copy of an offloaded block has no weights",
)
def damage(run: ScoringRun) -> Estimate:
    pruner = str(run.options["pruner"])
    points = parse_points(run.options["points"])
    try:
        at = float(run.options["at"])
    except (TypeError, ValueError):
        raise ValueError(f"damage option at={run.options['at']!r}: expected a number") from None
    if not any(math.isclose(at, p, rel_tol=1e-9, abs_tol=1e-12) for p in points):
        raise ValueError(f"damage option at={at:g} must be one of the probe points {points}")
    max_cache = run.options.get("max_cache")
    if max_cache is not None:
        from cwca_export.budget import parse_size

        try:
            max_cache = parse_size(max_cache if isinstance(max_cache, int) else str(max_cache))
        except ValueError as err:
            raise ValueError(f"damage option max_cache: {err}") from None
    with run.accelerator.autocast():
        curves = measure_damage(
            run.model,
            run.calibration,
            method=pruner,
            points=points,
            batch_size=run.batch_size,
            progress=run.progress and run.accelerator.is_main_process,
            reduce=run.reduce_sum if run.accelerator.num_processes > 1 else None,
            max_cache=max_cache,
        )
    run.passes += int(run.calibration.shape[0])  # the dense pass; probes are in the settings
    return Estimate(
        zeta2=[max(v, 0.0) for v in curves.at(at)],
        stats=curves.stats(),
        settings=curves.settings(),
    )
