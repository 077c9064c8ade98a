"""Measured damage: the calibration-loss increase of compressing one block alone.

A score that needs no curvature model: for every decoder block k and a few probe points p,
compress block k alone at p with the method that will really be used, run the rest of the
model and record ``D_k(p) = loss(block k compressed) - loss(dense)`` (mean next-token
cross-entropy over the calibration tokens, nats/token).

How it is computed (:func:`measure_damage`):

1. one dense forward of the whole model records, with a pre-hook on every block, what each
   block receives: its hidden states per batch (kept on ``cache_device``) and its other
   arguments (mask, positions, rotary tables), once per batch shape. The cache holds
   ``K x N x L x hidden`` values, e.g. 12 x 32 x 128 x 192 fp32 = 36 MiB for the demo model;
   a 7B model (32 blocks, hidden 4096) at 128 x 2048 tokens needs 64 GiB in bf16, so pass
   ``cache_device="cpu"``, fewer tokens, or ``max_cache`` (bytes): then the blocks are
   probed in runs that fit it, each run after its own dense pass caching only its blocks'
   inputs (same curves; docs/memory.md). The first pass gives the dense loss and checks
   that the model's tail (final norm, ``lm_head``, logit scaling) is reproduced exactly;
2. per block k, data-aware methods first run the dense block over its cached inputs to get
   each Linear's input statistic (exactly what layer-by-layer ``compress`` sees for block k
   when the blocks before it stay dense);
3. per point p, a copy of block k is compressed by the method's own code and blocks
   k..K-1 run from block k's cached inputs, then the tail; the original block is never
   touched. A probe of block k costs (K - k) / K of a forward (``forward_fraction``).

Pruning methods (``magnitude``, ``wanda``, ``sparsegpt``, ``width``, any registered
``prune`` method) take p as rho_k through their registered per-block handler. Low-rank
methods (``lowrank``, ``asvd``) take p as the fraction of each Linear's rank removed: every
Linear ``(m, n)`` of the block becomes rank-r factors, r = max(1, round((1 - p) min(m, n))),
from :func:`cwca_export.compression.lowrank.svd_factors` /
:func:`~cwca_export.compression.lowrank.whitened_svd_factors`, whether or not that rank
saves weights (the curve is about quality, the planner does the counting).

Under data parallelism each process measures its own share of the sequences; pass
``reduce`` (an in-place all-reduce sum, e.g. ``ScoringRun.reduce_sum``) and the statistics
and loss sums are summed across processes, so every process returns the same curves.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cwca_export.blocks import Block, find_blocks, weight_out_in
from cwca_export.compression.lowrank import factor_function
from cwca_export.compression.sequential import input_statistic_hooks
from cwca_export.compression.sequential import run_block as run_block_as_is
from cwca_export.data import calibration_ids
from cwca_export.planning.plan import DAMAGE_PREFIX

if TYPE_CHECKING:
    from cwca_export.planning.plan import Plan

Reduce = Callable[[list[torch.Tensor]], None]

BASE_STAT = "damage_base_loss"
_LOGIT_CHUNK = 1 << 26  # logits materialised at once by the tail, in elements (256 MiB fp32)


# ---------------------------------------------------------------- the curves


def point_key(point: float) -> str:
    """The stats key of one probe point: ``damage@0.5``."""
    return f"{DAMAGE_PREFIX}{point:g}"


@dataclass
class DamageCurves:
    """Per-block measured damage at a few probe points.

    Attributes:
        method: the compressor probed: ``magnitude | wanda | sparsegpt | lowrank | asvd``
            (or any registered method).
        points: probe points, ascending: rho (fraction removed) for pruners; for
            ``lowrank`` / ``asvd`` the fraction of each Linear's rank removed (bigger = more
            compression, the same direction as rho).
        loss_increase: ``[block][point]``: mean calibration CE with only that block
            compressed, minus ``base_loss``.
        base_loss: dense mean calibration loss (nats/token).
        n_params: prunable weights per measured block; block_names: their module paths.
        probes: block-alone probes run (blocks x points).
        forward_fraction: probe compute relative to full forwards: the mean over probes of
            (K - k) / K (block k of K runs blocks k..K-1).
        wall_time_s: wall time of the whole measurement (dense pass and statistics included).
        block_indices: index of each measured block in the model.
        num_blocks: K, the model's block count.
    """

    method: str
    points: list[float]
    loss_increase: list[list[float]]
    base_loss: float
    n_params: list[int]
    block_names: list[str]
    probes: int
    forward_fraction: float
    wall_time_s: float
    block_indices: list[int] = field(default_factory=list)
    num_blocks: int = 0

    def __post_init__(self) -> None:
        self.points = [float(p) for p in self.points]
        if not self.block_indices:
            self.block_indices = list(range(len(self.loss_increase)))
        if not self.num_blocks:
            self.num_blocks = len(self.loss_increase)
        for name in ("n_params", "block_names", "block_indices"):
            if len(getattr(self, name)) != len(self.loss_increase):
                raise ValueError(
                    f"DamageCurves: {name} has {len(getattr(self, name))} entries,"
                    f" loss_increase {len(self.loss_increase)}"
                )
        for row in self.loss_increase:
            if len(row) != len(self.points):
                raise ValueError(
                    f"DamageCurves: a block has {len(row)} values for {len(self.points)} points"
                )

    def at(self, point: float) -> list[float]:
        """Every block's loss increase at one of the probe points."""
        return [row[self._point_index(point)] for row in self.loss_increase]

    def _point_index(self, point: float) -> int:
        for i, p in enumerate(self.points):
            if math.isclose(p, float(point), rel_tol=1e-9, abs_tol=1e-12):
                return i
        raise ValueError(f"point {point:g} was not probed; the points are {self.points}")

    def stats(self) -> dict[str, list[float]]:
        """Per-block stats as the ``damage`` estimator writes them in scores.json."""
        out = {point_key(p): self.at(p) for p in self.points}
        out[BASE_STAT] = [self.base_loss] * len(self.loss_increase)
        return out

    def settings(self) -> dict[str, Any]:
        """The measurement's settings as the ``damage`` estimator records them."""
        return {
            "points": list(self.points),
            "pruner": self.method,
            "probes": self.probes,
            "forward_fraction": self.forward_fraction,
            "probe_time_s": self.wall_time_s,
        }


