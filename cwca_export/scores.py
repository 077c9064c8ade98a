"""`LayerScores`: per-block gains as the scorer measured them, and their qualities q_k.

NumPy only. The scorer writes every raw number it has (zeta2, ||g||^2, trace F, ...) so a
plan can be re-solved without re-scoring; `qualities()` is where DESIGN 2.1's floor lives.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cwca_export._jsonio import check_versioned, read_versioned, warn_unknown, write_json_atomic

SCORES_SCHEMA_VERSION = 1
DEFAULT_Q_FLOOR_TAU = 0.05  # q_min = tau * median(q > 0): a zero-gain block never gets an unbounded ratio


def qualities(zeta2: np.ndarray, tau: float = DEFAULT_Q_FLOOR_TAU) -> np.ndarray:
    """Normalise gains to q_k = zeta2_k / sum_j zeta2_j and floor them at tau * median(q > 0).

    Args:
        zeta2: non-negative per-block gains.
        tau: floor as a fraction of the median positive quality; 0 disables the floor.

    Returns:
        The floored qualities (not renormalised: the floor only lifts near-zero blocks).

    Example:
        >>> qualities(np.array([0.0, 1.0, 3.0])).round(4).tolist()
        [0.0125, 0.25, 0.75]
    """
    z = np.asarray(zeta2, dtype=np.float64)
    if z.ndim != 1 or z.size == 0:
        raise ValueError("zeta2: expected a non-empty 1-D array of per-block gains")
    if not np.all(np.isfinite(z)) or np.any(z < 0):
        raise ValueError("zeta2: gains must be finite and non-negative")
    if tau < 0:
        raise ValueError("tau: the quality floor must be non-negative")
    total = z.sum()
    if total == 0:  # no block has any gain: nothing distinguishes them
        return np.full(z.size, 1.0 / z.size)
    q = z / total
    positive = q[q > 0]
    floor = tau * float(np.median(positive))
    return np.maximum(q, floor)


@dataclass
class LayerScores:
    """Per-block scores of one model on one calibration set.

    Attributes:
        method: estimator name (``fisher``, ``kfac``, ``exact``, ``gradnorm``, ...).
        zeta2: the score per block; for curvature methods g_k^T (H_kk + lambda I)^-1 g_k.
        n_params: prunable weights n_k per block (the pruning program's weights).
        block_names: module path of each block, e.g. ``model.layers.0``.
        stats: every other raw per-block statistic, by name (``grad_sq_norm``,
            ``fisher_trace``, ``zeta2_noise_ratio`` = zeta2 * N / n_k, ...).
        samples: calibration sequences N; tokens: tokens seen.
        settings: estimator settings (damping, seq_len, seed, ...).
        model: provenance of the model (``fingerprint``, ``name_or_path``, ``architecture``).
        data_hash: hash of the calibration token ids.
        versions: library versions that produced the file.
        wall_time_s: scoring wall time.
    """

    method: str
    zeta2: list[float]
    n_params: list[int]
    block_names: list[str] = field(default_factory=list)
    stats: dict[str, list[float]] = field(default_factory=dict)
    samples: int = 0
    tokens: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    data_hash: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    wall_time_s: float | None = None
    schema_version: int = SCORES_SCHEMA_VERSION

    def __post_init__(self) -> None:
        self.zeta2 = [float(v) for v in self.zeta2]
        self.n_params = [int(v) for v in self.n_params]
        k = len(self.zeta2)
        if k == 0:
            raise ValueError("LayerScores: zeta2 is empty; a model has at least one block")
        if len(self.n_params) != k:
            raise ValueError(f"LayerScores: n_params has {len(self.n_params)} entries, zeta2 {k}")
        if not self.block_names:
            self.block_names = [f"block.{i}" for i in range(k)]
        if len(self.block_names) != k:
            raise ValueError(f"LayerScores: block_names has {len(self.block_names)} entries, zeta2 {k}")
        for name, values in self.stats.items():
            if len(values) != k:
                raise ValueError(f"LayerScores: stats[{name!r}] has {len(values)} entries, not {k}")
        z = np.asarray(self.zeta2)
        if not np.all(np.isfinite(z)) or np.any(z < 0):
            raise ValueError("LayerScores: zeta2 must be finite and non-negative")
        if any(n <= 0 for n in self.n_params):
            raise ValueError("LayerScores: every block needs a positive n_params")

    @property
    def num_blocks(self) -> int:
        return len(self.zeta2)

    def qualities(self, tau: float = DEFAULT_Q_FLOOR_TAU) -> np.ndarray:
        """The floored qualities q_k of DESIGN 2.1 (see :func:`qualities`)."""
        return qualities(np.asarray(self.zeta2), tau)

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body.pop("schema_version")
        # q is derived; written for people reading the file, ignored on load.
        return {
            "_type": "LayerScores",
            "schema_version": self.schema_version,
            **body,
            "q": self.qualities().tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "input") -> LayerScores:
        data = check_versioned(data, "LayerScores", SCORES_SCHEMA_VERSION, source=source)
        known = {f for f in cls.__dataclass_fields__} | {"_type", "q"}
        warn_unknown(data, known, "LayerScores")
        kwargs = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a required field is missing
            raise ValueError(f"{source}: not a complete LayerScores file ({exc})") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write scores.json atomically."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> LayerScores:
        return cls.from_dict(read_versioned(path, "LayerScores", SCORES_SCHEMA_VERSION), source=str(path))
