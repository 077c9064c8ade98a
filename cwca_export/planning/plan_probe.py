"""``PlanLoss``: the calibration loss of a whole pruning plan, fast enough to search over.

Refinement (:mod:`cwca_export.planning.refine`) measures tens of whole plans. Compressing a fresh
copy for each would repeat the statistics pass and every block's pruning; here the dense
per-Linear statistics are taken once (the whole-model mode of :func:`cwca_export.compress`,
``sequential=False``), each block's pruned weights are cached per ratio (least recently used
first out, at most ``max_cached`` blocks, by default as many as fit ``cache_bytes``; a miss
prunes the block again, with the same result), and a plan costs a weight swap plus one
forward over the calibration ids. ``PlanLoss(rho)`` equals the loss of
``compress(copy, plan, method=..., sequential=False)`` on the same ids.

Data-parallel (``reduce``, :mod:`cwca_export.data_parallel`): each process passes its share
of the calibration ids; the dense statistics and every loss are summed across processes, so
each process prunes with the statistics of all the ids and measures the loss over all of them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cwca_export.blocks import find_blocks, weight_out_in
from cwca_export.compression.registry import BlockJob, get_method
from cwca_export.compression.sequential import run_whole_model
from cwca_export.compression.stats import STATISTICS
from cwca_export.planning.damage import Reduce, calibration_loss

DEFAULT_CACHE_BYTES = 2 * 1024**3  # pruned block copies kept by PlanLoss (``refine --probe-cache``)


def _dense_stats(model: nn.Module, blocks, stat_name: str | None, input_ids: torch.Tensor,
                 batch_size: int, reduce: Reduce | None = None) -> list[dict[str, torch.Tensor] | None]:
    """Every block's per-Linear input statistic from one pass of the dense model (None: no data)."""
    if stat_name is None:
        return [None] * len(blocks)
    was_training = model.training
    model.eval()
    try:
        return [row["stats"] for row in run_whole_model(
            model, blocks, lambda _block, stats: {"stats": stats},
            statistic=STATISTICS[stat_name], input_ids=input_ids, batch_size=batch_size, reduce=reduce,
        )]
    finally:
        model.train(was_training)