# ---------------------------------------------------------------- the model's tail


@dataclass
class _Tail:
    """Final norm (+ OPT's project_out), lm_head and logit scaling: block outputs -> logits."""

    norm: nn.Module
    head: nn.Module
    project_out: nn.Module | None = None
    softcap: float | None = None
    scale: float | None = None  # logits * scale (Cohere's logit_scale)
    divide: float | None = None  # logits / divide (Granite's logits_scaling)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.norm(hidden)
        if self.project_out is not None:
            h = self.project_out(h)
        logits = self.head(h.to(_device_of(self.head, h.device)))
        if self.scale is not None:
            logits = logits * self.scale
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm", "norm_f")


def final_norm(model: nn.Module, blocks: list[Block] | None = None) -> nn.Module:
    """The decoder's final norm: Llama-family ``model.model.norm``, GPT-2 ``transformer.ln_f``.

    It is looked up on the module that owns the block list, under the names transformers
    uses (``norm``, ``ln_f``, ``final_layer_norm``, ``final_norm``, ``norm_f``).

    Raises:
        ValueError: none found; measured damage cannot run the model's tail.
    """
    blocks = blocks if blocks is not None else find_blocks(model)
    list_path = blocks[0].name.rpartition(".")[0]
    owner_path = list_path.rpartition(".")[0]
    owner = model.get_submodule(owner_path) if owner_path else model
    for name in _NORM_NAMES:
        found = getattr(owner, name, None)
        if isinstance(found, nn.Module):
            return found
    raise ValueError(
        f"{type(model).__name__}: found no final norm on {owner_path or 'the model'}"
        f" (looked for {', '.join(_NORM_NAMES)}); measured damage needs to run the model's"
        " tail after the last block; hint: supported layouts are Llama, Mistral, Qwen2, Phi-3,"
        " Gemma, GPT-2, OPT and GPT-NeoX"
    )


