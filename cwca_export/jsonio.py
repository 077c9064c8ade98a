"""Versioned JSON files (scores.json, plan.json): atomic writes and forward-compatible reads.

Every file carries ``{"_type": ..., "schema_version": ...}``. A file from a newer major
schema is refused with a hint to upgrade; unknown keys from a newer minor writer only warn,
so saved plans stay loadable (peft's config loading does the same).

Every versioned file also carries its own content stamp, ``_content_sha256``: the sha256 of
the object without that key, serialised canonically (sorted keys, no whitespace). It is how
``--overwrite`` (:mod:`cwca_export.outputs`) tells a file exactly as the tool wrote it from one
a user edited: a changed value, key or list breaks the stamp; re-indenting, which loses
nothing, does not. A stamp inside the file needs no second file beside it, and a JSON parse
is all it takes to check.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any


class SchemaError(ValueError):
    """A scores or plan file that this version cannot read."""


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` so that ``path`` holds either the old content or the whole new one.

    The bytes go to a hidden scratch file beside ``path`` (:mod:`cwca_export.scratch`), removed
    on any error or interrupt; one a killed process left is cleaned by the next write here.
    """
    from cwca_export.interrupts import deferred_signals
    from cwca_export.scratch import clean_stale, current_umask, scratch_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    tmp: Path | None = None
    try:
        with deferred_signals():  # the scratch file is always either unborn or ours to remove
            fd, tmp = scratch_file(path)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())  # readable like any new file (mkstemp makes it 0600)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return path


STAMP_KEY = "_content_sha256"


def content_sha256(data: dict[str, Any]) -> str:
    """sha256 of a parsed JSON object without its stamp, in canonical form (sorted keys, compact)."""
    body = {k: v for k, v in data.items() if k != STAMP_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stamp_state(data: Any) -> str:
    """``"intact"`` (stamp matches), ``"edited"`` (stamp differs) or ``"unstamped"`` (none: older writer)."""
    if not isinstance(data, dict) or not isinstance(data.get(STAMP_KEY), str):
        return "unstamped"
    return "intact" if data[STAMP_KEY] == content_sha256(data) else "edited"


def trailing_stamp(data: bytes, pattern: re.Pattern[bytes]) -> re.Match[bytes] | None:
    """The stamp a text file the tool wrote ends with (report.html, an llm-compressor recipe): its
    last line matching ``pattern``, whose first group is the sha256 of every byte above that line.
    None for a file edited since, or never stamped."""
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    found = pattern.fullmatch(data[start:])
    if found is None or hashlib.sha256(data[:start]).hexdigest() != found.group(1).decode():
        return None
    return found


def write_json_atomic(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, atomically (see :func:`write_bytes_atomic`).

    A versioned payload (one with ``_type``) gets its content stamp (:data:`STAMP_KEY`) as its
    last key, hashed from the JSON round trip so tuples, int keys and floats hash as they read back.
    """
    text = json.dumps(payload, indent=2, sort_keys=False, allow_nan=False) + "\n"
    if "_type" in payload:
        stamped = {k: v for k, v in payload.items() if k != STAMP_KEY}
        stamped[STAMP_KEY] = content_sha256(json.loads(text))
        text = json.dumps(stamped, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return write_bytes_atomic(path, text.encode("utf-8"))


def read_versioned(path: str | os.PathLike, type_name: str, supported: int) -> dict[str, Any]:
    """Load a versioned JSON object of ``type_name``; refuse other types and newer schemas."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SchemaError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SchemaError(f"{path}: a folder, expected a {type_name} JSON file") from None
    except UnicodeDecodeError as exc:
        raise SchemaError(f"{path}: not UTF-8 text (byte {exc.start}); the file is damaged") from None
    except json.JSONDecodeError as exc:
        raise SchemaError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); the file is truncated or damaged"
        ) from None
    return check_versioned(data, type_name, supported, source=str(path))


def check_versioned(
    data: Any, type_name: str, supported: int, *, source: str = "input"
) -> dict[str, Any]:
    """Validate the ``_type`` / ``schema_version`` header of an already parsed object."""
    if not isinstance(data, dict):
        raise SchemaError(f"{source}: expected a JSON object for {type_name}")
    found = data.get("_type")
    if found != type_name:
        raise SchemaError(
            f"{source}: this is a {found or 'untyped'} file, expected {type_name}"
            f" (hint: pass the file written by the matching cwca-export command)"
        )
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise SchemaError(f"{source}: missing integer schema_version")
    if version > supported:
        raise SchemaError(
            f"{source}: schema_version {version} is newer than this cwca-export supports"
            f" ({supported}); hint: pip install -U cwca-export"
        )
    return data


def warn_unknown(data: dict[str, Any], known: set[str], type_name: str) -> None:
    """Warn (not fail) on keys a newer writer may have added."""
    extra = sorted(set(data) - known - {STAMP_KEY})
    if extra:
        warnings.warn(
            f"{type_name}: ignoring unknown keys {extra} (written by a newer cwca-export?)",
            stacklevel=3,
        )
