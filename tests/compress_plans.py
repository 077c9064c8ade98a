"""Plan builders for the compression tests: a plan that fits a given model exactly."""

from __future__ import annotations

from collections.abc import Sequence

from cwca_export.blocks import find_blocks, model_fingerprint
from cwca_export.planning.plan import Plan


def make_plan(model, program: str, x: Sequence[float], **parameters) -> Plan:
    """A ``prune`` (x = rho_k) or ``allocate`` (x = units) plan for ``model``'s blocks."""
    blocks = find_blocks(model)
    k = len(blocks)
    return Plan(
        program=program,
        x=[float(v) for v in x],
        q=[1.0 / k] * k,
        n_params=[b.n_params for b in blocks],
        lo=[0.0] * k,
        hi=[1.0 if program == "prune" else 64.0] * k,
        block_names=[b.name for b in blocks],
        cost=[1.0] * k if program == "allocate" else None,
        parameters=dict(parameters),
        model={"fingerprint": model_fingerprint(model)},
    )
