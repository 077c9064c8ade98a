"""A precision-damage table measured once, data-parallel, and handed to ``export`` as a file.

The budget search of ``cwca-export export`` measures, for every group (decoder block,
embedding, head) and storage format, the calibration-loss increase of that group alone in that
format (:func:`cwca_export.planning.precision.measure_precision_damage`): (formats - 1) x K
block probes plus a full forward per embedding / head format, the search's costliest step.
``cwca-export score --estimator precision`` measures the same table under ``torchrun`` /
``accelerate launch`` (each process its share of the calibration batches, the loss sums
all-reduced, so every process holds the one-process table to float round-off) and writes it
here; ``cwca-export export --precision-damage FILE`` uses it instead of measuring.

The file records what the table is only valid for, and export refuses any other use:

- the model (:func:`cwca_export.blocks.model_fingerprint`, which includes the dtype: export
  measures in float32) and its precision groups;
- the formats (export's ``--formats`` must be among them; without ``--formats`` the search
  plans exactly the table's);
- the rounding: with ``clip`` every weight is clipped before it is quantized by a
  :class:`~cwca_export.planning.rounding.Clipper` made from the calibration inputs, so a
  ``clip`` table is another table than an ``rtn`` one;
- the calibration token ids (a SHA-256 of the ``(N, L)`` ids): the clipping and the probes
  depend on them, and export prices its candidates on its own ids, which must be these
  (the same ``--data``, ``--samples``, ``--seq-len`` and seed 0);
- the batch: :data:`EXPORT_BATCH_SIZE` sequences per forward, as the search measures (dynamic
  int8 quantizes a whole batch's activations with one scale).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cwca_export.planning.precision import PrecisionDamage, precision_groups

EXPORT_BATCH_SIZE = 8
"""Sequences per forward of export's search (:func:`cwca_export.exporter.search.fit_budget` measures and
prices in batches of 8). Dynamic int8 and int8 compute (``-a8``) quantize each call's activations
together, so their damage depends on the batch: a table for export is measured in these batches."""
TABLE_TYPE = "PrecisionDamageTable"
SCHEMA_VERSION = 1
ROUNDINGS = ("clip", "rtn")


def ids_digest(input_ids: Any) -> str:
    """SHA-256 of calibration token ids ``(N, L)`` (their shape and int64 values)."""
    ids = torch.as_tensor(getattr(input_ids, "input_ids", input_ids)).to(torch.int64).cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(ids.shape)}".encode())
    digest.update(ids.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


@dataclass
class PrecisionTable:
    """A measured :class:`~cwca_export.planning.precision.PrecisionDamage` and what it is valid for.

    Attributes:
        damage: the table (groups x formats, loss increase and bytes).
        model: ``fingerprint``, ``name_or_path``, ``architecture``, ``dtype``.
        rounding: ``clip`` or ``rtn``, as export's ``--rounding``.
        calibration: ``data``, ``samples``, ``seq_len``, ``seed``, ``batch_size``, ``ids_sha256``.
        processes: how many processes measured it.
        versions: library versions of the run.
    """

    damage: PrecisionDamage
    model: dict[str, Any]
    rounding: str
    calibration: dict[str, Any]
    processes: int = 1
    versions: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "_type": TABLE_TYPE, "schema_version": SCHEMA_VERSION, "model": self.model, "rounding": self.rounding,
            "calibration": self.calibration, "processes": self.processes, "table": self.damage.to_dict(),
            "versions": self.versions,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table atomically (complete or not at all)."""
        from cwca_export.jsonio import write_json_atomic

        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PrecisionTable:
        """Read a table ``score --estimator precision`` wrote (ValueError naming the file otherwise)."""
        from cwca_export.jsonio import read_versioned

        data = read_versioned(path, TABLE_TYPE, SCHEMA_VERSION)
        try:
            return cls(PrecisionDamage.from_dict(data["table"]), dict(data["model"]), str(data["rounding"]),
                       dict(data["calibration"]), int(data.get("processes", 1)), dict(data.get("versions", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a complete {TABLE_TYPE} ({exc}); hint: write it again with"
                             " cwca-export score MODEL_DIR --estimator precision --out FILE") from None

    def for_export(self, path: str | os.PathLike, model: nn.Module, calibration_ids: Any, rounding: str,
                   formats: str | None) -> tuple[PrecisionDamage, str]:
        """The table for an export of ``model`` priced on ``calibration_ids`` with ``rounding``,
        and the formats its search may plan (``formats``, or the table's when None).

        Raises:
            ValueError: the table was measured for another model, groups, formats, rounding or
                calibration ids (one line naming the flag to change).
        """
        from cwca_export.blocks import model_fingerprint
        from cwca_export.planning.precision import parse_formats

        again = f"or measure it again with cwca-export score MODEL_DIR --estimator precision --out {path}"
        mine = model_fingerprint(model)
        if self.model.get("fingerprint") != mine:
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            note = "" if self.model.get("dtype") in (None, dtype) else (
                f" (measured in {self.model['dtype']}; export measures in {dtype}: pass score --dtype {dtype})")
            raise ValueError(f"{path}: measured on another model (fingerprint {self.model.get('fingerprint')}, this"
                             f" model {mine}){note}; hint: pass the table of this MODEL_DIR, {again}")
        groups = [g.name for g in precision_groups(model)]
        if groups != self.damage.groups:
            raise ValueError(f"{path}: its precision groups ({', '.join(self.damage.groups)}) are not this model's"
                             f" ({', '.join(groups)}); hint: {again}")
        if self.rounding != rounding:
            raise ValueError(f"{path}: measured with --rounding {self.rounding}, this export rounds with --rounding"
                             f" {rounding}; hint: pass --rounding {self.rounding}, {again} --rounding {rounding}")
        if formats is None:
            chosen = list(self.damage.formats)
        else:
            chosen = [f.name for f in parse_formats(formats)]
            missing = [f for f in chosen if f not in self.damage.formats]
            if missing:
                raise ValueError(f"{path}: measured for formats {','.join(self.damage.formats)}, not"
                                 f" {','.join(missing)}; hint: pass --formats {','.join(self.damage.formats)}"
                                 f" (or leave it out), {again} --formats {','.join(chosen)}")
        if self.calibration.get("batch_size") != EXPORT_BATCH_SIZE:
            raise ValueError(f"{path}: measured in batches of {self.calibration.get('batch_size')}, export's search"
                             f" measures in batches of {EXPORT_BATCH_SIZE} (dynamic int8 quantizes a batch's"
                             f" activations together); hint: {again} --batch-size {EXPORT_BATCH_SIZE}")
        digest = ids_digest(calibration_ids)
        if self.calibration.get("ids_sha256") != digest:
            cal = self.calibration
            shape = tuple(torch.as_tensor(getattr(calibration_ids, "input_ids", calibration_ids)).shape)
            raise ValueError(
                f"{path}: measured on other calibration ids ({cal.get('samples')} x {cal.get('seq_len')} tokens of"
                f" {cal.get('data')}, seed {cal.get('seed')}) than this export prices with ({shape[0]} x {shape[1]});"
                f" hint: pass --data {cal.get('data')} --samples {cal.get('samples')} --seq-len {cal.get('seq_len')}"
                f" (export draws with seed 0), {again}")
        settings = {**self.damage.settings, "source": {
            "file": str(Path(path).resolve()), "processes": self.processes, "rounding": self.rounding,
            "calibration": self.calibration, "model_fingerprint": self.model.get("fingerprint")}}
        table = PrecisionDamage(self.damage.groups, self.damage.formats, self.damage.damage, self.damage.bytes,
                                self.damage.base_loss, self.damage.estimator, self.damage.wall_time_s, settings)
        return table, ",".join(chosen)


def measure_table(
    model: nn.Module,
    calib: Any,
    formats: str | list[str],
    *,
    rounding: str = "clip",
    batch_size: int = EXPORT_BATCH_SIZE,
    max_cache: int | None = None,
    processes: Any = None,
    progress: bool = False,
    source: dict[str, Any] | None = None,
    record_wall_time: bool = True,
) -> PrecisionTable:
    """Measure the precision-damage table of ``model`` on ``calib`` (all the calibration ids,
    a tensor ``(N, L)`` or :class:`~cwca_export.data.CalibrationData`), in this process's
    share under data parallelism (``processes``, a :class:`~cwca_export.data_parallel.Processes`;
    None: one process).

    With ``rounding="clip"`` every process makes the clipping from *all* the ids (one forward
    over them, as export's search does), so the clipped weights are the one-process ones.
    """
    from cwca_export.blocks import model_fingerprint
    from cwca_export.data_parallel import Processes
    from cwca_export.planning.precision import measure_precision_damage, parse_formats
    from cwca_export.planning.rounding import clipper_for
    from cwca_export.versions import library_versions

    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding {rounding!r}: choose clip or rtn; hint: --rounding clip")
    processes = processes or Processes()
    ids = torch.as_tensor(getattr(calib, "input_ids", calib))
    batches = -(-int(ids.shape[0]) // batch_size)
    if batches < processes.world:
        raise ValueError(f"--samples {ids.shape[0]}: {batches} batch{'es' if batches != 1 else ''} of {batch_size}"
                         f" for {processes.world} processes; pass --samples {batch_size * processes.world} or more"
                         f" (the table is measured in export's batches of {EXPORT_BATCH_SIZE})")
    share = processes.share(ids, batch_size)
    start = time.perf_counter()
    transform = clipper_for(model, ids) if rounding == "clip" else None
    damage = measure_precision_damage(
        model, share, parse_formats(formats), batch_size=batch_size, progress=progress and processes.is_main,
        transform=transform, reduce=processes.reduce_sum if processes.world > 1 else None, max_cache=max_cache,
    )
    damage.wall_time_s = round(time.perf_counter() - start, 3) if record_wall_time else 0.0
    config = getattr(model, "config", None)
    return PrecisionTable(
        damage=damage,
        model={"fingerprint": model_fingerprint(model), "name_or_path": getattr(config, "name_or_path", ""),
               "architecture": type(model).__name__,
               "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")},
        rounding=rounding,
        calibration={**(source or {}), "samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                     "batch_size": batch_size, "ids_sha256": ids_digest(ids)},
        processes=processes.world,
        versions=library_versions(),
    )
