"""Checkpoints of a long ``score``: every pass's accumulators, saved atomically every N sequences.

A pass over the data (:meth:`~cwca_export.scoring.passes.ScoringRun.gradient_pass`,
``forward_pass``) hands its accumulators (tensors, dataclasses of them, lists and dicts) to
the run. Every ``every`` sequences the accumulators of the finished passes and of the current
one, with the number of sequences it has done, go to one safetensors file (no pickle), written
atomically beside the output. A resumed run loads them back, skips the finished passes and the
done sequences, and goes on in the same order, so it adds the same numbers in the same order as
an uninterrupted run and ends with the same scores.

The file carries the identity of the run (model fingerprint, data hash, method, options,
sequences, damping...): a checkpoint of another run is refused, never silently mixed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_TYPE = "CwcaScoreCheckpoint"
CHECKPOINT_SCHEMA_VERSION = 1
_META_KEY = "cwca_checkpoint"


def checkpoint_path(out: str | os.PathLike) -> Path:
    """Where the checkpoint of a scores file lives: ``<out>.checkpoint`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoint")


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _flatten(getattr(obj, f.name), f"{prefix}.{f.name}", tensors, scalars)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{prefix}[{key}]", tensors, scalars)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            _flatten(value, f"{prefix}[{i}]", tensors, scalars)
    elif obj is None or isinstance(obj, (bool, int, float)):
        scalars[prefix] = obj
    else:
        raise TypeError(f"checkpoint: cannot save accumulator {prefix} of type {type(obj).__name__}")


def _restore(obj: Any, prefix: str, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        saved = tensors[prefix]
        if saved.shape != obj.shape:
            raise ValueError(f"checkpoint: {prefix} has shape {tuple(saved.shape)}, expected {tuple(obj.shape)}")
        obj.copy_(saved)
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, _restore(getattr(obj, f.name), f"{prefix}.{f.name}", tensors, scalars))
        return obj
    if isinstance(obj, dict):
        for key in obj:
            obj[key] = _restore(obj[key], f"{prefix}[{key}]", tensors, scalars)
        return obj
    if isinstance(obj, list):
        for i in range(len(obj)):
            obj[i] = _restore(obj[i], f"{prefix}[{i}]", tensors, scalars)
        return obj
    return scalars[prefix]


def read_checkpoint_header(path: Path) -> dict[str, Any] | None:
    """The checkpoint's JSON header, or None when ``path`` is not a checkpoint cwca-export wrote."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        header = json.loads(meta.get(_META_KEY, "null"))
    except Exception:  # any unreadable file is simply not ours
        return None
    if isinstance(header, dict) and header.get("_type") == CHECKPOINT_TYPE:
        return header
    return None


class ScoreCheckpoint:
    """The checkpoint of one scoring run: saves accumulators, restores them on resume.

    Args:
        path: the checkpoint file.
        every: save after at least this many sequences of a pass since the last save.
        identity: what makes two runs the same run (hashed into the file).
        resume: load ``path`` if it exists (else start afresh).
    """

    def __init__(self, path: str | os.PathLike, every: int, identity: dict[str, Any], *, resume: bool) -> None:
        if every < 1:
            raise ValueError(f"checkpoint_every {every}: must be >= 1 (--checkpoint-every)")
        self.path = Path(path)
        self.every = every
        self.run_id = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
        self.identity = identity
        self._passes: list[dict[str, Any]] = []  # index -> {"state", "done", "total"} of this run
        self._saved: list[dict[str, Any]] = []  # what the loaded file holds per pass
        self._tensors: dict[str, torch.Tensor] = {}
        self.resumed_sequences = 0
        if resume and self.path.exists():
            self._load()

    def _load(self) -> None:
        from safetensors import safe_open

        header = read_checkpoint_header(self.path)
        if header is None:
            raise ValueError(f"{self.path}: not a checkpoint written by cwca-export score; hint: pass another --out")
        if header.get("schema_version", 0) > CHECKPOINT_SCHEMA_VERSION:
            raise ValueError(f"{self.path}: written by a newer cwca-export; hint: pip install -U cwca-export")
        if header.get("run") != self.run_id:
            differs = sorted(k for k, v in self.identity.items() if header.get("identity", {}).get(k) != _jsonable(v))
            raise ValueError(
                f"{self.path}: a checkpoint of another run (differs in {', '.join(differs) or 'identity'});"
                " hint: rerun with the same options, or without --resume to start afresh"
            )
        with safe_open(str(self.path), framework="pt") as fh:
            self._tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 (a safetensors handle)
        self._saved = header["passes"]

    def restore(self, index: int, state: Any, total: int) -> int:
        """Load pass ``index``'s saved accumulators into ``state``; the sequences it had done."""
        self._passes.append({"state": state, "done": 0, "saved": 0, "total": total})
        if index >= len(self._saved):
            return 0
        saved = self._saved[index]
        if saved["total"] != total:
            raise ValueError(f"{self.path}: pass {index} had {saved['total']} sequences, this run has {total}")
        prefix = f"p{index}"
        tensors = {
            k[len(prefix):]: v for k, v in self._tensors.items()
            if k == prefix or k.startswith((prefix + ".", prefix + "["))
        }
        _restore(state, "", tensors, saved["scalars"])
        self._passes[index].update(done=saved["done"], saved=saved["done"])
        self.resumed_sequences += saved["done"]
        return int(saved["done"])

    def progress(self, index: int, done: int) -> None:
        """Pass ``index`` has done ``done`` sequences; save every ``every`` of them and at its end."""
        entry = self._passes[index]
        entry["done"] = done
        if done - entry["saved"] >= self.every or done == entry["total"]:
            self.save()

    def save(self) -> None:
        """Write every pass's accumulators and progress, atomically."""
        from safetensors.torch import save as to_bytes

        from cwca_export.jsonio import write_bytes_atomic

        tensors: dict[str, torch.Tensor] = {}
        passes = []
        for index, entry in enumerate(self._passes):
            found: dict[str, torch.Tensor] = {}
            scalars: dict[str, Any] = {}
            _flatten(entry["state"], "", found, scalars)
            tensors.update({f"p{index}{k}": v.detach().to("cpu").contiguous().clone() for k, v in found.items()})
            passes.append({"done": entry["done"], "total": entry["total"], "scalars": scalars})
            entry["saved"] = entry["done"]
        header = {
            "_type": CHECKPOINT_TYPE,
            "schema_version": CHECKPOINT_SCHEMA_VERSION,
            "run": self.run_id,
            "identity": {k: _jsonable(v) for k, v in self.identity.items()},
            "passes": passes,
        }
        write_bytes_atomic(self.path, to_bytes(tensors, metadata={_META_KEY: json.dumps(header)}))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))
