"""`LayerScores`: per-block gains as the scorer measured them, and their qualities q_k.

NumPy only. The scorer writes every raw number it has (zeta2, ||g||^2, trace F, ...) so a
plan can be re-solved without re-scoring; `qualities()` is where docs/design.md 2.1's floor lives.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cwca_export.jsonio import check_versioned, read_versioned, warn_unknown, write_json_atomic

SCORES_SCHEMA_VERSION = 1
DEFAULT_Q_FLOOR_TAU = 0.05  # q_min = tau * median(q > 0): a zero-gain block never gets an unbounded ratio
# A block is "within noise" when snr < this, i.e. its score is below twice its noise floor:
# sampling noise makes up at least half of the score. A share, not a significance test.
NOISE_SNR_THRESHOLD = 1.0
SNR_MAX = 1e12  # snr written when the floor vanishes (JSON has no infinity)


class ScoreNoiseWarning(UserWarning):
    """Most blocks score within their noise floor: the block ranking is mostly sampling noise."""


def signal_to_noise(score: float, noise_floor: float) -> float:
    """snr = (score - noise_floor) / noise_floor: the estimated signal over the noise floor.

    ``score`` is the raw (biased) score and ``noise_floor`` the part of its expectation that
    sampling noise contributes, so ``score - noise_floor`` is the debiased score: snr is about
    0 for a block whose mean gradient is zero and grows with the signal. It lies in
    [-1, SNR_MAX]; a zero floor gives 0 for a zero score and SNR_MAX otherwise.

    Example:
        >>> signal_to_noise(3.0, 1.0), signal_to_noise(1.0, 1.0), signal_to_noise(0.0, 0.0)
        (2.0, 0.0, 0.0)
    """
    if not (math.isfinite(score) and math.isfinite(noise_floor)):
        raise ValueError(f"signal_to_noise: score {score} and noise floor {noise_floor} must be finite")
    if noise_floor <= 0:
        return 0.0 if score <= 0 else SNR_MAX
    return min((score - noise_floor) / noise_floor, SNR_MAX)


def within_noise(snr: Sequence[float], threshold: float = NOISE_SNR_THRESHOLD) -> list[bool]:
    """Per block, whether snr < ``threshold`` (default: the score is below twice its floor)."""
    return [float(s) < threshold for s in snr]


def warn_if_within_noise(
    snr: Sequence[float], *, method: str, samples: int, debiased: bool = False, stacklevel: int = 2
) -> int:
    """Count the blocks within noise and warn (:class:`ScoreNoiseWarning`) when they are most.

    Args:
        snr: per-block :func:`signal_to_noise`.
        method: the estimator, named in the hint.
        samples: N calibration sequences, named in the message.
        debiased: the scores are already debiased (the hint then leaves ``--debias`` out).
        stacklevel: as for :func:`warnings.warn`, counted from this function's caller
            (2, the default, names the caller's caller).

    Returns:
        The number of blocks within noise.
    """
    count = sum(within_noise(snr))
    if 2 * count > len(snr):
        hints = ["score more sequences (num_samples / --samples)"]
        if not debiased:
            hints.append("debias the scores (debias=True / --debias)")
        hints.append("use obd, which has no noise floor" if method == "gradnorm"
                     else "switch to gradnorm (a differently weighted floor) or obd (no floor)")
        warnings.warn(
            f"{count} of {len(snr)} blocks score within their noise floor ({method}, N = {samples}:"
            f" snr < {NOISE_SNR_THRESHOLD:g}, noise is at least half of the score), so the block"
            f" ranking is mostly sampling noise; hint: {', '.join(hints[:-1])} or {hints[-1]}",
            ScoreNoiseWarning,
            stacklevel=stacklevel + 1,
        )
    return count


def qualities(zeta2: np.ndarray, tau: float = DEFAULT_Q_FLOOR_TAU) -> np.ndarray:
    """Normalise gains to q_k = zeta2_k / sum_j zeta2_j and floor them at tau * median(q > 0).

    Args:
        zeta2: non-negative per-block gains.
        tau: floor as a fraction of the median positive quality; 0 disables the floor.

    Returns:
        The floored qualities (not renormalised: the floor only lifts near-zero blocks).

    Example:
        >>> qualities(np.array([0.0, 1.0, 3.0])).round(4).tolist()
        [0.025, 0.25, 0.75]
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
            ``fisher_trace``, ``zeta2_noise_ratio`` = zeta2 * N / n_k, ``noise_floor`` and
            ``snr`` for the methods with a noise floor, ...).
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

    def within_noise(self, threshold: float = NOISE_SNR_THRESHOLD) -> list[bool] | None:
        """Per block, whether its score is within noise (``stats["snr"]`` < threshold);
        None for methods that record no snr."""
        snr = self.stats.get("snr")
        return None if snr is None else within_noise(snr, threshold)

    def qualities(self, tau: float = DEFAULT_Q_FLOOR_TAU) -> np.ndarray:
        """The floored qualities q_k of docs/design.md 2.1 (see :func:`qualities`)."""
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
