"""Precision as a planned, per-layer dimension (docs/design.md 5).

Every decoder block (all its Linears together), the token embedding and the LM head is a
*group* that ONNX Runtime can store in one of several formats:

- ``fp32``: as exported;
- ``int8``: ONNX Runtime's dynamic int8 (``quantize_dynamic``): int8 weights with one
  scale per tensor, activations quantized to uint8 per call (``MatMulInteger``; CPU only);
  an embedding table becomes uint8 with one scale and zero point;
- ``int4-bB`` / ``int8-bB`` (block size B, ``-asym`` with zero points): weight-only
  ``MatMulNBits``, block-wise along the input dimension, one fp32 scale per block (and packed
  zero points when asymmetric); an embedding table becomes a 4-bit ``GatherBlockQuantized``
  (ONNX Runtime's quantizer writes 4-bit Gathers only), blocks along the hidden dimension;
- ``...-a8`` (e.g. ``int4-b32-a8``): the same weights, computed by ``MatMulNBits`` with
  ``accuracy_level=4`` on the CPU provider: each input row is quantized to int8 per block of B
  (symmetric, scale = max|x| / 127, round half to even) and the dot products run in integers
  (:func:`quantize_input` reproduces it to float round-off). Faster at decode on x86; MatMuls only.

For each group and format we know the exact bytes (:meth:`StorageFormat.matmul_bytes`,
:meth:`StorageFormat.gather_bytes`) and measure the calibration-loss increase of that group
alone in that format (:func:`measure_precision_damage`, the measured-damage probes of
:mod:`cwca_export.planning.damage` with the group's weights replaced by what ONNX Runtime will
compute with, :func:`fake_quantize`). A cheaper estimate, the diagonal-Fisher-weighted
quantization error 1/2 sum_i F_ii (w_i - q(w_i))^2 (HAWQ-style), is
:func:`fisher_precision_estimate`. :func:`solve_precision` then chooses one format per group,
least total damage under a byte budget, exactly (a multiple-choice knapsack solved by
:func:`cwca_export.planning.rank_plans.solve_unit_options`).

The plan is applied per node by :func:`cwca_export.exporter.postprocess.quantize_mixed` and
checked in the exported graph by :func:`cwca_export.exporter.postprocess.graph_formats`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cwca_export.blocks import find_blocks, is_conv1d

DEFAULT_FORMATS = ("fp32", "int8", "int4-b128-asym", "int4-b32")  # the densest and the finest 4-bit
# int8-bB (8-bit MatMulNBits) is offered but not by default: it stores no fewer bytes than
# dynamic int8, and its speed on the CPU provider is not benchmarked here.
_FORMAT = re.compile(r"^int(?P<bits>[48])(?:-b(?P<block>\d+))?(?P<asym>-asym)?(?P<a8>-a8)?$")
_DYNAMIC_RANGE = 127  # quantize_dynamic's symmetric int8 weights: scale = max|w| / 127
WeightTransform = Callable[[str, torch.Tensor, "StorageFormat"], torch.Tensor]
"""(Linear path, weight, format) -> the weight to quantize instead (data-aware rounding)."""


@dataclass(frozen=True)
class StorageFormat:
    """One way ONNX Runtime stores a weight.

    Attributes:
        name: ``fp32``, ``int8``, ``int4``, ``int4-b128``, ``int4-b32-asym``, ...
        bits: 32 (float) or 8 / 4 (``MatMulNBits``).
        block_size: weights sharing one scale, along the input (MatMul) or hidden (Gather) axis.
        symmetric: no zero points (ONNX Runtime's symmetric RTN: scale = signed max / -2^(bits-1)).
        dynamic: ONNX Runtime's dynamic int8 (one scale per tensor, inputs quantized per call).
        int8_compute: ``MatMulNBits`` with ``accuracy_level=4`` (inputs quantized to int8 per block).
    """

    name: str
    bits: int
    block_size: int = 32
    symmetric: bool = True
    dynamic: bool = False
    int8_compute: bool = False

    @classmethod
    def parse(cls, name: str) -> StorageFormat:
        """``"int4-b128-asym"`` -> StorageFormat(bits=4, block_size=128, symmetric=False); ``-a8``: int8 compute.

        Example:
            >>> StorageFormat.parse("int4-b128-asym").block_size, StorageFormat.parse("int4-b32-a8").int8_compute
            (128, True)
        """
        if name == "fp32":
            return cls("fp32", 32)
        if name == "int8":
            return cls("int8", 8, 0, True, True)
        match = _FORMAT.match(name)
        if not match:
            raise ValueError(
                f"precision format {name!r}: use fp32, int8 or int4 with an optional block size, zero"
                " points and int8 compute, e.g. int4-b128-asym or int4-b32-a8; hint: --formats fp32,int8,int4-b128"
            )
        block = int(match.group("block") or 32)
        if block < 16 or block & (block - 1):
            raise ValueError(f"precision format {name!r}: block size must be a power of two >= 16")
        return cls(name, int(match.group("bits")), block, match.group("asym") is None, False,
                   match.group("a8") is not None)

    @property
    def is_float(self) -> bool:
        return self.bits == 32

    def matmul_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of a MatMul weight ``(in, out)`` in this format, as ``MatMulNBits`` stores it:
        packed values N x blocks x ceil(block * bits / 8), fp32 scales N x blocks, and for
        asymmetric formats zero points packed N x ceil(blocks * bits / 8)."""
        if self.is_float:
            return 4 * out_features * in_features
        if self.dynamic:
            return out_features * in_features + 4 + 1  # int8 values, one fp32 scale, one zero point
        blocks = math.ceil(in_features / self.block_size)
        per = 8 // self.bits
        values = out_features * blocks * math.ceil(self.block_size / per)
        scales = 4 * out_features * blocks
        zeros = 0 if self.symmetric else out_features * math.ceil(blocks / per)
        return values + scales + zeros

    def gather_bytes(self, rows: int, dim: int) -> int:
        """Bytes of an embedding table ``(rows, dim)`` as ``GatherBlockQuantized`` stores it
        (4-bit only: int4 / uint4 values, fp32 scales, uint4 zero points when asymmetric)."""
        if self.is_float:
            return 4 * rows * dim
        if self.dynamic:
            return rows * dim + 4 + 1  # uint8 values, one fp32 scale, one zero point
        if self.bits != 4:
            raise ValueError(f"{self.name}: ONNX Runtime's quantizer writes 4-bit Gathers only")
        blocks = math.ceil(dim / self.block_size)
        zeros = 0 if self.symmetric else math.ceil(rows * blocks / 2)
        return math.ceil(rows * dim / 2) + 4 * rows * blocks + zeros


def default_formats(model: nn.Module | None = None) -> list[str]:
    """fp32, dynamic int8, int4 in blocks of 32 and asymmetric int4 in the largest block of 128
    or 64 that divides every Linear's input size (a partial block is padded to full size in
    ``MatMulNBits``: block 128 on a 192-wide input stores 256 values per column)."""
    if model is None:
        return list(DEFAULT_FORMATS)
    inputs = {i for g in precision_groups(model) for _, i in g.shapes}
    block = next((b for b in (128, 64) if all(i % b == 0 for i in inputs)), 32)
    return ["fp32", "int8", f"int4-b{block}-asym", "int4-b32"]


def parse_formats(text: str | Sequence[str]) -> list[StorageFormat]:
    """Formats from ``"fp32,int8,int4-b128"`` (fp32 is always included)."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    formats = [StorageFormat.parse(n) for n in dict.fromkeys(["fp32", *names])]
    return formats


@torch.no_grad()
def fake_quantize(weight: torch.Tensor, fmt: StorageFormat, *, kernel: str = "mlas") -> torch.Tensor:
    """What ONNX Runtime computes with after quantizing ``weight`` ``(rows, K)`` block-wise along
    its last axis (K): the de-quantized values, in the weight's dtype.

    Round to nearest as ONNX Runtime's RTN quantizers do it: symmetric blocks scale by the signed
    largest-magnitude value over -2^(bits-1); asymmetric blocks span [min(w, 0), max(w, 0)] in
    2^bits - 1 steps around a rounded zero point. The two quantizers round differently, and ties
    are common in weights that were stored in fp16: ``kernel="mlas"`` (MatMul weights, MLAS's
    C++ ``MlasQuantizeBlockwise``) multiplies by the reciprocal scale and rounds half up around
    the zero point; ``kernel="numpy"`` (Gather tables, the quantizer's numpy path) divides and
    rounds half to even.
    """
    if fmt.is_float:
        return weight.clone()
    if fmt.dynamic:
        return _per_tensor(weight, symmetric=True)
    rows, k = weight.shape
    block = fmt.block_size
    blocks = math.ceil(k / block)
    w = weight.detach().to(torch.float32)
    if blocks * block != k:
        w = torch.nn.functional.pad(w, (0, blocks * block - k))
    w = w.reshape(rows, blocks, block)
    rounding = _mlas_blocks if kernel == "mlas" else _numpy_blocks
    q, zero, scale = rounding(w, fmt.bits, fmt.symmetric)
    out = (q - zero) * scale
    return out.reshape(rows, blocks * block)[:, :k].to(weight.dtype)


def _block_range(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-block scale (and, asymmetric, the lower end of the range) as both quantizers set them."""
    if symmetric:
        hi, lo = w.amax(-1, keepdim=True), w.amin(-1, keepdim=True)
        return torch.where(hi.abs() > lo.abs(), hi, lo) / -float(2 ** (bits - 1)), None
    lo = w.amin(-1, keepdim=True).clamp(max=0)
    hi = w.amax(-1, keepdim=True).clamp(min=0)
    return (hi - lo) / (2 ** bits - 1), lo


def _mlas_blocks(w: torch.Tensor, bits: int, symmetric: bool):
    """MLAS: q = clamp(floor(w * (1 / scale) + zp + 1/2)), zp = 2^(bits-1) or round(-lo / scale)."""
    top = 2 ** bits - 1
    scale, lo = _block_range(w, bits, symmetric)
    nonzero = scale != 0
    safe = torch.where(nonzero, scale, torch.ones_like(scale))
    if symmetric:
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        zero = torch.where(nonzero, torch.floor(-lo / safe + 0.5), lo).clamp(0, top)
    reciprocal = torch.where(nonzero, 1.0 / safe, torch.zeros_like(scale))
    return torch.floor(w * reciprocal + zero + 0.5).clamp(0, top), zero, scale


def _numpy_blocks(w: torch.Tensor, bits: int, symmetric: bool):
    """The quantizer's numpy path: q = round_half_even(w / scale) (+ zp), zp = round(-lo / scale)."""
    top, half = 2 ** bits - 1, 2 ** (bits - 1)
    scale, lo = _block_range(w, bits, symmetric)
    nonzero = scale != 0
    safe = torch.where(nonzero, scale, torch.ones_like(scale))
    if symmetric:
        zero = torch.full_like(scale, float(half))
        q = torch.where(nonzero, (w / safe).round(), torch.zeros_like(w)).clamp(-half, half - 1) + zero
        return q, zero, scale
    zero = torch.where(nonzero, (-lo / safe).round(), torch.full_like(scale, float(half))).clamp(0, top)
    q = torch.where(nonzero, (w / safe + zero).round(), zero.expand_as(w)).clamp(0, top)
    return q, zero, scale


def _per_tensor(x: torch.Tensor, *, symmetric: bool) -> torch.Tensor:
    """One scale for the whole tensor, as ONNX Runtime's dynamic quantization computes it:
    symmetric int8 weights (scale = max|x| / 127, zero point 0), or asymmetric uint8
    (``DynamicQuantizeLinear``: range [min(x, 0), max(x, 0)] in 255 steps, rounded zero point)."""
    v = x.detach().to(torch.float32)
    if symmetric:
        scale = v.abs().max() / _DYNAMIC_RANGE
        if scale == 0:
            return x.clone()
        return ((v / scale).round().clamp(-_DYNAMIC_RANGE, _DYNAMIC_RANGE) * scale).to(x.dtype)
    lo, hi = v.min().clamp(max=0), v.max().clamp(min=0)
    scale = (hi - lo) / 255
    if scale == 0:
        return x.clone()
    zero = (-lo / scale).round().clamp(0, 255)
    return (((v / scale).round() + zero).clamp(0, 255) - zero).mul(scale).to(x.dtype)


def fake_quantize_table(weight: torch.Tensor, fmt: StorageFormat) -> torch.Tensor:
    """An embedding table ``(rows, dim)`` as ONNX Runtime's Gather will read it: uint8 with one
    scale and zero point (``int8``), or 4-bit blocks along ``dim`` (``int4-bB``)."""
    if fmt.dynamic:
        return _per_tensor(weight, symmetric=False)
    return fake_quantize(weight, fmt, kernel="numpy")


@torch.no_grad()
def quantize_input(x: torch.Tensor, fmt: StorageFormat) -> torch.Tensor:
    """The input a MatMul in ``fmt`` computes with: dynamic int8 quantizes it per tensor
    (asymmetric uint8); int8 compute (``-a8``) per block of ``block_size`` along its last axis,
    symmetric int8 with scale max|x| / 127 (MLAS's ``QuantizeARow_CompInt8``); else as is."""
    if fmt.dynamic:
        return _per_tensor(x, symmetric=False)
    if not fmt.int8_compute:
        return x
    k = x.shape[-1]
    block = fmt.block_size
    blocks = math.ceil(k / block)
    xf = x.to(torch.float32)
    if blocks * block != k:
        xf = torch.nn.functional.pad(xf, (0, blocks * block - k))
    xb = xf.reshape(*xf.shape[:-1], blocks, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    out = torch.round(xb * inverse) * (amax / 127.0)
    return out.reshape(*xf.shape[:-1], blocks * block)[..., :k].to(x.dtype)


def _input_hook(fmt: StorageFormat) -> Callable[[nn.Module, tuple], tuple]:
    def hook(_module: nn.Module, args: tuple) -> tuple:
        return (quantize_input(args[0], fmt), *args[1:])

    return hook


def quantize_linear_(linear: nn.Module, fmt: StorageFormat) -> list[Any]:
    """Make ``linear`` compute as ONNX Runtime will in ``fmt``, in place: its weight replaced by
    the de-quantized one and, for dynamic int8 and int8 compute, its input quantized per call
    (a pre-hook, returned so the caller can remove it)."""
    with torch.no_grad():
        linear.weight.copy_(fake_quantize(linear.weight, fmt))
    quantizes_input = fmt.dynamic or fmt.int8_compute
    return [linear.register_forward_pre_hook(_input_hook(fmt))] if quantizes_input else []


# ---------------------------------------------------------------- groups


@dataclass
class PrecisionGroup:
    """Weights that share one format: a decoder block's Linears, the embedding, or the head.

    Attributes:
        name: ``model.layers.3``, ``embed`` or ``head``.
        kind: ``block``, ``embed`` or ``head``.
        modules: module paths of the weights (Linears; the embedding module).
        shapes: ``(out, in)`` per Linear, ``(rows, dim)`` for the embedding.
    """

    name: str
    kind: str
    modules: list[str]
    shapes: list[tuple[int, int]]

    def bytes(self, fmt: StorageFormat) -> int:
        if self.kind in ("embed", "tied"):
            return sum(fmt.gather_bytes(r, d) for r, d in self.shapes)
        return sum(fmt.matmul_bytes(o, i) for o, i in self.shapes)

    def allows(self, fmt: StorageFormat) -> bool:
        if self.kind == "tied":  # one table both read: fp32, or uint8 with a DequantizeLinear for the head
            return fmt.is_float or fmt.dynamic
        if self.kind == "embed":  # a Gather: 4-bit GatherBlockQuantized or a uint8 table, nothing computed
            return fmt.is_float or fmt.dynamic or (fmt.bits == 4 and not fmt.int8_compute)
        return True


def precision_groups(model: nn.Module) -> list[PrecisionGroup]:
    """The groups of ``model``: one per decoder block, then ``embed`` and ``head``; for a tied
    embedding also ``tied``, the alternative to ``embed`` and ``head`` in which the head keeps
    reading the embedding's table as stored (fp32, or the uint8 table of dynamic int8, as
    ``quantize_dynamic`` leaves a tied head): a plan holds either ``tied`` or the other two.

    Only ``nn.Linear`` weights join a block's group: GPT-2's ``Conv1D`` exports as ``Gemm``,
    which ``MatMulNBits`` does not rewrite, and factorised Linears join as their two factors.
    """
    groups = []
    for block in find_blocks(model):
        paths, shapes = [], []
        for path, module in block.module.named_modules(prefix=block.name):
            if isinstance(module, nn.Linear) and not is_conv1d(module):
                paths.append(path)
                shapes.append(tuple(module.weight.shape))
        groups.append(PrecisionGroup(block.name, "block", paths, shapes))
    embed = model.get_input_embeddings()
    embed_path = _path_of(model, embed)
    groups.append(PrecisionGroup("embed", "embed", [embed_path], [tuple(embed.weight.shape)]))
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        groups.append(PrecisionGroup("head", "head", [_path_of(model, head)], [tuple(head.weight.shape)]))
        if head.weight is embed.weight:
            groups.append(PrecisionGroup("tied", "tied", [embed_path], [tuple(embed.weight.shape)]))
    return groups


def check_precision_plan(model: nn.Module, formats: dict[str, str]) -> None:
    """Refuse a precision plan (group -> format) that names a group ``model`` lacks, gives a
    group a format ONNX Runtime cannot store it in (:meth:`PrecisionGroup.allows`), or holds a
    tied table beside the embedding or head it replaces; before any export, since such a plan
    otherwise builds a graph that fails verification for a reason it does not name."""
    groups = {g.name: g for g in precision_groups(model)}
    unknown = sorted(set(formats) - set(groups))
    if unknown:
        raise ValueError(f"unknown group(s) {unknown}; the model has {sorted(groups)}")
    for name, text in formats.items():
        fmt = StorageFormat.parse(text)
        if not groups[name].allows(fmt):
            allowed = {"tied": "fp32 or int8 (the head reads the embedding's table)",
                       "embed": "fp32, int8 or a 4-bit format without -a8 (a Gather computes nothing)"}
            raise ValueError(f"group {name}: {text} is not a format it can be stored in; it takes"
                             f" {allowed[groups[name].kind]}")
    if "tied" in formats and ({"embed", "head"} & set(formats)):
        raise ValueError("a plan holds either tied (one table the head reads) or embed and head, not both")


def _path_of(model: nn.Module, module: nn.Module) -> str:
    return next(path for path, m in model.named_modules() if m is module)


@contextlib.contextmanager
def quantized_weights(model: nn.Module, assignment: dict[str, StorageFormat]) -> Iterator[nn.Module]:
    """``model`` computing with the formats of ``assignment`` (group name -> format), restored after.

    Tied embeddings are handled as ONNX Runtime sees them after untying: the head and the
    embedding each get their own format (the head through a forward hook on its own copy of
    the weight, the embedding by swapping its table in).
    """
    groups = {g.name: g for g in precision_groups(model)}
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    handles: list[Any] = []
    try:
        with torch.no_grad():
            embed = model.get_input_embeddings()
            head = model.get_output_embeddings()
            tied = head is not None and head.weight is embed.weight
            tied_fmt = assignment.get("tied")
            if tied_fmt is not None and not tied_fmt.is_float:  # one uint8 table, both read it
                saved.append((embed.weight, embed.weight.detach().clone()))
                embed.weight.copy_(fake_quantize_table(embed.weight, tied_fmt))
            head_fmt = assignment.get("head") or StorageFormat.parse("fp32")
            embed_fmt = assignment.get("embed") or StorageFormat.parse("fp32")
            if not head_fmt.is_float or (tied and not embed_fmt.is_float):
                handles.append(_head_hook(head, head_fmt))
            if not embed_fmt.is_float:
                saved.append((embed.weight, embed.weight.detach().clone()))
                embed.weight.copy_(fake_quantize_table(embed.weight, embed_fmt))
            for name, fmt in assignment.items():
                if fmt.is_float or name in ("head", "embed", "tied"):
                    continue
                for path in groups[name].modules:
                    linear = model.get_submodule(path)
                    saved.append((linear.weight, linear.weight.detach().clone()))
                    handles += quantize_linear_(linear, fmt)
        yield model
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for param, original in reversed(saved):
                param.copy_(original)


def _head_hook(head: nn.Module, fmt: StorageFormat) -> Any:
    """Replace ``head``'s output by one computed from its own (quantized) copy of the weight."""
    weight = fake_quantize(head.weight, fmt)
    bias = head.bias

    def hook(_m: nn.Module, args: tuple, _out: Any) -> torch.Tensor:
        x = quantize_input(args[0], fmt)
        return torch.nn.functional.linear(x, weight.to(x.dtype), bias)

    return head.register_forward_hook(hook)


# ---------------------------------------------------------------- measuring and estimating


@dataclass
class PrecisionDamage:
    """Per group, per format: the loss increase (nats/token) and the bytes.

    Attributes:
        groups: group names, in :func:`precision_groups` order.
        formats: format names (``fp32`` first).
        damage: ``damage[g][f]``; None where the format does not apply to the group.
        bytes: ``bytes[g][f]``; None where the format does not apply.
        base_loss: the dense calibration loss.
        estimator: ``measured`` or ``fisher``.
        wall_time_s: time spent.
    """

    groups: list[str]
    formats: list[str]
    damage: list[list[float | None]]
    bytes: list[list[int | None]]
    base_loss: float
    estimator: str = "measured"
    wall_time_s: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimator": self.estimator, "groups": self.groups, "formats": self.formats,
            "damage": self.damage, "bytes": self.bytes, "base_loss": self.base_loss,
            "wall_time_s": self.wall_time_s, "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrecisionDamage:
        return cls(data["groups"], data["formats"], data["damage"], data["bytes"], data["base_loss"],
                   data.get("estimator", "measured"), data.get("wall_time_s", 0.0), data.get("settings", {}))


def _ids(data: Any) -> torch.Tensor:
    ids = getattr(data, "input_ids", data)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("calibration data: expected token ids (N, L); hint: pass --data FILE")
    return ids


def _with_fp32_first(formats: Sequence[StorageFormat | str]) -> list[StorageFormat]:
    """The formats parsed, fp32 first (every table's reference column), once."""
    fmts = [f if isinstance(f, StorageFormat) else StorageFormat.parse(f) for f in formats]
    return [StorageFormat.parse("fp32"), *[f for f in fmts if not f.is_float]]


def _byte_table(groups: list[PrecisionGroup], formats: list[StorageFormat]) -> list[list[int | None]]:
    return [[g.bytes(f) if g.allows(f) else None for f in formats] for g in groups]


@torch.no_grad()
def measure_precision_damage(
    model: nn.Module,
    input_ids: Any,
    formats: Sequence[StorageFormat | str] = DEFAULT_FORMATS,
    *,
    batch_size: int = 8,
    progress: bool = False,
    transform: WeightTransform | None = None,
    reduce: Callable[[list[torch.Tensor]], None] | None = None,
    max_cache: int | None = None,
) -> PrecisionDamage:
    """The calibration-loss increase of storing each group alone in each format.

    Blocks run as measured-damage probes (a copy of the block with quantized weights, then
    the rest of the model from its cached inputs, :func:`cwca_export.planning.damage.probe_blocks`);
    the embedding and the head cost one full forward per format. ``transform`` changes each
    Linear's weight before it is quantized (data-aware rounding,
    :class:`cwca_export.planning.rounding.Clipper`); it does not apply to embedding tables.

    Under data parallelism each process passes its share of ``input_ids`` (whole batches,
    :meth:`cwca_export.data_parallel.Processes.share`) and ``reduce`` (an in-place all-reduce
    sum): every loss and token sum is added up across processes in float64, so every process
    returns the table of all the shares. ``transform`` must be the same in every process
    (a :class:`~cwca_export.planning.rounding.Clipper` made from all the calibration ids).
    ``max_cache`` (bytes) caps the cached block inputs (:func:`~cwca_export.planning.damage.probe_blocks`:
    blocks probed in runs, one more dense pass each, same table).
    """
    from cwca_export.planning.damage import calibration_loss, probe_blocks

    start = time.perf_counter()
    fmts = _with_fp32_first(formats)
    ids = _ids(input_ids)
    groups = precision_groups(model)
    block_groups = [g for g in groups if g.kind == "block"]

    def probes_of(block: Any, _inputs: Any):
        group = block_groups[block.index]

        def variant(v: int) -> nn.Module:
            probe = copy.deepcopy(block.module)
            if not fmts[v].is_float:
                for path in group.modules:
                    linear = probe.get_submodule(path[len(block.name) + 1:])
                    if transform is not None:
                        linear.weight.copy_(transform(path, linear.weight, fmts[v]))
                    quantize_linear_(linear, fmts[v])
            return probe

        return variant

    run = probe_blocks(model, ids, probes_of, len(fmts), batch_size=batch_size, progress=progress,
                       desc="precision probes", reduce=reduce, max_cache=max_cache)
    damage: list[list[float | None]] = [list(row) for row in run.increase]
    for g in groups[len(block_groups):]:
        row: list[float | None] = []
        for f in fmts:
            if f.is_float:
                row.append(0.0)
            elif not g.allows(f):
                row.append(None)
            else:
                with _transformed_head(model, g, f, transform), quantized_weights(model, {g.name: f}):
                    row.append(calibration_loss(model, ids, batch_size=batch_size, reduce=reduce) - run.base_loss)
        damage.append(row)
    for row in damage:
        row[0] = 0.0  # fp32 is the model itself (probe noise is float round-off only)
    samples = torch.tensor([float(ids.shape[0])], dtype=torch.float64)
    if reduce is not None:
        reduce([samples])
    return PrecisionDamage(
        groups=[g.name for g in groups], formats=[f.name for f in fmts], damage=damage,
        bytes=_byte_table(groups, fmts), base_loss=run.base_loss, estimator="measured",
        wall_time_s=round(time.perf_counter() - start, 3),
        settings={"samples": int(samples.item()), "seq_len": int(ids.shape[1]), "batch_size": batch_size},
    )


@contextlib.contextmanager
def _transformed_head(model: nn.Module, group: PrecisionGroup, fmt: StorageFormat,
                      transform: WeightTransform | None) -> Iterator[None]:
    """An untied head's weight passed through ``transform`` (restored after); else nothing."""
    head = model.get_output_embeddings()
    if transform is None or group.kind != "head" or head.weight is model.get_input_embeddings().weight:
        yield
        return
    original = head.weight.detach().clone()
    try:
        with torch.no_grad():
            head.weight.copy_(transform(group.modules[0], head.weight, fmt))
        yield
    finally:
        with torch.no_grad():
            head.weight.copy_(original)


def fisher_precision_estimate(
    model: nn.Module,
    input_ids: Any,
    formats: Sequence[StorageFormat | str] = DEFAULT_FORMATS,
    *,
    transform: WeightTransform | None = None,
) -> PrecisionDamage:
    """The curvature estimate: 1/2 sum_i F_ii (w_i - q(w_i))^2 per group and format.

    F is the empirical diagonal Fisher of the mean per-token loss: per calibration sequence
    of L tokens, the gradient g of its mean token loss gives F ~ L * E[g^2] (token gradients
    taken as independent). One backward per sequence; no probes.
    """
    start = time.perf_counter()
    fmts = _with_fp32_first(formats)
    ids = _ids(input_ids)
    groups = precision_groups(model)
    params = {path: model.get_submodule(path).weight for g in groups for path in g.modules}
    fisher = {path: torch.zeros_like(p, dtype=torch.float32) for path, p in params.items()}
    was_training = model.training
    model.eval()
    requires = {path: p.requires_grad for path, p in params.items()}
    losses: list[float] = []
    try:
        for p in params.values():
            p.requires_grad_(True)
        for row in ids:
            seq = row[None]
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=seq, labels=seq, use_cache=False).loss
            loss.backward()
            losses.append(float(loss.detach()))
            for path, p in params.items():
                if p.grad is not None:
                    fisher[path] += p.grad.detach().float() ** 2
        tokens = ids.shape[1] - 1
        for path in fisher:
            fisher[path] *= tokens / ids.shape[0]
    finally:
        model.zero_grad(set_to_none=True)
        for path, p in params.items():
            p.requires_grad_(requires[path])
        model.train(was_training)
    damage: list[list[float | None]] = []
    with torch.no_grad():
        for g in groups:
            row: list[float | None] = []
            for f in fmts:
                if not g.allows(f):
                    row.append(None)
                    continue
                total = 0.0
                for path in g.modules:
                    w = params[path].detach()
                    if g.kind in ("embed", "tied"):
                        err = w - fake_quantize_table(w, f)
                    else:
                        shown = w if transform is None or f.is_float else transform(path, w, f)
                        err = w - fake_quantize(shown, f)
                    total += 0.5 * float((fisher[path] * err.float() ** 2).sum())
                row.append(total)
            damage.append(row)
    return PrecisionDamage(
        groups=[g.name for g in groups], formats=[f.name for f in fmts], damage=damage,
        bytes=_byte_table(groups, fmts), base_loss=float(np.mean(losses)), estimator="fisher",
        wall_time_s=round(time.perf_counter() - start, 3),
        settings={"samples": int(ids.shape[0]), "seq_len": int(ids.shape[1])},
    )


# ---------------------------------------------------------------- the integer program


@dataclass
class PrecisionPlan:
    """One format per group, and what the solver saw.

    Attributes:
        formats: group name -> format name.
        weight_bytes: the planned weights' bytes (groups only; norms and biases not counted).
        predicted_damage: the sum of the groups' damage (additive model).
        budget_bytes: the weight-byte budget solved for (None: not solved under a budget).
        exact: the solver proved the choice optimal for the additive model.
    """

    formats: dict[str, str]
    weight_bytes: int
    predicted_damage: float
    budget_bytes: int | None = None
    exact: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"formats": self.formats, "weight_bytes": self.weight_bytes,
                "predicted_damage": self.predicted_damage, "budget_bytes": self.budget_bytes, "exact": self.exact}


def solve_precision(
    damage: PrecisionDamage, budget_bytes: float, *, allowed: Sequence[str] | None = None,
    limits: Sequence[tuple[Sequence[Sequence[float | None]], float]] = (),
) -> PrecisionPlan:
    """Least total damage with the groups' weight bytes <= ``budget_bytes``, one format each.

    Exact over the additive model (each group's measured damage alone, summed): options that
    another option of the same group beats in both bytes and damage are dropped, the rest go
    to the branch-and-bound of :func:`cwca_export.planning.rank_plans.solve_unit_options`.

    ``limits``: more additive constraints, each ``(cost[g][f], cap)`` with the chosen formats'
    costs summing to at most ``cap`` (per-group latency in ms from
    :class:`cwca_export.exporter.latency_table.LatencyTable`: costs may be negative). With
    them the program is a multiple-choice knapsack with several rows, solved exactly as a
    0/1 integer program by HiGHS (:func:`scipy.optimize.milp`).

    Raises:
        ValueError: not even the smallest format of every group fits, or no choice meets the limits.
    """
    keep = set(allowed) if allowed is not None else set(damage.formats)
    names = damage.groups
    if limits:
        return _solve_with_limits(damage, budget_bytes, keep, limits)
    if "tied" not in names:
        return _solve_groups(damage, list(range(len(names))), budget_bytes, keep)
    # a tied embedding: the head reads the shared table ("tied"), or both are groups of their own
    variants = [[g for g, n in enumerate(names) if n != "tied"],
                [g for g, n in enumerate(names) if n not in ("embed", "head")]]
    solved, errors = [], []
    for indices in variants:
        try:
            solved.append(_solve_groups(damage, indices, budget_bytes, keep))
        except ValueError as exc:
            errors.append(exc)
    if not solved:
        raise errors[-1]
    return min(solved, key=lambda p: (p.predicted_damage, p.weight_bytes))


def _solve_with_limits(damage: PrecisionDamage, budget_bytes: float, keep: set[str],
                       limits: Sequence[tuple[Sequence[Sequence[float | None]], float]]) -> PrecisionPlan:
    """:func:`solve_precision` with extra additive rows: a 0/1 program, one variable per
    (group, format), each of the variants (``tied``, or ``embed`` and ``head``) solved alone."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = damage.groups
    variants = [list(range(len(names)))]
    if "tied" in names:
        variants = [[g for g, n in enumerate(names) if n != "tied"],
                    [g for g, n in enumerate(names) if n not in ("embed", "head")]]
    best: PrecisionPlan | None = None
    for indices in variants:
        columns = [(g, f) for g in indices for f, fmt in enumerate(damage.formats)
                   if (fmt in keep or fmt == "fp32") and damage.bytes[g][f] is not None
                   and damage.damage[g][f] is not None and all(c[g][f] is not None for c, _ in limits)]
        if {g for g, _ in columns} != set(indices):
            continue
        n = len(columns)
        one_each = np.zeros((len(indices), n))
        for j, (g, _) in enumerate(columns):
            one_each[indices.index(g), j] = 1.0
        rows = [np.array([float(damage.bytes[g][f]) for g, f in columns])]
        caps = [float(budget_bytes)]
        for costs, cap in limits:
            rows.append(np.array([float(costs[g][f]) for g, f in columns]))
            caps.append(float(cap))
        result = milp(
            c=np.array([float(damage.damage[g][f]) for g, f in columns]),
            constraints=[LinearConstraint(one_each, 1.0, 1.0), LinearConstraint(np.vstack(rows), -np.inf, caps)],
            integrality=np.ones(n), bounds=Bounds(0.0, 1.0),
        )
        if result.x is None:
            continue
        chosen = [columns[j] for j in np.flatnonzero(result.x > 0.5)]
        plan = PrecisionPlan({names[g]: damage.formats[f] for g, f in chosen},
                             int(sum(damage.bytes[g][f] for g, f in chosen)),
                             float(sum(damage.damage[g][f] for g, f in chosen)), int(budget_bytes), True)
        if best is None or (plan.predicted_damage, plan.weight_bytes) < (best.predicted_damage, best.weight_bytes):
            best = plan
    if best is None:
        raise ValueError(
            f"no storage plan fits {int(budget_bytes)} weight bytes within the latency limits; hint: raise"
            " --max-memory or --max-latency-ms, or compress structure further (--plan with --method width)"
        )
    return best


def _solve_groups(damage: PrecisionDamage, indices: list[int], budget_bytes: float, keep: set[str]) -> PrecisionPlan:
    from cwca_export.planning.rank_plans import solve_unit_options

    options: list[list[tuple[int, float, str]]] = []
    for g in indices:
        rows = sorted(
            (int(b), float(d), f) for b, d, f in zip(damage.bytes[g], damage.damage[g], damage.formats, strict=True)
            if b is not None and d is not None and (f in keep or f == "fp32")
        )
        frontier: list[tuple[int, float, str]] = []
        for b, d, f in rows:  # Pareto: more bytes only for less damage
            if frontier and b == frontier[-1][0]:
                if d < frontier[-1][1]:
                    frontier[-1] = (b, d, f)
                continue
            if not frontier or d < frontier[-1][1]:
                frontier.append((b, d, f))
        options.append(frontier)
    least = sum(opt[0][0] for opt in options)
    if least > budget_bytes:
        raise ValueError(
            f"weights need at least {least} bytes in the smallest formats ({', '.join(sorted(keep))}),"
            f" over the {int(budget_bytes)} left for them; hint: compress structure further (--plan with"
            " --method width|lowrank|asvd) or raise --max-memory"
        )
    choice = solve_unit_options([[b for b, _, _ in o] for o in options], [[d for _, d, _ in o] for o in options],
                                float(budget_bytes))
    groups = [damage.groups[g] for g in indices]
    formats = {name: options[g][j][2] for g, (name, j) in enumerate(zip(groups, choice.index, strict=True))}
    spent = sum(options[g][j][0] for g, j in enumerate(choice.index))
    total = sum(options[g][j][1] for g, j in enumerate(choice.index))
    return PrecisionPlan(formats, int(spent), float(total), int(budget_bytes), choice.exact)


def rescale_bytes(damage: PrecisionDamage, model: nn.Module) -> PrecisionDamage:
    """The same measured damage with bytes recomputed for ``model``'s (compressed) shapes."""
    groups = precision_groups(model)
    if [g.name for g in groups] != damage.groups:
        raise ValueError("the model's precision groups differ from the measured ones")
    fmts = [StorageFormat.parse(f) for f in damage.formats]
    return PrecisionDamage(damage.groups, damage.formats, damage.damage, _byte_table(groups, fmts),
                           damage.base_loss, damage.estimator, damage.wall_time_s, damage.settings)


def other_weight_bytes(model: nn.Module) -> int:
    """fp32 bytes of the parameters outside every group (norms, biases, position tables)."""
    in_groups = {model.get_submodule(p).weight.data_ptr() for g in precision_groups(model) for p in g.modules}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        ptr = p.data_ptr()
        if ptr not in seen and ptr not in in_groups:
            seen.add(ptr)
            total += 4 * p.numel()
    return total


def artifact_weight_bytes(model: nn.Module, formats: dict[str, str]) -> int:
    """Bytes of every parameter in an artifact whose groups are stored as ``formats`` (group
    name -> format; missing groups fp32): the groups' weights in their formats (a tied
    embedding and head count twice, as the untied graph stores them) plus every other
    parameter in fp32, counted once."""
    groups = precision_groups(model)
    shared = any(g.kind == "tied" for g in groups) and (
        "tied" in formats or (formats.get("embed", "fp32") == "fp32" and formats.get("head", "fp32") == "fp32"))
    total = other_weight_bytes(model)
    for g in groups:
        if (g.kind == "tied") != shared and g.kind in ("tied", "embed", "head"):
            continue  # a tied pair is one table (the tied group) or two (embed and head), never both
        total += g.bytes(StorageFormat.parse(formats.get(g.name, "fp32")))
    return total
