"""``PlanLoss``: the calibration loss of a whole pruning plan, fast enough to search over.

Refinement (:mod:`cwca_export.refine`) measures tens of whole plans. Compressing a fresh
copy for each would repeat the statistics pass and every block's pruning; here the dense
per-Linear statistics are taken once (the whole-model mode of :func:`cwca_export.compress`,
``sequential=False``), each block's pruned weights are cached per ratio, and a plan costs a
weight swap plus one forward over the calibration ids. ``PlanLoss(rho)`` equals the loss of
``compress(copy, plan, method=..., sequential=False)`` on the same ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cwca_export.blocks import find_blocks, weight_out_in
from cwca_export.compression.registry import BlockJob, get_method
from cwca_export.compression.sequential import run_whole_model
from cwca_export.compression.stats import STATISTICS
from cwca_export.damage import calibration_loss


class PlanLoss:
    """Whole-plan calibration loss for one pruning method; the model is restored by :meth:`close`.

    Args:
        model: the dense causal LM; its block weights are swapped in place while measuring.
        input_ids: calibration ids ``(N, L)``.
        method: a pruning method (``magnitude``, ``wanda``, ``sparsegpt``).
        batch_size: sequences per forward.
        **options: the method's options (e.g. ``nm="2:4"``).

    Example:
        >>> measure = PlanLoss(model, calib.input_ids, method="wanda")  # doctest: +SKIP
        >>> measure([0.5] * 12), measure.evaluations  # doctest: +SKIP
        (3.87, 1)
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, *, method: str = "wanda",
                 batch_size: int = 8, **options: Any) -> None:
        spec = get_method(method)
        if spec.program != "prune":
            raise ValueError(f"method {method!r} reads allocation plans; PlanLoss measures pruning plans")
        self.model, self.input_ids, self.batch_size = model, input_ids, batch_size
        self.method = method
        self._spec = spec
        self._options = spec.resolve(options)
        if spec.prepare is not None:
            self._options = spec.prepare(self._options, None)
        self.blocks = find_blocks(model)
        self._dense = [
            {path: weight_out_in(m).detach().clone() for path, m in b.linears.items()} for b in self.blocks
        ]
        stat_name = spec.statistic(self._options)
        self._stats: list[dict[str, torch.Tensor] | None] = [None] * len(self.blocks)
        if stat_name is not None:
            was_training = model.training
            model.eval()
            self._stats = [row["stats"] for row in run_whole_model(
                model, self.blocks, lambda _block, stats: {"stats": stats},
                statistic=STATISTICS[stat_name], input_ids=input_ids, batch_size=batch_size,
            )]
            model.train(was_training)
        self._pruned: dict[tuple[int, float], dict[str, torch.Tensor]] = {}
        self._applied = [0.0] * len(self.blocks)
        self.evaluations = 0
        self.dense_loss = calibration_loss(model, input_ids, batch_size=batch_size)

    def _weights(self, k: int, rho: float) -> dict[str, torch.Tensor]:
        key = (k, round(float(rho), 9))
        if key not in self._pruned:
            block = self.blocks[k]
            self._restore(k)
            self._spec.apply_block(BlockJob(block, float(rho), self._stats[k], self._options))
            self._pruned[key] = {p: weight_out_in(m).detach().clone() for p, m in block.linears.items()}
        return self._pruned[key]

    @torch.no_grad()
    def _load(self, k: int, weights: dict[str, torch.Tensor]) -> None:
        for path, linear in self.blocks[k].linears.items():
            weight_out_in(linear).copy_(weights[path])

    def _restore(self, k: int) -> None:
        self._load(k, self._dense[k])

    def __call__(self, rho: Sequence[float] | np.ndarray) -> float:
        """Calibration loss (nats per token) of the model pruned by ``rho`` (one per block)."""
        rho = [float(r) for r in np.asarray(rho, dtype=np.float64)]
        if len(rho) != len(self.blocks):
            raise ValueError(f"rho: {len(rho)} ratios for {len(self.blocks)} blocks")
        for k, r in enumerate(rho):
            if r != self._applied[k]:
                self._load(k, self._weights(k, r) if r > 0 else self._dense[k])
                self._applied[k] = r
        self.evaluations += 1
        return calibration_loss(self.model, self.input_ids, batch_size=self.batch_size)

    def close(self) -> None:
        """Put the dense weights back."""
        for k in range(len(self.blocks)):
            self._restore(k)
        self._applied = [0.0] * len(self.blocks)
        self._pruned.clear()
