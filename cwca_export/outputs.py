"""What cwca-export wrote, and which paths it may therefore write or replace.

Every output folder carries a record of its files (relative path, bytes, sha256): an export
artifact in ``cwca_manifest.json`` (``files``), every other folder (compressed models, run
folders, the demo) in ``cwca_files.json``; the record file itself carries a content stamp
(:data:`cwca_export.jsonio.STAMP_KEY`). Single JSON outputs (scores.json, plan.json, the
precision table) carry the same stamp; report.html stamps itself and its figure in its last line.
The record is what ``cwca-export inspect --verify`` checks.

:func:`check_output` is the one guard every verb runs before writing: an output may never be
an input, hold one or lie inside one, be the working directory or a folder holding it, and
``--overwrite`` (or a file verb's rewrite of its ``--out``) replaces only the tool's own output
*exactly as it wrote it*: every file present listed in the record with the same bytes and
sha256, the record's stamp intact, no file added, none edited (a file moved away is fine:
nothing of the user's is in it any more). An output with no record or no stamp (from an older
cwca-export, or not the tool's) is kept and refused with a hint, since its edits cannot be ruled out.

Hashing is always done: sha256 runs at 0.6-1.1 GB/s on 2 shared cores (a 2.2 GB fp32 artifact
in about 3 s, beside minutes of export; BENCHMARKS.md), and a size + mtime shortcut would
pass an in-place edit that kept both (``touch -r``, ``rsync -t``). Within one process a file
hashed once is not hashed again while its size, mtime, ctime and inode are unchanged (ctime
cannot be set back by a user), so the check at commit, with signals held, costs stat calls only.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

MANIFEST_NAME = "cwca_manifest.json"  # an export artifact's manifest (cwca_export.exporter.manifest)
INVENTORY_NAME = "cwca_files.json"
INVENTORY_TYPE = "CwcaFiles"
INVENTORY_SCHEMA_VERSION = 1


_CONFIRMED: dict[tuple[str, str], tuple[int, ...]] = {}  # (path, sha256) -> stat key when it last matched


class UnsafeOutputError(ValueError):
    """An output path that would overwrite or delete something the tool does not own."""


# ---- records of files ----------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def file_matches(path: Path, sha256: str, size: int | None = None) -> bool:
    """True when ``path`` is a regular file with ``size`` bytes and this sha256.

    A file confirmed once in this process is not hashed again while its stat (size, mtime,
    ctime, inode) is unchanged; any write or replacement changes its ctime.
    """
    try:
        st = path.lstat()
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or (size is not None and st.st_size != size):
        return False
    key = (os.fspath(path.absolute()), sha256)
    if _CONFIRMED.get(key) == _stat_key(st):
        return True
    if file_sha256(path) != sha256:
        return False
    _CONFIRMED[key] = _stat_key(st)
    return True


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def file_inventory(folder: Path, *, exclude: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every file under ``folder`` (relative path, bytes, sha256), sorted by path."""
    rows = []
    for path in _files(folder):
        rel = path.relative_to(folder).as_posix()
        if rel in exclude:
            continue
        rows.append({"path": rel, "bytes": path.stat().st_size, "sha256": file_sha256(path)})
    return rows


def write_inventory(folder: str | os.PathLike) -> Path:
    """Record every file of ``folder`` in ``folder/cwca_files.json`` (written atomically).

    A folder that already carries an export manifest is described by it and gets no second record.
    """
    from cwca_export import __version__
    from cwca_export.jsonio import write_json_atomic

    folder = Path(folder)
    target = folder / INVENTORY_NAME
    if (folder / MANIFEST_NAME).is_file():
        return folder / MANIFEST_NAME
    record = {
        "_type": INVENTORY_TYPE,
        "schema_version": INVENTORY_SCHEMA_VERSION,
        "cwca_export": __version__,
        "files": file_inventory(folder, exclude=(INVENTORY_NAME,)),
    }
    return write_json_atomic(target, record)


def read_record(folder: str | os.PathLike) -> tuple[Path, list[dict[str, Any]]]:
    """The record of ``folder`` (its file and rows); ValueError when it has none or it is damaged."""
    folder = Path(folder)
    for name, kind in ((INVENTORY_NAME, INVENTORY_TYPE), (MANIFEST_NAME, "CwcaManifest")):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: not valid JSON, so the folder's files cannot be checked") from None
        rows = data.get("files") if isinstance(data, dict) and data.get("_type") == kind else None
        if not isinstance(rows, list) or not all(
            isinstance(r, dict) and isinstance(r.get("path"), str) and isinstance(r.get("sha256"), str) for r in rows
        ):
            raise ValueError(f"{path}: no valid files list (not written by cwca-export, or damaged)")
        return path, rows
    raise ValueError(
        f"{folder}: no {INVENTORY_NAME} or {MANIFEST_NAME}; hint: only folders written by cwca-export can be verified"
    )


