"""Artifact bytes predicted from tensor shapes and the storage scheme, before any export.

bytes(model) = weight bytes (exact, from every parameter's shape and how the scheme stores
it) + graph overhead (the protobuf structure and small folded constants, which do not scale
with widths or ranks; measured once on a reference export of the same architecture and
scheme). Storage per scheme, as ONNX Runtime's tools write it:

- ``fp32`` / ``fp16``: 4 / 2 bytes per parameter.
- ``int8`` (``quantize_dynamic``): every MatMul / Gemm weight and embedding table (Gather) becomes
  int8 / uint8 with one float scale and one zero point per tensor (per output channel when
  ``per_channel``); the rest stays fp32.
- ``int4`` (``MatMulNBits``): a K x N MatMul weight becomes N * ceil(K / block) blocks of
  block / 2 bytes plus one fp32 scale per block (and a packed 4-bit zero point per block when
  asymmetric); embeddings and the rest stay fp32.
- GPT-2's ``Conv1D`` layers export as ``Gemm``, which ``MatMulNBits`` does not rewrite: their
  weights stay fp32 under int4 (so int4 buys GPT-2 little; int8 does quantize them).

Excluded modules keep fp32. Tied weights count once (an exporter that stores a transposed
copy for the tied head adds a constant that the calibrated overhead absorbs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from cwca_export.blocks import is_linear_like
from cwca_export.exporter.postprocess import QuantizeConfig

SCHEMES = ("fp32", "fp16", "int8", "int4")


def scheme_of(dtype: str, quantize: QuantizeConfig | None) -> str:
    """The storage scheme of an artifact: the quantization method, else the float dtype."""
    return quantize.method if quantize is not None else dtype


def _module_path(entry: str) -> str:
    # "/model/layers.0/mlp/down_proj/MatMul" -> "model.layers.0.mlp.down_proj"; paths pass through
    if entry.startswith("/"):
        return ".".join(entry.strip("/").split("/")[:-1])
    return entry.strip(".")


def _excluded(module: str, entries: Iterable[str]) -> bool:
    m = f".{module}."
    for entry in entries:
        e = f".{_module_path(entry)}."
        if e in m or e.endswith(m):  # module under the entry, or the entry nests the module
            return True
    return False


def _weight_bytes(kind: str, shape: tuple[int, ...], scheme: str, q: QuantizeConfig | None) -> int:
    numel = math.prod(shape)
    if scheme == "fp16":
        return 2 * numel
    if scheme == "fp32" or kind == "other" or (scheme == "int4" and kind in ("embedding", "gemm")):
        return 4 * numel
    if scheme == "int8":
        channels = (shape[0] if kind == "linear_out_first" else shape[-1]) if q and q.per_channel else 1
        return numel + 5 * channels  # int8 values + fp32 scale + int8 zero point
    # int4 MatMulNBits on a K x N MatMul weight
    n, k = shape  # nn.Linear weight: (out, in)
    block = q.block_size if q else 32
    blocks = math.ceil(k / block)
    zero_points = 0 if (q is None or q.symmetric) else n * math.ceil(blocks / 2)
    return n * blocks * block // 2 + n * blocks * 4 + zero_points


def _tensors(model: nn.Module) -> Iterable[tuple[str, str, tuple[int, ...]]]:
    """(module path, kind, shape) of every distinct parameter, in module order."""
    seen: set[int] = set()
    for path, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.data_ptr() in seen:
                continue
            seen.add(param.data_ptr())
            if name == "weight" and isinstance(module, nn.Linear):
                kind = "linear_out_first"  # (out, in)
            elif name == "weight" and is_linear_like(module):
                kind = "gemm"  # GPT-2 Conv1D (in, out): addmm exports as Gemm, which int4 does not rewrite
            elif name == "weight" and isinstance(module, nn.Embedding):
                kind = "embedding"
            else:
                kind = "other"
            yield path, kind, tuple(param.shape)


def weight_bytes(model: nn.Module, scheme: str, quantize: QuantizeConfig | None = None, *, exclude: Iterable[str] = ()) -> int:
    """Bytes the model's parameters occupy in an artifact of ``scheme`` (exact from shapes).

    Args:
        model: the torch model as it will be exported (compressed shapes included).
        scheme: ``fp32``, ``fp16``, ``int8`` or ``int4``.
        quantize: the quantization settings (block size, symmetry, per-channel).
        exclude: module paths or node names kept in fp32 (quantized schemes).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme {scheme!r}: choose one of {SCHEMES}")
    exclude = list(exclude)
    total = 0
    for path, kind, shape in _tensors(model):
        own = "fp32" if scheme in ("int8", "int4") and _excluded(path, exclude) else scheme
        total += _weight_bytes(kind, shape, own, quantize)
    return total


@dataclass(frozen=True)
class SizePredictor:
    """Predicts artifact bytes for one architecture, backend and scheme.

    Attributes:
        scheme: storage scheme (``fp32``, ``fp16``, ``int8``, ``int4``).
        overhead: graph bytes beyond the weights, measured on a reference export.
        quantize: quantization settings behind the scheme, if any.
        exclude: module paths or node names kept in fp32.
    """

    scheme: str
    overhead: int
    quantize: QuantizeConfig | None = None
    exclude: tuple[str, ...] = ()

    @classmethod
    def calibrate(
        cls, reference: nn.Module, artifact_bytes: int, scheme: str, quantize: QuantizeConfig | None = None, exclude: Iterable[str] = ()
    ) -> SizePredictor:
        """Fit the overhead on one real export of ``reference`` that took ``artifact_bytes``."""
        exclude = tuple(exclude)
        return cls(scheme, artifact_bytes - weight_bytes(reference, scheme, quantize, exclude=exclude), quantize, exclude)

    def predict(self, model: nn.Module) -> int:
        """Predicted bytes of ``model``'s artifact (graph files, without tokenizer and config)."""
        return self.overhead + weight_bytes(model, self.scheme, self.quantize, exclude=self.exclude)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "overhead_bytes": self.overhead,
            "quantize": None if self.quantize is None else self.quantize.to_dict(),
            "exclude": list(self.exclude),
        }
