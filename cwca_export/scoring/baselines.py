"""Baselines that use no curvature: ``owl`` (outlier ratios) and ``uniform`` (equal scores).

OWL (Yin et al., 2023) gives blocks with more activation-weighted outliers less sparsity; its
outlier ratio is the fraction of Wanda metrics |W_ij| * ||X_j|| above ``owl_threshold`` times
their mean, pooled over the block's Linears. It needs a forward pass only.
"""

from __future__ import annotations

from cwca_export.blocks import weight_out_in
from cwca_export.scoring.accumulators import (
    accumulate_input_norms,
    finalize_owl_ratio,
    make_empty_input_norms,
)
from cwca_export.scoring.passes import ScoringRun
from cwca_export.scoring.registry import Estimate, register_estimator


@register_estimator(
    "owl",
    summary="OWL outlier ratio of the Wanda metric |W| * ||X|| (forward only)",
    options={"owl_threshold": 5.0},
    per_sequence=False,
    resumable=True,
)
def owl(run: ScoringRun) -> Estimate:
    norms = [
        {name: make_empty_input_norms(weight_out_in(m).shape[1], run.device) for name, m in block.linears.items()}
        for block in run.blocks
    ]
    run.forward_pass(
        on_input=lambda k, name, a: accumulate_input_norms(norms[k][name], a.to(run.device)),
        desc="scoring: input norms",
        state=norms,
    )
    run.reduce_sum([x for block in norms for x in block.values()])
    threshold = float(run.options["owl_threshold"])
    ratios = [
        finalize_owl_ratio(
            [run.weight(m).to(run.device) for m in block.linears.values()],
            list(norms[block.index].values()),
            run.num_samples,
            threshold,
        )
        for block in run.blocks
    ]
    return Estimate(zeta2=ratios, stats={"owl_outlier_ratio": ratios})


@register_estimator(
    "uniform", summary="equal scores: every block counts the same", per_sequence=False, resumable=True
)
def uniform(run: ScoringRun) -> Estimate:
    return Estimate(zeta2=[1.0] * len(run.blocks))
