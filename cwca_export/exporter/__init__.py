"""Export to ONNX artifacts that are verified against torch and measured against a budget.

Modules: ``api`` (:func:`export`, :class:`Artifact`), ``build`` (one candidate artifact),
``search`` (fitting a budget), ``postprocess`` (ORT optimisation, fp16, int8 / int4, layout),
``verify``, ``measure``, ``predict``, ``manifest``, ``session``.

Importing this package stays light, like the top-level one: the measurement subprocess runs
``python -m cwca_export.exporter.measure`` and must not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export": "cwca_export.exporter.api",
    "Artifact": "cwca_export.exporter.api",
    "apply_plan": "cwca_export.compression",
    "ExportSettings": "cwca_export.exporter.build",
    "QuantizeConfig": "cwca_export.exporter.postprocess",
    "MeasureConfig": "cwca_export.exporter.measure",
    "VerificationError": "cwca_export.exporter.verify",
    "BudgetError": "cwca_export.exporter.search",
    "SizePredictor": "cwca_export.exporter.predict",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cwca_export.exporter' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
