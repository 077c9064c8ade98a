"""Structured width: remove MLP intermediate channels and whole GQA groups of attention heads.

A *layout* names the Linears that carry a block's channels, so one narrowing routine serves
every family; layouts are tried in registration order and the first whose Linears the block
has wins. Narrowing is in place: weights, biases, ``in_features`` / ``out_features`` (or
``Conv1D.nf``) and the module attributes forward reads (GPT-2's ``num_heads`` and
``split_size``, Llama's ``intermediate_size``) are all updated, so forward, generate with a
KV cache and ONNX export see a consistent, smaller block. :mod:`cwca_export.compression.saving`
rebuilds the same shapes from a saved config with these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cwca_export.blocks import is_conv1d, is_linear_like, weight_out_in


class LayoutError(ValueError):
    """A block whose MLP or attention layout cannot be narrowed."""


# ---------------------------------------------------------------- narrowing one Linear


@torch.no_grad()
def narrow_linear(module: nn.Module, dim: str, index: torch.Tensor) -> None:
    """Keep only the outputs (``dim="out"``) or inputs (``dim="in"``) listed in ``index``, in place.

    Works on ``nn.Linear`` (weight ``(out, in)``) and GPT-2's ``Conv1D`` (weight ``(in, out)``);
    a bias follows the outputs.
    """
    if not is_linear_like(module):
        raise LayoutError(
            f"cannot narrow a {type(module).__name__}; hint: apply structured width before low-rank"
        )
    index = index.to(module.weight.device)
    axis = {"out": 0, "in": 1}[dim]
    if is_conv1d(module):
        axis = 1 - axis
    module.weight = nn.Parameter(module.weight.index_select(axis, index).contiguous())
    if dim == "out" and module.bias is not None:
        module.bias = nn.Parameter(module.bias.index_select(0, index).contiguous())
    if is_conv1d(module):
        module.nf, module.nx = module.weight.shape[1], module.weight.shape[0]
    else:
        module.out_features, module.in_features = module.weight.shape


def features(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear-like layer or of a factorised pair ``Sequential(A, B)``."""
    if isinstance(module, nn.Sequential):
        return weight_out_in(module[-1]).shape[0], weight_out_in(module[0]).shape[1]
    out_features, in_features = weight_out_in(module).shape
    return out_features, in_features


def _get(block: nn.Module, path: str) -> nn.Module:
    return block.get_submodule(path)


def _parent(block: nn.Module, path: str) -> nn.Module:
    return block.get_submodule(path.rpartition(".")[0]) if "." in path else block


# ---------------------------------------------------------------- MLP layouts


@dataclass(frozen=True)
class MlpLayout:
    """Where a block's MLP channels live.

    Attributes:
        name: layout name, for messages.
        up: Linears whose output rows are channels (gate and up projections).
        down: the Linear whose input columns are channels.
        fused: channel groups stacked in each ``up`` Linear's rows (Phi-3's gate_up_proj: 2).
    """

    name: str
    up: tuple[str, ...]
    down: str
    fused: int = 1

    def matches(self, block: nn.Module) -> bool:
        names = dict(block.named_modules())
        return all(p in names for p in (*self.up, self.down))

    def width(self, block: nn.Module) -> int:
        """d_ff, the block's intermediate channels."""
        return features(_get(block, self.down))[1]

    def down_weight(self, block: nn.Module) -> torch.Tensor:
        """The down projection as ``(hidden, d_ff)``."""
        return weight_out_in(_get(block, self.down))

    def narrow(self, block: nn.Module, keep: torch.Tensor) -> None:
        """Keep the channels ``keep`` (sorted indices into d_ff), in place."""
        width = self.width(block)
        rows = torch.cat([keep + g * width for g in range(self.fused)])
        for path in self.up:
            narrow_linear(_get(block, path), "out", rows)
        narrow_linear(_get(block, self.down), "in", keep)
        mlp = _parent(block, self.down)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(keep)


MLP_LAYOUTS: list[MlpLayout] = [
    MlpLayout(
        "gated", up=("mlp.gate_proj", "mlp.up_proj"), down="mlp.down_proj"
    ),  # Llama, Mistral, Qwen2, Gemma
    MlpLayout("fused-gated", up=("mlp.gate_up_proj",), down="mlp.down_proj", fused=2),  # Phi-3
    MlpLayout("gpt2", up=("mlp.c_fc",), down="mlp.c_proj"),  # GPT-2
]


def mlp_layout(block: nn.Module, name: str = "block") -> MlpLayout:
    """The first registered MLP layout the block has; otherwise a LayoutError naming them."""
    for layout in MLP_LAYOUTS:
        if layout.matches(block):
            return layout
    known = ", ".join(f"{lay.name} ({', '.join((*lay.up, lay.down))})" for lay in MLP_LAYOUTS)
    raise LayoutError(
        f"{name}: no known MLP layout (known: {known}); structured width cannot narrow it"
    )


# ---------------------------------------------------------------- attention layouts


