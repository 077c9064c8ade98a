"""Per-block curvature scores zeta2_k (docs/design.md 2.1): ``score(model, data, method=...)``.

Estimators live one concept per module and register by name on import; ``ESTIMATORS`` maps
each name to its entry (:class:`cwca_export.registry.Registry`; plug-ins register under the
entry-point group ``cwca_export.estimators``). The accumulators they share are pure functions in
:mod:`cwca_export.scoring.accumulators`.
"""

from cwca_export.scoring import baselines, exact, fisher, kfac, layerif  # noqa: F401  (registration)
from cwca_export.scoring.api import score
from cwca_export.scoring.registry import ESTIMATORS, Estimate, Estimator, register_estimator

__all__ = ["ESTIMATORS", "Estimate", "Estimator", "register_estimator", "score"]
