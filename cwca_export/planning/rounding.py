"""Data-aware rounding: each weight block clipped where the calibration activations say it pays
(docs/design.md 5.1).

ONNX Runtime's weight quantizers round to nearest with a scale set by the extreme value of each
block (``MatMulNBits``) or of the whole tensor (dynamic int8): one outlier stretches the step
for every weight it shares a scale with. Clipping the block to a fraction c of its range first
gives up accuracy on the outliers for finer steps everywhere else. The best c minimises the
Linear's expected output error for the calibration inputs x,

    E || (W - Q_c(W)) x ||^2  ~  sum_j E[x_j^2] (w_j - q_c(w_j))^2    (per output row, per block),

the diagonal of the layer's input second moment X^T X / n, the weighting of AWQ's clip search
and of GPTQ's objective. We search c on a grid per (row, block) and export the *clipped*
weights: ONNX Runtime's own round-to-nearest quantizer then writes exactly the grid chosen, so
:func:`cwca_export.planning.precision.fake_quantize` still reproduces the artifact bit for bit and every
probe, price and parity check stays exact.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from cwca_export.planning.precision import StorageFormat, fake_quantize, precision_groups
from cwca_export.scoring.accumulators import accumulate_input_norms, make_empty_input_norms

CLIP_RATIOS = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0 (plain RTN) down to 0.5
ROUNDINGS = ("rtn", "clip")


def clippable(fmt: StorageFormat) -> bool:
    """Formats whose scale comes from the weights' range (every integer format)."""
    return not fmt.is_float