@dataclass(frozen=True)
class AttentionLayout:
    """Where a block's attention heads live.

    Attributes:
        name: layout name, for messages.
        q, k, v: Linears whose output rows are heads; all three the same path when fused
            (GPT-2's c_attn stacks q, k, v rows).
        o: the output projection, whose input columns are query heads.
        refuse: when set, this layout is recognised but cannot lose heads; the reason.
    """

    name: str
    q: str
    k: str
    v: str
    o: str
    refuse: str | None = None

    @property
    def fused(self) -> bool:
        return self.q == self.k == self.v

    def matches(self, block: nn.Module) -> bool:
        names = dict(block.named_modules())
        return all(p in names for p in (self.q, self.k, self.v, self.o))

    def attention(self, block: nn.Module) -> nn.Module:
        return _parent(block, self.o)

    def head_dim(self, block: nn.Module) -> int:
        return int(self.attention(block).head_dim)

    def heads(self, block: nn.Module) -> tuple[int, int]:
        """(query heads, key/value heads) of the block."""
        n_q = features(_get(block, self.o))[1] // self.head_dim(block)
        attn = self.attention(block)
        if hasattr(attn, "num_key_value_heads"):  # Phi-3 keeps it; q, k and v share one Linear
            return n_q, int(attn.num_key_value_heads)
        if self.fused:  # GPT-2: multi-head attention, one KV head per query head
            return n_q, n_q
        return n_q, features(_get(block, self.k))[0] // self.head_dim(block)

    def o_weight(self, block: nn.Module) -> torch.Tensor:
        """The output projection as ``(hidden, heads * head_dim)``."""
        return weight_out_in(_get(block, self.o))

    def narrow(self, block: nn.Module, keep_groups: torch.Tensor) -> None:
        """Keep the KV groups ``keep_groups`` (sorted), each with all its query heads, in place."""
        n_q, n_kv = self.heads(block)
        hd, per_group = self.head_dim(block), n_q // n_kv
        device = keep_groups.device
        kv_heads = keep_groups
        q_heads = (
            keep_groups[:, None] * per_group + torch.arange(per_group, device=device)
        ).reshape(-1)
        q_rows = _head_rows(q_heads, hd)
        kv_rows = _head_rows(kv_heads, hd)
        if self.fused:  # q | k | v stacked, each n_q * hd rows
            width = n_q * hd
            narrow_linear(
                _get(block, self.q),
                "out",
                torch.cat([q_rows, kv_rows + width, kv_rows + 2 * width]),
            )
        else:
            narrow_linear(_get(block, self.q), "out", q_rows)
            narrow_linear(_get(block, self.k), "out", kv_rows)
            narrow_linear(_get(block, self.v), "out", kv_rows)
        narrow_linear(_get(block, self.o), "in", q_rows)
        attn = self.attention(block)
        kept_q, kept_kv = len(q_heads), len(kv_heads)
        for attr, value in (
            ("num_heads", kept_q),
            ("num_key_value_heads", kept_kv),
            ("split_size", kept_q * hd),  # GPT-2 splits c_attn's output by this
        ):
            if hasattr(attn, attr):
                setattr(attn, attr, value)


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


_PHI3_REFUSAL = (
    "Phi-3's fused qkv_proj splits q, k and v by the model-wide config head counts, so heads"
    " cannot differ per block; hint: prune MLP width only (drop --heads; Python: heads=False)"
)

ATTENTION_LAYOUTS: list[AttentionLayout] = [
    AttentionLayout(
        "split",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.o_proj",
    ),  # Llama, Mistral, Qwen2, Gemma
    AttentionLayout("gpt2", q="attn.c_attn", k="attn.c_attn", v="attn.c_attn", o="attn.c_proj"),
    AttentionLayout(
        "fused-qkv",
        q="self_attn.qkv_proj",
        k="self_attn.qkv_proj",
        v="self_attn.qkv_proj",
        o="self_attn.o_proj",
        refuse=_PHI3_REFUSAL,
    ),  # Phi-3
]


def attention_layout(block: nn.Module, name: str = "block") -> AttentionLayout:
    """The first registered attention layout the block has; otherwise a LayoutError."""
    for layout in ATTENTION_LAYOUTS:
        if layout.matches(block):
            return layout
    raise LayoutError(f"{name}: no known attention layout; head pruning cannot narrow it")


# ---------------------------------------------------------------- choosing what to keep


def kept_width(width: int, rho: float, multiple: int = 8) -> int:
    """(1 - rho) * width rounded to the nearest multiple of ``multiple``, within [multiple, width].

    rho = 0 keeps the block whole even when ``width`` is not itself a multiple.

    Example:
        >>> kept_width(64, 0.5), kept_width(64, 0.3), kept_width(64, 0.99)
        (32, 48, 8)
    """
    if multiple < 1:
        raise ValueError(f"multiple {multiple}: must be >= 1")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"width ratio rho {rho}: must lie in [0, 1]")
    if rho == 0:
        return width
    kept = int(round((1.0 - rho) * width / multiple)) * multiple
    return int(min(width, max(multiple, kept)))


def kept_groups(groups: int, rho: float) -> int:
    """KV groups kept: round((1 - rho) * groups), at least one."""
    return int(min(groups, max(1, round((1.0 - rho) * groups))))


def channel_importance(down_weight: torch.Tensor, input_norms: torch.Tensor | None) -> torch.Tensor:
    """Activation-weighted magnitude of each channel j: ||X_j||_2 * ||W_down[:, j]||_2, ``(d_ff,)``.

    It is the Frobenius norm of channel j's contribution to the layer's output over the
    calibration tokens when the channel is uncorrelated with the others; without data
    (``input_norms`` None) it is the column norm alone.
    """
    importance = torch.linalg.vector_norm(down_weight.detach().float(), dim=0)
    return importance if input_norms is None else importance * input_norms.float()


def group_importance(
    o_weight: torch.Tensor, input_norms: torch.Tensor | None, heads: int, groups: int
) -> torch.Tensor:
    """Importance of each KV group: the summed channel importance of its query heads' columns.

    Args:
        o_weight: output projection ``(hidden, heads * head_dim)``.
        input_norms: ||X_j|| of the output projection's inputs, or None.
        heads, groups: query heads and KV groups (heads is a multiple of groups).
    """
    columns = channel_importance(o_weight, input_norms)  # (heads * hd,)
    return columns.reshape(groups, -1).sum(dim=1)


def top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in increasing index order (channel order is kept)."""
    return torch.topk(scores, k).indices.sort().values