def verify_folder(folder: str | os.PathLike) -> list[str]:
    """Compare ``folder`` with its record; one line per file missing, changed or added (empty: intact)."""
    folder = Path(folder)
    record_path, rows = read_record(folder)
    recorded = {r["path"]: r for r in rows}
    present = {p.relative_to(folder).as_posix(): p for p in _files(folder)}
    problems = []
    for rel, row in sorted(recorded.items()):
        path = present.get(rel)
        if path is None:
            problems.append(f"missing: {rel}")
        elif path.is_symlink() or not path.is_file():
            problems.append(f"changed: {rel} (no longer a regular file)")
        elif not file_matches(path, row["sha256"], row.get("bytes")):
            problems.append(f"changed: {rel} (sha256 differs from {record_path.name})")
    if record_stamp(record_path) == "edited":
        problems.append(f"changed: {record_path.name} (its content stamp differs)")
    for rel in sorted(set(present) - set(recorded) - {record_path.name}):
        problems.append(f"added: {rel}")
    return problems


def record_stamp(record_path: Path) -> str:
    """The stamp state of a record file (:func:`cwca_export.jsonio.stamp_state`)."""
    from cwca_export.jsonio import stamp_state

    try:
        return stamp_state(json.loads(record_path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "edited"


def first_difference(folder: Path) -> tuple[str, str] | None:
    """The first reason ``folder`` is not exactly the tool's output: ``(file, why)``; None when it is.

    Files added come first (a listing), then the record's own stamp, then each recorded file's
    bytes and sha256. A recorded file that is missing is no reason: nothing of the user's is in it.
    """
    record_path, rows = read_record(folder)
    recorded = {r["path"]: r for r in rows}
    present = {p.relative_to(folder).as_posix(): p for p in _files(folder)}
    for rel in sorted(set(present) - set(recorded) - {record_path.name}):
        return rel, f"was added (not in {record_path.name})"
    state = record_stamp(record_path)
    if state != "intact":
        return record_path.name, ("was edited (its content stamp differs)" if state == "edited" else
                                  "has no content stamp (written by an older cwca-export), so edits to the"
                                  " folder cannot be ruled out")
    for rel, row in sorted(recorded.items()):
        path = present.get(rel)
        if path is not None and not file_matches(path, row["sha256"], row.get("bytes")):
            return rel, f"was edited (bytes or sha256 differ from {record_path.name})"
    return None


def foreign_files(folder: Path) -> list[str]:
    """Files in ``folder`` that no record says the tool wrote (all of them when it has no record)."""
    try:
        record_path, rows = read_record(folder)
    except ValueError:
        return [p.relative_to(folder).as_posix() for p in _files(folder)] or (
            [f"{p.name}/" for p in folder.iterdir()] if any(folder.iterdir()) else []
        )
    known = {r["path"] for r in rows} | {record_path.name}
    return [rel for rel in (p.relative_to(folder).as_posix() for p in _files(folder)) if rel not in known]


def _recorded(path: Path) -> bool:
    """True when the record of the folder holding ``path`` lists it (with the same bytes)."""
    try:
        _, rows = read_record(path.parent)
    except ValueError:
        return False
    return any(r["path"] == path.name and file_matches(path, r["sha256"], r.get("bytes")) for r in rows)


def refresh_record(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """After rewriting ``names`` in a recorded folder, update their rows in ``cwca_files.json``."""
    from cwca_export.jsonio import write_json_atomic

    path = Path(folder) / INVENTORY_NAME
    try:
        record_path, rows = read_record(folder)
    except ValueError:
        return
    if record_path != path:
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    fresh = {r["path"]: r for r in file_inventory(Path(folder)) if r["path"] in set(names)}
    data["files"] = sorted([*(r for r in rows if r["path"] not in fresh), *fresh.values()], key=lambda r: r["path"])
    write_json_atomic(path, data)


def tool_json_type(path: Path) -> str | None:
    """The ``_type`` of a JSON object the tool wrote (scores, plan, manifest...), else None."""
    try:
        if path.stat().st_size > 256 << 20:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(data, dict) and isinstance(data.get("_type"), str) and isinstance(data.get("schema_version"), int):
        return data["_type"]
    return None


# ---- the guard -------------------------------------------------------------------------------


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _nearest_existing(path: Path) -> Path:
    """``path`` or the closest folder above it that exists (where new folders would be made)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(
    out: str | os.PathLike,
    *,
    inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
    overwrite: bool = False,
    kind: str = "folder",
    json_types: Iterable[str] = (),
    recognise: Callable[[Path], bool] | None = None,
    flag: str = "--out",
    refuse_existing: bool = False,
) -> None:
    """Refuse an output path that would cost the user a file; silent when it is safe.

    Args:
        out: the output folder or file.
        inputs: ``(name shown in the message, path)`` of everything the command reads; None
            entries are skipped.
        overwrite: the user passed ``--overwrite`` (folders): an existing folder may be
            replaced when every file in it is one the tool recorded.
        kind: ``"folder"`` or ``"file"``.
        json_types: for files, the ``_type`` values of the tool's JSON this output may replace
            (e.g. ``{"Plan"}`` for plan.json); an existing file of any other content is refused.
        recognise: for files that are not JSON (report.html): True when an existing file is
            one the tool wrote; a file its folder's record lists is the tool's in any case.
        flag: the option naming ``out``, for the message.
        refuse_existing: folders: refuse one that exists without ``overwrite`` here, before any
            work (the writer, :class:`~cwca_export.atomic.Staging`, refuses it again when it
            writes, which for an export or a compression comes after loading the model).

    Raises:
        UnsafeOutputError: with one line naming ``flag`` and a fix.
    """
    target = _resolved(out)
    for name, value in inputs:
        if value is None:
            continue
        source = _resolved(value)
        if target == source:
            raise UnsafeOutputError(
                f"{flag} {out} is also the input {name}; writing it would replace the input; hint: pass another {flag}"
            )
        if _within(source, target):
            raise UnsafeOutputError(
                f"{flag} {out} holds the input {name} ({value}); replacing it would delete the input;"
                f" hint: pass an {flag} outside it"
            )
        if source.is_dir() and _within(target, source):
            raise UnsafeOutputError(
                f"{flag} {out} lies inside the input {name} ({value}); hint: pass an {flag} outside it"
            )
    cwd = _resolved(os.getcwd())
    if kind == "folder" and (_within(cwd, target) or target == _resolved(Path.home()) or target == Path(target.anchor)):
        raise UnsafeOutputError(
            f"{flag} {out} is the working directory, a folder holding it, or your home; hint: pass a new folder,"
            f" e.g. {flag} ./cwca-out"
        )
    writable = _nearest_existing(target.parent)
    if not os.access(writable, os.W_OK | os.X_OK):  # the scratch folder or file goes beside ``out``
        raise UnsafeOutputError(
            f"{flag} {out}: {writable} is not writable (read-only file system or permissions), and the output is"
            f" written beside its destination; hint: pass an {flag} in a folder you can write"
        )
    if not os.path.lexists(target):
        return
    if kind == "file":
        if target.is_dir():
            raise UnsafeOutputError(
                f"{flag} {out} is a folder; hint: pass a file path, e.g. {flag} {Path(out) / 'out.json'}")
        keep = f"it is kept; hint: move {target.name} away (or delete it yourself) or pass another {flag}"
        if recognise is not None:
            if _recorded(target) or recognise(target):  # its folder's record lists these very bytes, or its stamp
                return
            raise UnsafeOutputError(
                f"{flag} {out} exists and is not a file cwca-export wrote, or was edited since; {keep}")
        found = tool_json_type(target)
        allowed = set(json_types)
        if found is None or (allowed and found not in allowed):
            what = f"a {found} file" if found else "not a file cwca-export wrote"
            raise UnsafeOutputError(f"{flag} {out} exists and is {what}; {keep}")
        if _recorded(target):  # of the right kind, and its folder's record lists these very bytes
            return
        state = record_stamp(target)
        if state == "edited":
            raise UnsafeOutputError(
                f"{flag} {out} was edited since cwca-export wrote it (its content stamp differs); {keep}")
        if state == "unstamped":
            raise UnsafeOutputError(
                f"{flag} {out} has no content stamp (written by an older cwca-export), so edits to it cannot be"
                f" ruled out; {keep}")
        return
    if not target.is_dir():
        raise UnsafeOutputError(f"{flag} {out} exists and is a file; hint: pass another {flag}")
    if not overwrite and refuse_existing:
        raise UnsafeOutputError(f"{flag} {out} already exists; hint: pass --overwrite or another {flag}")
    if not overwrite or not any(target.iterdir()):
        return  # otherwise refusing an existing folder without --overwrite is the writer's job
    try:
        differs = first_difference(target)
    except ValueError:  # no record: every file in it is foreign
        foreign = foreign_files(target)
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UnsafeOutputError(
            f"{flag} {out} holds files cwca-export did not write ({shown}); --overwrite replaces only the tool's"
            f" own output; hint: pass another {flag} or move those files away"
        ) from None
    if differs is None:
        return
    rel, why = differs
    if why.startswith("was added"):
        raise UnsafeOutputError(
            f"{flag} {out} holds files cwca-export did not write ({rel}); --overwrite replaces only the tool's"
            f" own unedited output; hint: move {rel} out of it or pass another {flag}"
        )
    fix = f"move {rel} out of it" if rel not in (INVENTORY_NAME, MANIFEST_NAME) else (
        "move the folder away (or delete it yourself)")
    raise UnsafeOutputError(
        f"{flag} {out}: {rel} {why}; --overwrite replaces only the tool's own unedited output;"
        f" hint: {fix} or pass another {flag}"
    )