@torch.no_grad()
def input_moments(
    model: nn.Module, input_ids: Any, paths: Iterable[str], *, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """Sum over calibration tokens of each input feature's square, sum_t x_tj^2, of each Linear in
    ``paths`` (the clip objective is unchanged by scaling, so sums serve as E[x_j^2])."""
    ids = torch.as_tensor(getattr(input_ids, "input_ids", input_ids))
    device = next(model.parameters()).device
    sums = {p: make_empty_input_norms(model.get_submodule(p).in_features, device) for p in dict.fromkeys(paths)}

    def hook(path: str):
        def record(_m: nn.Module, args: tuple) -> None:
            accumulate_input_norms(sums[path], args[0].detach().reshape(-1, args[0].shape[-1]).float())
        return record

    handles = [model.get_submodule(p).register_forward_pre_hook(hook(p)) for p in sums]
    try:
        for batch in ids.split(batch_size):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {p: v.cpu() for p, v in sums.items()}


@torch.no_grad()
def clip_weight(weight: torch.Tensor, fmt: StorageFormat, moments: torch.Tensor,
                ratios: Iterable[float] = CLIP_RATIOS) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` ``(rows, K)`` clipped per block to the ratio of ``ratios`` whose quantized
    values have the least moment-weighted error against the unclipped weight; and the ratios
    chosen, ``(rows, blocks)``. Blocks are ``fmt``'s (along K); dynamic int8 is one block.

    Symmetric formats clip to [-c m, c m] (m the block's largest magnitude), asymmetric ones
    to [c min(w, 0), c max(w, 0)]. Ratio 1.0 is plain round-to-nearest, so the error never
    exceeds RTN's.
    """
    if not clippable(fmt):
        return weight.clone(), torch.ones(weight.shape[0], 1)
    rows, k = weight.shape
    w = weight.detach().float()
    h = moments.detach().float().reshape(1, k)
    if fmt.dynamic:
        block, blocks = rows * k, 1
        wb, hb = w.reshape(1, 1, -1), h.expand(rows, k).reshape(1, 1, -1)
    else:
        block, blocks = fmt.block_size, math.ceil(k / fmt.block_size)
        pad = blocks * block - k
        wb = nn.functional.pad(w, (0, pad)).reshape(rows, blocks, block)
        hb = nn.functional.pad(h, (0, pad)).reshape(1, blocks, block)
    if fmt.symmetric or fmt.dynamic:
        hi = wb.abs().amax(-1, keepdim=True)
        lo = -hi
    else:
        lo, hi = wb.amin(-1, keepdim=True).clamp(max=0), wb.amax(-1, keepdim=True).clamp(min=0)
    best_err = torch.full(wb.shape[:2] + (1,), math.inf)
    best = wb.clone()
    chosen = torch.ones(wb.shape[:2] + (1,))

    def unblock(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(rows, -1)[:, :k]

    def reblock(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x, (0, wb.numel() // rows - k)).reshape(wb.shape)

    for c in ratios:
        clipped = torch.minimum(torch.maximum(wb, c * lo), c * hi)
        err = ((reblock(fake_quantize(unblock(clipped), fmt)) - wb) ** 2 * hb).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clipped, best)
        chosen = torch.where(better, torch.full_like(chosen, float(c)), chosen)
    return unblock(best).to(weight.dtype), chosen.reshape(wb.shape[:2])


def clip_targets(model: nn.Module, assignment: dict[str, StorageFormat]) -> dict[str, StorageFormat]:
    """Linear path -> format for every weight that clipping may change under ``assignment``:
    the blocks' Linears and an untied head (a tied head shares the embedding's table, which is
    quantized as a Gather table and left as it is)."""
    targets: dict[str, StorageFormat] = {}
    for group in precision_groups(model):
        fmt = assignment.get(group.name)
        if fmt is None or not clippable(fmt) or group.kind in ("embed", "tied"):
            continue
        if group.kind == "head" and model.get_output_embeddings().weight is model.get_input_embeddings().weight:
            continue
        for path in group.modules:
            targets[path] = fmt
    return targets


@contextlib.contextmanager
def clipped_weights(model: nn.Module, assignment: dict[str, StorageFormat],
                    clipper: Clipper) -> Iterator[dict[str, float]]:
    """``model`` with the weights of ``assignment``'s integer formats clipped by ``clipper``,
    restored after; yields the mean ratio chosen per group."""
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    ratios: dict[str, list[float]] = {}
    group_of = {path: g.name for g in precision_groups(model) for path in g.modules}
    try:
        with torch.no_grad():
            for path, fmt in clip_targets(model, assignment).items():
                linear = model.get_submodule(path)
                clipped, chosen = clipper.clip(path, linear.weight, fmt)
                saved.append((linear.weight, linear.weight.detach().clone()))
                linear.weight.copy_(clipped)
                ratios.setdefault(group_of[path], []).append(float(chosen.mean()))
        yield {g: round(sum(r) / len(r), 4) for g, r in ratios.items()}
    finally:
        with torch.no_grad():
            for param, original in reversed(saved):
                param.copy_(original)


class Clipper:
    """Clipping with one set of input moments, each (Linear, format) searched once.

    A search prices many candidates that share a Linear's format; the ratio grid is searched
    the first time and reused after. Bound to the weights it first sees: make a new one when
    the model changes (another structure level). Called as a
    :data:`cwca_export.planning.precision.WeightTransform`.
    """

    def __init__(self, moments: dict[str, torch.Tensor]) -> None:
        self.moments = moments
        self._done: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def clip(self, path: str, weight: torch.Tensor, fmt: StorageFormat) -> tuple[torch.Tensor, torch.Tensor]:
        """``clip_weight`` of the Linear at ``path`` (cached): the clipped weight and its ratios."""
        key = (path, fmt.name)
        if key not in self._done:
            if path not in self.moments:
                raise ValueError(f"no calibration statistics for {path}; hint: pass --data or --rounding rtn")
            self._done[key] = clip_weight(weight, fmt, self.moments[path])
        return self._done[key]

    def __call__(self, path: str, weight: torch.Tensor, fmt: StorageFormat) -> torch.Tensor:
        return self.clip(path, weight, fmt)[0] if clippable(fmt) else weight


def clipper_for(model: nn.Module, input_ids: Any, *, batch_size: int = 8) -> Clipper:
    """A :class:`Clipper` with the input moments of every Linear clipping may touch (blocks, head)."""
    paths = [p for g in precision_groups(model) if g.kind in ("block", "head") for p in g.modules]
    return Clipper(input_moments(model, input_ids, paths, batch_size=batch_size))