def _tail(model: nn.Module, blocks: list[Block]) -> _Tail:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(
            f"{type(model).__name__}: no output embeddings (lm_head) to compute a loss with"
        )
    norm = final_norm(model, blocks)
    owner_path = blocks[0].name.rpartition(".")[0].rpartition(".")[0]
    owner = model.get_submodule(owner_path) if owner_path else model
    config = getattr(model, "config", None)
    scale = getattr(model, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    return _Tail(
        norm=norm,
        head=head,
        project_out=getattr(owner, "project_out", None),
        softcap=getattr(config, "final_logit_softcapping", None),
        scale=float(scale) if isinstance(scale, (int, float)) else None,
        divide=float(divide) if isinstance(divide, (int, float)) and divide != 1 else None,
    )


def _ce_sum(tail: _Tail, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token CE over a batch ``hidden (B, L, H)``, ``ids (B, L)``; fp64 scalar."""
    batch, length = ids.shape
    vocab = int(weight_out_in(tail.head).shape[0])
    rows = max(1, _LOGIT_CHUNK // max(1, length * vocab))
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, batch, rows):
        logits = tail(hidden[start : start + rows])
        total = total + _token_ce_sum(logits, ids[start : start + rows]).to(total.device)
    return total


def _token_ce_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    targets = ids[:, 1:].reshape(-1).to(logits.device)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets, reduction="sum"
    ).double()


# ---------------------------------------------------------------- cached block inputs


class _StopPass(Exception):
    """Ends a dense forward early, once the blocks whose inputs it caches have run."""


@dataclass
class _Cache:
    """Every block's inputs: ``hidden[k][j]`` per batch j, ``shared[k][(B, L)]`` other args."""

    hidden: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    shared: dict[int, dict[tuple[int, int], tuple[tuple[Any, ...], dict[str, Any]]]] = field(
        default_factory=dict
    )

    def args(self, k: int, hidden: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return self.shared[k][tuple(hidden.shape[:2])]


def _device_of(module: nn.Module, default: torch.device | None = None) -> torch.device:
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return default if default is not None else torch.device("cpu")


def _run_block(module: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    return run_block_as_is(module, hidden.to(_device_of(module, hidden.device)), args, kwargs)


@torch.no_grad()
def _capture(
    model: nn.Module,
    blocks: list[Block],
    first: int,
    batches: list[torch.Tensor],
    tail: _Tail,
    cache_device: torch.device | None,
    keep: set[int] | None = None,
    stop_at: int | None = None,
) -> tuple[_Cache, float, float, int]:
    """The dense pass: cache blocks first..K-1's inputs (hidden states only of the blocks in
    ``keep``, default all; the other arguments of every block); dense loss sums two ways.

    With ``stop_at``, each forward ends on reaching that block (nothing of it or later is
    cached, no loss is summed): a later pass of a capped cache that needs only its window.
    """
    cache = _Cache()
    last_out: list[torch.Tensor] = []

    def pre_hook(k: int):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            if k == stop_at:
                raise _StopPass
            if args:
                hidden, rest = args[0], args[1:]
            else:
                kwargs = dict(kwargs)
                hidden, rest = kwargs.pop("hidden_states"), ()
            if keep is None or k in keep:
                target = cache_device or hidden.device
                cache.hidden.setdefault(k, []).append(hidden.detach().to(target, copy=True))
            cache.shared.setdefault(k, {}).setdefault(tuple(hidden.shape[:2]), (rest, kwargs))

        return hook

    def post_hook(_m: nn.Module, _args: tuple, out: Any) -> None:
        last_out.append((out[0] if isinstance(out, tuple) else out).detach())

    handles = [
        b.module.register_forward_pre_hook(pre_hook(b.index), with_kwargs=True)
        for b in blocks[first:]
    ]
    if stop_at is None:
        handles.append(blocks[-1].module.register_forward_hook(post_hook))
    model_sum = tail_sum = 0.0
    tokens = 0
    try:
        for batch in batches:
            if stop_at is not None:
                with contextlib.suppress(_StopPass):
                    model(input_ids=batch, use_cache=False)
                continue
            out = model(input_ids=batch, use_cache=False)
            model_sum += float(_token_ce_sum(out.logits, batch))
            tail_sum += float(_ce_sum(tail, last_out.pop(), batch))
            tokens += batch.shape[0] * (batch.shape[1] - 1)
            del out
    finally:
        for handle in handles:
            handle.remove()
    return cache, model_sum, tail_sum, tokens


# ---------------------------------------------------------------- probes


def _reduce_states(states: dict[str, Any], reduce: Reduce | None) -> None:
    """Sum statistic accumulators across processes, in place (tensors and Gram matrices)."""
    from cwca_export.compression.stats import sum_across_processes

    sum_across_processes(states, reduce)


@torch.no_grad()
def _block_stats(
    block: Block, statistic: Any, cache: _Cache, reduce: Reduce | None
) -> dict[str, torch.Tensor]:
    """Each Linear's input statistic from the dense block over its cached inputs."""
    device = _device_of(block.module)
    with input_statistic_hooks(block, statistic, device) as states:
        for hidden in cache.hidden.get(block.index, []):
            _run_block(block.module, hidden, *cache.args(block.index, hidden))
    _reduce_states(states, reduce)
    return {rel: statistic.finalize(state) for rel, state in states.items()}


def _copy_block(block: Block) -> Block:
    """A deep copy of the block's module, with its Linears looked up in the copy."""
    module = copy.deepcopy(block.module)
    linears = {
        path: module.get_submodule(path[len(block.name) + 1 :]) for path in block.linears
    }
    return Block(index=block.index, name=block.name, module=module, linears=linears)


def probe_rank(out_features: int, in_features: int, point: float) -> int:
    """The rank a low-rank probe at ``point`` keeps: max(1, round((1 - point) min(m, n))).

    Example:
        >>> probe_rank(64, 32, 0.75), probe_rank(64, 32, 1.0)
        (8, 1)
    """
    return max(1, int(round((1.0 - point) * min(out_features, in_features))))


class _Prober:
    """Builds the compressed copy of a block at each point, for one method."""

    def __init__(self, method: str, options: dict[str, Any] | None) -> None:
        from cwca_export.compression import STATISTICS, get_method

        self.spec = get_method(method)
        self.method = method
        resolved = self.spec.resolve(dict(options or {}))
        if self.spec.program == "prune" and self.spec.prepare is not None:
            resolved = self.spec.prepare(resolved, None)
        self.options = resolved
        stat_name = self.spec.statistic(resolved)
        self.statistic = None if stat_name is None else STATISTICS[stat_name]
        self.lowrank = self.spec.program == "allocate"
        self.factors = factor_function(method, resolved) if self.lowrank else None

    def prepare(
        self, block: Block, stats: dict[str, torch.Tensor] | None, points: list[float]
    ) -> Any:
        """Per-block work shared by every point: low-rank factors at the largest rank needed."""
        if not self.lowrank:
            return None
        factors = {}
        for path, linear in block.linears.items():
            rel = path[len(block.name) + 1 :]
            w = weight_out_in(linear)
            r_max = max(probe_rank(*w.shape, p) for p in points)
            factors[rel] = self.factors(w, None if stats is None else stats[rel], r_max)
        return factors

    @torch.no_grad()
    def compressed(self, block: Block, point: float, stats: dict | None, shared: Any) -> nn.Module:
        from cwca_export.compression import lowrank
        from cwca_export.compression.registry import BlockJob

        probe = _copy_block(block)
        if not self.lowrank:
            self.spec.apply_block(BlockJob(probe, float(point), stats, dict(self.options)))
            return probe.module
        for path, linear in probe.linears.items():
            rel = path[len(block.name) + 1 :]
            a, b = shared[rel]
            r = probe_rank(*weight_out_in(linear).shape, point)
            parent_path, _, child = rel.rpartition(".")
            parent = probe.module.get_submodule(parent_path) if parent_path else probe.module
            setattr(parent, child, lowrank.factorised_linear(linear, a[:r], b[:, :r]))
        return probe.module


def _ids(data: Any) -> torch.Tensor:
    ids = calibration_ids(data)
    if ids is None:
        raise ValueError("measured damage needs calibration token ids (N, L)")
    if ids.shape[1] < 2:
        raise ValueError(f"sequences of {ids.shape[1]} token(s): the loss needs at least 2")
    return ids


def parse_points(points: Sequence[float] | str | float) -> list[float]:
    """Probe points (fractions removed) from a list, one number or ``"0.7,0.3"``: sorted, checked."""
    if isinstance(points, (int, float)):  # one point, e.g. ``--option points=0.5``
        points = [points]
    if isinstance(points, str):
        try:
            values = [float(p) for p in points.replace(" ", "").split(",") if p]
        except ValueError:
            raise ValueError(
                f"points {points!r}: expected comma-separated numbers, e.g. 0.3,0.5,0.7"
            ) from None
    else:
        values = [float(p) for p in points]
    if not values:
        raise ValueError("points: give at least one probe point")
    if any(not 0.0 <= p <= 1.0 for p in values):
        raise ValueError(f"points {values}: each must lie in [0, 1]")
    if len(set(values)) != len(values):
        raise ValueError(f"points {values}: repeated point")
    return sorted(values)


def _block_list(all_blocks: list[Block], blocks: Sequence[int | Block] | None) -> list[Block]:
    if blocks is None:
        return list(all_blocks)
    chosen = []
    for b in blocks:
        index = b.index if isinstance(b, Block) else int(b)
        if not 0 <= index < len(all_blocks):
            raise ValueError(
                f"block {index} does not exist (the model has {len(all_blocks)} blocks)"
            )
        chosen.append(all_blocks[index])
    return sorted({b.index: b for b in chosen}.values(), key=lambda b: b.index)


@contextlib.contextmanager
def _on(model: nn.Module, device: torch.device | str | None) -> Iterator[torch.device]:
    """Eval mode, and the model on ``device`` (if given) for the duration."""
    was_training = model.training
    model.eval()
    home = _device_of(model)
    target = torch.device(device) if device is not None else home
    if target != home:
        model.to(target)
    try:
        yield target
    finally:
        if target != home:
            model.to(home)
        model.train(was_training)


def _input_device(model: nn.Module, default: torch.device) -> torch.device:
    return _device_of(model.get_input_embeddings(), default)


@torch.no_grad()
def measure_damage(
    model: nn.Module,
    input_ids: Any,
    *,
    method: str = "wanda",
    points: Sequence[float] | str = (0.3, 0.5, 0.7, 0.9),
    batch_size: int = 8,
    device: torch.device | str | None = None,
    blocks: Sequence[int | Block] | None = None,
    progress: bool = False,
    options: dict[str, Any] | None = None,
    cache_device: torch.device | str | None = None,
    reduce: Reduce | None = None,
    check_tail: bool = True,
    max_cache: int | None = None,
) -> DamageCurves:
    """Measure each block's calibration-loss increase when compressed alone (module doc).

    Args:
        model: a transformers causal LM; it is left unchanged (probes compress copies of
            one block at a time).
        input_ids: calibration ids ``(N, L)`` (int tensor or CalibrationData); this
            process's share under data parallelism.
        method: a registered compression method: a pruner (points are rho) or ``lowrank`` /
            ``asvd`` (points are the fraction of each Linear's rank removed).
        points: probe points in [0, 1] (or a comma-separated string).
        batch_size: sequences per forward.
        device: where to run (the model moves there and back); default: where it is.
        blocks: indices of the blocks to measure; default all.
        progress: a tqdm bar over probes.
        options: the method's options (``nm="2:4"``, ``damp``, ``block_size``, ...).
        cache_device: where cached block inputs live (``"cpu"`` for big models); default
            where each block's inputs were produced.
        reduce: in-place all-reduce sum across processes (data parallelism), or None.
        check_tail: compare the dense loss of the reproduced tail (final norm, lm_head) with
            the model's own logits, and raise if they differ.
        max_cache: cap in bytes on the cached block inputs (``K x N x L x hidden`` values
            otherwise); over it, blocks are probed in runs, each after its own dense pass
            that caches only that run's inputs (same curves; :func:`probe_blocks`).

    Returns:
        The :class:`DamageCurves` of the measured blocks.

    Example:
        >>> curves = measure_damage(model, calib.input_ids, method="wanda")  # doctest: +SKIP
        >>> curves.at(0.5)  # doctest: +SKIP
    """
    start = time.perf_counter()
    pts = parse_points(points)
    prober = _Prober(method, options)

    def probes_of(block: Block, cache: BlockInputs) -> Callable[[int], nn.Module]:
        stats = None
        if prober.statistic is not None:
            stats = _block_stats(block, prober.statistic, cache, reduce)
        shared = prober.prepare(block, stats, pts)
        return lambda pi: prober.compressed(block, pts[pi], stats, shared)

    run = probe_blocks(
        model, input_ids, probes_of, len(pts), batch_size=batch_size, device=device, blocks=blocks,
        progress=progress, desc=f"damage ({method})", cache_device=cache_device, reduce=reduce,
        check_tail=check_tail, max_cache=max_cache,
    )
    return DamageCurves(
        method=method,
        points=pts,
        loss_increase=run.increase,
        base_loss=run.base_loss,
        n_params=[b.n_params for b in run.blocks],
        block_names=[b.name for b in run.blocks],
        probes=run.probes,
        forward_fraction=run.forward_fraction,
        wall_time_s=round(time.perf_counter() - start, 3),
        block_indices=[b.index for b in run.blocks],
        num_blocks=run.num_blocks,
    )


BlockInputs = _Cache  # what a probe factory receives: every block's cached inputs


@dataclass
class BlockProbes:
    """Result of :func:`probe_blocks`: ``increase[i][v]``, the loss increase of variant v of
    ``blocks[i]`` alone, over ``base_loss`` (nats/token)."""

    blocks: list[Block]
    increase: list[list[float]]
    base_loss: float
    probes: int
    forward_fraction: float
    num_blocks: int
    dense_passes: int = 1


def probe_blocks(
    model: nn.Module,
    input_ids: Any,
    probes_of: Callable[[Block, BlockInputs], Callable[[int], nn.Module]],
    variants: int,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    blocks: Sequence[int | Block] | None = None,
    progress: bool = False,
    desc: str = "probes",
    cache_device: torch.device | str | None = None,
    reduce: Reduce | None = None,
    check_tail: bool = True,
    max_cache: int | None = None,
) -> BlockProbes:
    """The probe loop behind measured damage, for any per-block change.

    ``probes_of(block, inputs)`` returns ``variant(v) -> module``: a changed copy of the
    block (pruned, factorised, quantized...) for v in ``range(variants)``; each runs from the
    block's cached inputs through the rest of the model (module doc). ``inputs`` holds the
    hidden states of ``block`` (and of the other blocks of its window) only.

    ``max_cache`` (bytes) caps the cached block inputs: the chosen blocks are probed in runs
    of ``max(1, max_cache // block_input_bytes)`` blocks, each run after a dense pass that
    caches only its blocks' inputs and stops after the run's last block (same results).
    """
    from cwca_export.progress import bar as progress_bar

    ids = _ids(input_ids)
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be >= 1")
    all_blocks = find_blocks(model)
    chosen = _block_list(all_blocks, blocks)
    k_total = len(all_blocks)
    tail = _tail(model, all_blocks)
    cache_dev = torch.device(cache_device) if cache_device is not None else None
    if max_cache is not None and max_cache < 1:
        raise ValueError(f"max_cache {max_cache}: must be >= 1 byte (None: cache every block)")
    probes = passes = 0
    fraction = 0.0
    with _on(model, device) as dev:
        in_dev = _input_device(model, dev)
        batches = [b.to(in_dev) for b in ids.split(batch_size)] if ids.shape[0] else []
        windows = cache_windows(chosen, block_input_bytes(model, ids), max_cache)
        sums = torch.zeros(len(chosen) * variants + 3, dtype=torch.float64, device=dev)
        bar = progress_bar(total=len(chosen) * variants, desc=desc, unit="probe", show=progress)
        bi = 0
        try:
            for wi, window in enumerate(windows):
                keep = None if len(windows) == 1 else {b.index for b in window}
                if wi == 0:  # the whole forward: the dense loss, and every later block's other args
                    first = window[0].index if window else k_total
                    cache, model_sum, base_sum, tokens = _capture(
                        model, all_blocks, first, batches, tail, cache_dev, keep
                    )
                    shared = cache.shared
                else:  # up to the window's last block only; the other args come from pass one
                    cache = None  # the previous window's inputs go before the next are captured
                    cache = _capture(model, all_blocks, window[0].index, batches, tail, cache_dev, keep,
                                     stop_at=window[-1].index + 1)[0]
                    cache.shared = shared
                passes += 1
                for block in window:
                    k = block.index
                    variant = probes_of(block, cache)
                    for vi in range(variants):
                        probe = variant(vi)
                        sums[bi * variants + vi] = _probe_loss_sum(probe, k, cache, all_blocks, tail, batches, dev)
                        del probe
                        probes += 1
                        fraction += (k_total - k) / k_total
                        bar.update(1)
                    del variant
                    bi += 1
            del cache
        finally:
            bar.close()
        sums[-3:] = torch.tensor(
            [base_sum, model_sum, float(tokens)], dtype=torch.float64, device=dev
        )
        if reduce is not None:
            reduce([sums])
    sums = sums.cpu()
    base_sum, model_sum, tokens_all = (float(v) for v in sums[-3:])
    if tokens_all <= 0:
        raise ValueError("measured damage: no calibration tokens")
    base = base_sum / tokens_all
    if check_tail:
        _check_tail(model, base, model_sum / tokens_all)
    losses = sums[:-3].reshape(len(chosen), variants) / tokens_all
    return BlockProbes(
        blocks=chosen,
        increase=[[float(v) for v in row] for row in (losses - base).tolist()],
        base_loss=base,
        probes=probes,
        forward_fraction=fraction / probes if probes else 0.0,
        num_blocks=k_total,
        dense_passes=passes,
    )


def _probe_loss_sum(
    probe: nn.Module, k: int, cache: _Cache, all_blocks: list[Block], tail: _Tail, batches: list, dev: torch.device
) -> torch.Tensor:
    """Summed token loss with block ``k`` replaced by ``probe``, run from its cached inputs to the logits."""
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for j, hidden in enumerate(cache.hidden.get(k, [])):
        h = _run_block(probe, hidden, *cache.args(k, hidden))
        for i in range(k + 1, len(all_blocks)):
            h = _run_block(all_blocks[i].module, h, *cache.args(i, h))
        total += _ce_sum(tail, h, batches[j]).to(dev)
    return total


def block_input_bytes(model: nn.Module, input_ids: Any) -> int:
    """Bytes of one block's cached inputs: N x L x hidden x the embedding's element size."""
    ids = _ids(input_ids)
    emb = model.get_input_embeddings()
    return int(ids.numel()) * int(emb.weight.shape[-1]) * emb.weight.element_size()


def cache_windows(chosen: list[Block], per_block: int, max_cache: int | None) -> list[list[Block]]:
    """The chosen blocks in runs whose cached inputs fit ``max_cache`` bytes (one dense pass
    each; at least one block per run); all in one run when ``max_cache`` is None."""
    if not chosen:
        return [[]]
    size = len(chosen) if max_cache is None else max(1, int(max_cache) // max(per_block, 1))
    return [chosen[i : i + size] for i in range(0, len(chosen), size)]


def _check_tail(model: nn.Module, tail_loss: float, model_loss: float) -> None:
    dtype = next(model.parameters()).dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    if abs(tail_loss - model_loss) > tol * max(1.0, abs(model_loss)):
        raise RuntimeError(
            f"{type(model).__name__}: the reproduced tail (final norm + lm_head) gives loss"
            f" {tail_loss:.6f}, the model's own forward {model_loss:.6f}; this architecture does"
            " more after its last block than measured damage knows (check_tail=False to skip)"
        )


# ---------------------------------------------------------------- whole-model losses


@torch.no_grad()
def calibration_loss(model: nn.Module, input_ids: Any, *, batch_size: int = 8, reduce: Reduce | None = None) -> float:
    """Mean next-token CE over every predicted calibration token (labels = inputs shifted).

    Under data parallelism each process passes its share of ``input_ids`` and ``reduce`` (an
    in-place all-reduce sum): the CE and token sums are added up across processes in float64,
    so every process returns the loss over all the shares.

    Example:
        >>> calibration_loss(model, calib.input_ids)  # doctest: +SKIP
        3.42
    """
    total, tokens = 0.0, 0
    for batch, logits in _forwards(model, input_ids, batch_size):
        total += float(_token_ce_sum(logits, batch))
        tokens += batch.shape[0] * (batch.shape[1] - 1)
    if reduce is not None:
        sums = torch.tensor([total, float(tokens)], dtype=torch.float64)
        reduce([sums])
        total, tokens = float(sums[0]), float(sums[1])
    return total / tokens


@torch.no_grad()
def sequence_losses(model: nn.Module, input_ids: Any, *, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token CE of each calibration sequence, float64 ``(N,)``.

    Their mean is :func:`calibration_loss` (every sequence has the same length); their spread
    is what a paired comparison of two models on the same sequences needs
    (:mod:`cwca_export.exporter.ranking`)."""
    out = []
    for batch, logits in _forwards(model, input_ids, batch_size):
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), batch[:, 1:].to(logits.device), reduction="none")
        out.append(ce.double().mean(dim=1).cpu())
    return torch.cat(out)


def _forwards(model: nn.Module, input_ids: Any, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(batch, logits)`` of the model's forward over ``input_ids``, ``batch_size`` rows at a time,
    on the model's own device; the whole-model losses above read them."""
    ids = _ids(input_ids)
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be >= 1")
    with _on(model, None) as dev:
        in_dev = _input_device(model, dev)
        for batch in ids.split(batch_size):
            batch = batch.to(in_dev)
            yield batch, model(input_ids=batch, use_cache=False).logits


def plan_loss(
    model: nn.Module,
    plan: Plan,
    input_ids: Any,
    *,
    method: str = "wanda",
    batch_size: int = 8,
    **compress_options: Any,
) -> float:
    """Calibration loss of the whole plan: compress a deep copy, return its mean CE loss.

    ``compress_options`` go to :func:`cwca_export.compress` (``sequential``, ``device``,
    ``nm``, ``rank_step``, ``check_fingerprint``, ...); layer by layer is the default.
    The model itself is not changed; the copy costs one model's memory meanwhile.
    """
    from cwca_export.compression import compress

    ids = _ids(input_ids)
    work = copy.deepcopy(model)
    try:
        compress(work, plan, method=method, data=ids, batch_size=batch_size, **compress_options)
        return calibration_loss(work, ids, batch_size=batch_size)
    finally:
        del work
