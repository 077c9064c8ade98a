"""Hardware budgets: memory and latency limits, the workload they apply to, hardware profiles.

A :class:`Budget` is checked on measured numbers of the artifact (docs/design.md 4):

- memory: the artifact's bytes on disk and the ONNX Runtime session's resident bytes at
  ``batch`` sequences and ``context`` tokens (KV cache included) must both fit ``max_memory``;
- latency: p50 milliseconds per decoded token at ``batch`` (``max_latency_ms``) and, when set,
  p50 milliseconds for a prefill of ``prompt_len`` tokens (``max_prefill_ms``). The decode limit
  may name a peer instead (``latency_peer="int8"``: no slower than the model's plain dynamic
  int8 export, measured on the same machine; the search fills in ``max_latency_ms``).

Hardware profiles are data (``recipes/hardware/*.yaml``) naming memory, execution provider
and dtype; they load strictly, so a misspelt key is an error.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

# recipes/ installs as cwca_export.recipes (a package-dir mapping), so this works from a wheel too
PROFILE_DIR = Path(str(files("cwca_export.recipes") / "hardware"))
EPS = ("cpu", "cuda")
LATENCY_PEERS = ("int8",)  # `--max-latency-ms int8`: the model's plain dynamic int8 export (a CPU kernel)
DTYPES = ("fp32", "fp16")
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes from ``"1.5GiB"``, ``"300MB"``, ``"4096"`` or an int (KB/MB/GB are powers of 1000).

    Example:
        >>> parse_size("1.5GiB"), parse_size("300MB"), parse_size(4096)
        (1610612736, 300000000, 4096)
    """
    if isinstance(text, int):
        value, unit = text, ""
    else:
        match = _SIZE.match(str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"size {text!r}: expected a number with an optional unit B, KB, MB, GB, TB"
                " (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 1.5GiB or 300MB"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(round(value * _UNITS[unit]))
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


def latency_limit(value: float | str | None) -> dict[str, Any]:
    """:class:`Budget` keywords of a decode limit given as milliseconds or as a peer's name
    (``"int8"``, see :data:`LATENCY_PEERS`), as ``--max-latency-ms`` takes it."""
    return {"latency_peer": value} if isinstance(value, str) else {"max_latency_ms": value}


def format_size(n: float) -> str:
    """``1536 -> '1.50 KiB'``: human-readable binary units."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Budget:
    """Limits on the artifact and the workload they are measured at.

    Attributes:
        max_memory: bytes; disk bytes and session resident bytes must both fit. None: no limit.
        max_disk: bytes of the artifact's files alone (what a download or a flash partition
            holds): every file but ``cwca_manifest.json``, which records them. None: no limit.
        max_latency_ms: p50 ms per decoded token at ``batch``. None: no limit.
        max_prefill_ms: p50 ms for a prefill of ``prompt_len`` tokens at ``batch``. None: no limit.
        ep: ONNX Runtime execution provider, ``"cpu"`` or ``"cuda"``.
        dtype: float dtype of the artifact, ``"fp32"`` or ``"fp16"`` (GPU providers).
        batch: sequences per call (B).
        prompt_len: prefill length (P).
        context: tokens held by the KV cache at the decode step measured (>= prompt_len + 1).
        latency_peer: ``"int8"``: the decode limit is the p50 of the model's plain dynamic int8
            export (``--quantize int8``), measured here; a search builds that peer first, sets
            ``max_latency_ms`` to its p50 and confirms its winner against it side by side.
    """

    max_memory: int | None = None
    max_disk: int | None = None
    max_latency_ms: float | None = None
    max_prefill_ms: float | None = None
    ep: str = "cpu"
    dtype: str = "fp32"
    batch: int = 1
    prompt_len: int = 32
    context: int = 128
    latency_peer: str | None = None

    def __post_init__(self) -> None:
        if self.ep not in EPS:
            raise ValueError(f"budget: ep {self.ep!r}: choose one of {EPS} (--ep)")
        if self.dtype not in DTYPES:
            raise ValueError(f"budget: dtype {self.dtype!r}: choose one of {DTYPES} (--dtype)")
        if self.batch < 1 or self.prompt_len < 1:
            raise ValueError("budget: --batch and --prompt-len must be >= 1")
        if self.context <= self.prompt_len:
            raise ValueError(
                f"budget: --context {self.context} must exceed --prompt-len {self.prompt_len}"
                " (the decode step runs over the full context)"
            )
        if self.latency_peer is not None:
            if self.latency_peer not in LATENCY_PEERS:
                raise ValueError(f"budget: --max-latency-ms {self.latency_peer!r}: give milliseconds or one of"
                                 f" {', '.join(LATENCY_PEERS)}")
            if self.ep != "cpu":
                raise ValueError(f"budget: --max-latency-ms {self.latency_peer} compares with dynamic int8, a CPU"
                                 " kernel; hint: give milliseconds with --ep cuda")
        for name in ("max_memory", "max_disk", "max_latency_ms", "max_prefill_ms"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"budget: {flag} must be a positive finite number, got {value}")

    @property
    def has_limits(self) -> bool:
        """True when any limit is set (a search runs); False when only the workload is given."""
        return any(v is not None for v in (self.max_memory, self.max_disk, self.max_latency_ms, self.max_prefill_ms,
                                           self.latency_peer))

    @property
    def limits_latency(self) -> bool:
        """True when decode or prefill latency is limited (by milliseconds or by a peer)."""
        return any(v is not None for v in (self.max_latency_ms, self.max_prefill_ms, self.latency_peer))

    def check(self, disk_bytes: int, resident_bytes: int | None, latency_ms: dict[str, Any]) -> dict[str, Any]:
        """Which limits the measured numbers meet: ``{"met": bool, "checks": [...]}``."""
        checks = []
        if self.max_memory is not None:
            checks.append(_limit("disk_bytes", disk_bytes, self.max_memory))
            if resident_bytes is None:
                where = "the GPU's memory (nvidia-smi)" if self.ep == "cuda" else "the process's memory (Linux /proc)"
                raise ValueError(f"--max-memory needs the resident memory, and {where} could not be read here;"
                                 " hint: use --max-disk, or run where it can be read")
            checks.append(_limit("resident_bytes", resident_bytes, self.max_memory))
        if self.max_disk is not None:
            checks.append(_limit("disk_bytes", disk_bytes, self.max_disk))
        if self.max_latency_ms is not None:
            checks.append(_limit("decode_p50_ms", latency_ms["decode"]["p50"], self.max_latency_ms))
        if self.max_prefill_ms is not None:
            checks.append(_limit("prefill_p50_ms", latency_ms["prefill"]["p50"], self.max_prefill_ms))
        return {"met": all(c["met"] for c in checks), "checks": checks}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_profile(cls, profile: HardwareProfile | str | os.PathLike, **overrides: Any) -> Budget:
        """A budget from a hardware profile; keyword arguments that are not None override it."""
        if not isinstance(profile, HardwareProfile):
            profile = load_profile(profile)
        base = cls(max_memory=profile.memory, ep=profile.ep, dtype=profile.dtype)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _limit(name: str, measured: float, limit: float) -> dict[str, Any]:
    return {"name": name, "measured": measured, "limit": limit, "met": bool(measured <= limit)}


@dataclass(frozen=True)
class HardwareProfile:
    """A deployment target, as data.

    Attributes:
        name: profile name (the file stem).
        description: what the machine is.
        memory: bytes available to the model (parsed from ``"8GiB"``-style sizes).
        ep: ONNX Runtime execution provider.
        dtype: float dtype the target runs best.
    """

    name: str
    description: str
    memory: int
    ep: str
    dtype: str

    def __post_init__(self) -> None:
        Budget(ep=self.ep, dtype=self.dtype)  # same validation as a budget


def available_profiles() -> list[str]:
    """Names of the shipped hardware profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | os.PathLike) -> HardwareProfile:
    """Load a profile by shipped name (``jetson-orin-8gb``) or YAML path; unknown keys are errors.

    Example:
        >>> load_profile("cpu-2core-24gb").ep
        'cpu'
    """
    import yaml

    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(
            f"hardware profile {str(name_or_path)!r} not found; available: {', '.join(available_profiles())}"
            " (or pass a path to a YAML file to --hardware)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}); pass a YAML profile to --hardware") from None
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise ValueError(f"{path}: not valid YAML ({first}); fix it or pass a shipped profile to --hardware") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a hardware profile is a YAML mapping (--hardware)")
    known = {f.name for f in fields(HardwareProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; allowed: {sorted(known)} (--hardware)")
    missing = sorted(known - set(data) - {"name"})
    if missing:
        raise ValueError(f"{path}: missing keys {missing} (--hardware)")
    data.setdefault("name", path.stem)
    for key in ("name", "description", "ep", "dtype"):
        if not isinstance(data[key], str):
            raise ValueError(f"{path}: {key}: expected text, got {data[key]!r} (--hardware)")
    memory = data["memory"]
    if isinstance(memory, bool) or not isinstance(memory, (str, int)):  # YAML's true is an int to Python
        raise ValueError(f"{path}: memory: expected a size such as 8GiB or 300MB, got {memory!r} (--hardware)")
    for key, allowed in (("ep", EPS), ("dtype", DTYPES)):
        if data[key] not in allowed:
            raise ValueError(f"{path}: {key}: {data[key]!r}; choose one of {', '.join(allowed)} (--hardware)")
    try:
        memory = parse_size(memory)
    except ValueError as exc:
        raise ValueError(f"{path}: memory: {exc} (--hardware)") from None
    return HardwareProfile(**{**data, "memory": memory})
