"""cwca-export: curvature-weighted per-layer compression and budget-verified ONNX export.

Importing the package stays light (NumPy only): torch, transformers and onnxruntime load
when a function that needs them is first used.

Example:
    >>> import cwca_export
    >>> scores = cwca_export.LayerScores("gradnorm", zeta2=[3.0, 1.0], n_params=[10, 10])
    >>> cwca_export.plan_pruning(scores, 0.5).program
    'prune'
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it; resolved on first access (PEP 562)
_LAZY = {
    "LayerScores": "cwca_export.scores",
    "qualities": "cwca_export.scores",
    "Plan": "cwca_export.planning.plan",
    "PlanMismatchError": "cwca_export.planning.plan",
    "plan_pruning": "cwca_export.planning.plan",
    "plan_allocation": "cwca_export.planning.plan",
    "plan_from_damage": "cwca_export.planning.plan",
    "plan_band": "cwca_export.planning.plan",
    "refine_plan": "cwca_export.planning.refine",
    "measure_damage": "cwca_export.planning.damage",
    "solve_pruning": "cwca_export.planning.solver",
    "solve_allocation": "cwca_export.planning.solver",
    "transfer_regret": "cwca_export.planning.solver",
    "find_blocks": "cwca_export.blocks",
    "export": "cwca_export.exporter.api",
    "Artifact": "cwca_export.exporter.api",
    "QuantizeConfig": "cwca_export.exporter.postprocess",
    "Budget": "cwca_export.budget",
    "score": "cwca_export.scoring",
    "compress": "cwca_export.compression",
    "load_compressed": "cwca_export.compression.saving",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cwca_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