class PlanLoss:
    """Whole-plan calibration loss for one pruning method; the model is restored by :meth:`close`.

    Args:
        model: the dense causal LM; its block weights are swapped in place while measuring.
        input_ids: calibration ids ``(N, L)``.
        method: a pruning method (``magnitude``, ``wanda``, ``sparsegpt``).
        batch_size: sequences per forward.
        max_cached: pruned block copies kept (least recently used evicted; 0 keeps none);
            default: as many of the largest block as fit ``cache_bytes``, at least one.
        cache_bytes: the byte budget behind the default ``max_cached``.
        reduce: under data parallelism, an in-place all-reduce sum (``input_ids`` is then this
            process's share); None in one process.
        **options: the method's options (e.g. ``nm="2:4"``).

    Memory beyond the model: a dense copy of every block's Linear weights, the dense
    statistics, and at most ``max_cached`` pruned block copies (docs/memory.md).

    Example:
        >>> measure = PlanLoss(model, calib.input_ids, method="wanda")  # doctest: +SKIP
        >>> measure([0.5] * 12), measure.evaluations  # doctest: +SKIP
        (3.87, 1)
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, *, method: str = "wanda",
                 batch_size: int = 8, max_cached: int | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, reduce: Reduce | None = None, **options: Any) -> None:
        spec = get_method(method)
        if spec.program != "prune":
            raise ValueError(f"method {method!r} reads allocation plans; PlanLoss measures pruning plans")
        self.model, self.input_ids, self.batch_size, self.reduce = model, input_ids, batch_size, reduce
        self.method = method
        self._spec = spec
        self._options = spec.resolve(options)
        if spec.prepare is not None:
            self._options = spec.prepare(self._options, None)
        self.blocks = find_blocks(model)
        self._dense = [
            {path: weight_out_in(m).detach().clone() for path, m in b.linears.items()} for b in self.blocks
        ]
        self._stats = _dense_stats(model, self.blocks, spec.statistic(self._options), input_ids, batch_size, reduce)
        if max_cached is None:
            largest = max((sum(w.numel() * w.element_size() for w in d.values()) for d in self._dense), default=1)
            max_cached = max(1, int(cache_bytes) // max(largest, 1))
        if max_cached < 0:
            raise ValueError(f"max_cached {max_cached}: must be >= 0")
        self.max_cached = int(max_cached)
        self.cache_misses = 0  # blocks pruned (first sight or after eviction)
        self._pruned: OrderedDict[tuple[int, float], dict[str, torch.Tensor]] = OrderedDict()
        self._applied = [0.0] * len(self.blocks)
        self.evaluations = 0
        self.dense_loss = calibration_loss(model, input_ids, batch_size=batch_size, reduce=reduce)

    def _weights(self, k: int, rho: float) -> dict[str, torch.Tensor]:
        key = (k, round(float(rho), 9))
        if key in self._pruned:
            self._pruned.move_to_end(key)
            return self._pruned[key]
        block = self.blocks[k]
        self._restore(k)
        self._spec.apply_block(BlockJob(block, float(rho), self._stats[k], self._options))
        weights = {p: weight_out_in(m).detach().clone() for p, m in block.linears.items()}
        self.cache_misses += 1
        if self.max_cached > 0:
            while len(self._pruned) >= self.max_cached:
                self._pruned.popitem(last=False)
            self._pruned[key] = weights
        return weights

    @property
    def cached(self) -> int:
        """Pruned block copies held now (at most ``max_cached``)."""
        return len(self._pruned)

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
        return calibration_loss(self.model, self.input_ids, batch_size=self.batch_size, reduce=self.reduce)

    def close(self) -> None:
        """Put the dense weights back."""
        for k in range(len(self.blocks)):
            self._restore(k)
        self._applied = [0.0] * len(self.blocks)
        self._pruned.clear()


class RankPlanLoss:
    """Whole-plan calibration loss of an allocation plan (ranks) for ``lowrank`` / ``asvd``.

    The :class:`PlanLoss` of rank plans: the dense per-Linear statistics (``asvd``'s input
    covariance) come from one pass of the dense model, every Linear is factorised once at
    the largest rank that still shrinks it, and a plan costs swapping in each changed block's
    factors (sliced to the block's rank, as ``compress`` builds them) plus one forward. Like
    ``compress``, a block's Linears share the rank units * rank_step and a Linear that rank
    would not shrink stays dense. ``RankPlanLoss(units)`` equals the loss of
    ``compress(copy, plan, method=..., sequential=False)`` on the same ids; the model's own
    Linears are put back by :meth:`close`.

    The cached factors hold at most one more copy of the blocks' weights (in their dtype).

    Args:
        model: the dense causal LM; its block Linears are swapped in place while measuring.
        input_ids: calibration ids ``(N, L)``.
        method: ``lowrank`` or ``asvd``.
        rank_step: rank of one plan unit.
        batch_size: sequences per forward.
        reduce: under data parallelism, an in-place all-reduce sum (``input_ids`` is then this
            process's share); None in one process.
        **options: the method's other options (``damp`` for ``asvd``).

    Example:
        >>> measure = RankPlanLoss(model, calib.input_ids, method="asvd")  # doctest: +SKIP
        >>> measure([4] * 12), measure.evaluations  # doctest: +SKIP
        (4.12, 1)
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, *, method: str = "lowrank",
                 rank_step: int = 8, batch_size: int = 8, reduce: Reduce | None = None, **options: Any) -> None:
        from types import SimpleNamespace

        from cwca_export.compression import lowrank

        spec = get_method(method)
        if spec.program != "allocate":
            raise ValueError(f"method {method!r} reads pruning plans; RankPlanLoss measures allocation plans")
        if method not in ("lowrank", "asvd"):
            raise ValueError(f"RankPlanLoss knows the factors of 'lowrank' and 'asvd', not {method!r}")
        self.model, self.input_ids, self.batch_size, self.reduce = model, input_ids, batch_size, reduce
        self.method = method
        resolved = spec.resolve({**options, "rank_step": rank_step})
        self._options = spec.prepare(resolved, SimpleNamespace(parameters={})) if spec.prepare else resolved
        self.rank_step = int(self._options["rank_step"])
        self.blocks = find_blocks(model)
        stats = _dense_stats(model, self.blocks, spec.statistic(self._options), input_ids, batch_size, reduce)
        factor = lowrank.factor_function(method, self._options)
        self._dense: list[dict[str, nn.Module]] = []
        self._factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        for k, block in enumerate(self.blocks):
            dense, factors = {}, {}
            for path, linear in block.linears.items():
                rel = path[len(block.name) + 1:]
                w = weight_out_in(linear)
                m, n = w.shape
                top = (m * n - 1) // (m + n)  # the largest rank that shrinks it: r (m + n) < m n
                dense[rel] = linear
                if top >= 1:
                    a, b = factor(w, None if stats[k] is None else stats[k][rel], top)
                    factors[rel] = (a[:top].to(w.dtype), b[:, :top].to(w.dtype))
            self._dense.append(dense)
            self._factors.append(factors)
            stats[k] = None  # the statistics are done with once factorised
        self._lowrank = lowrank
        self._applied: list[int | None] = [None] * len(self.blocks)  # None: dense
        self._closed = False
        self.evaluations = 0
        self.dense_loss = calibration_loss(model, input_ids, batch_size=batch_size, reduce=reduce)

    def _set(self, k: int, rel: str, module: nn.Module) -> None:
        root = self.blocks[k].module
        parent_path, _, child = rel.rpartition(".")
        setattr(root.get_submodule(parent_path) if parent_path else root, child, module)

    @torch.no_grad()
    def _apply(self, k: int, units: int | None) -> None:
        rank = None if units is None else units * self.rank_step
        for rel, linear in self._dense[k].items():
            m, n = weight_out_in(linear).shape
            if rank is None or not self._lowrank.shrinks(m, n, rank):
                self._set(k, rel, linear)
                continue
            a, b = self._factors[k][rel]
            self._set(k, rel, self._lowrank.factorised_linear(linear, a[:rank], b[:, :rank]))
        self._applied[k] = units

    def __call__(self, units: Sequence[float] | np.ndarray) -> float:
        """Calibration loss (nats per token) of the model factorised by ``units`` (one per block)."""
        if self._closed:
            raise RuntimeError("RankPlanLoss: closed (its factors are dropped); make a new one")
        values = [float(u) for u in np.asarray(units, dtype=np.float64).reshape(-1)]
        if len(values) != len(self.blocks):
            raise ValueError(f"units: {len(values)} values for {len(self.blocks)} blocks")
        whole = []
        for k, u in enumerate(values):
            if abs(u - round(u)) > 1e-9 or round(u) < 1:
                raise ValueError(f"{self.blocks[k].name}: {u} units; a rank plan needs whole units >= 1")
            whole.append(int(round(u)))
        for k, u in enumerate(whole):
            if u != self._applied[k]:
                self._apply(k, u)
        self.evaluations += 1
        return calibration_loss(self.model, self.input_ids, batch_size=self.batch_size, reduce=self.reduce)

    def close(self) -> None:
        """Put the model's own Linears back and drop the cached factors."""
        for k in range(len(self.blocks)):
            if self._applied[k] is not None:
                self._apply(k, None)
        self._factors = [{} for _ in self.blocks]
        self._closed = True
