"""What ``--overwrite``'s check of the previous output costs: sha256 of every file it holds.

Writes one file of --gb GB (random bytes) into a folder, records it as the tool does
(``write_inventory``), then times ``check_output(folder, overwrite=True)``: the first check
hashes every file; a second one in the same process re-reads only files whose stat changed
(the check repeated at the commit's renames). Also times plain hashlib over the file, from the
page cache and after dropping the file's pages (``posix_fadvise(DONTNEED)``, no root needed).

Usage:
    python benchmarks/bench_overwrite_check.py [--gb 1.0] [--dir /tmp] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _hashlib_seconds(path: Path) -> float:
    began = time.perf_counter()
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the file in GB (1e9 bytes)")
    parser.add_argument("--dir", default=None, help="where to write it (default: the system temp folder)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()

    from cwca_export.outputs import check_output, write_inventory

    size = int(args.gb * 1e9)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "previous"
        folder.mkdir()
        weights = folder / "model.onnx.data"
        with weights.open("wb") as fh:
            left = size
            while left:
                n = min(left, 64 << 20)
                fh.write(os.urandom(n))
                left -= n
        write_inventory(folder)
        os.sync()
        rows = {}
        rows["hashlib_page_cache_s"] = _hashlib_seconds(weights)
        _drop_cache(weights)
        rows["hashlib_dropped_cache_s"] = _hashlib_seconds(weights)
        _drop_cache(weights)
        began = time.perf_counter()
        check_output(folder, overwrite=True)
        rows["check_first_dropped_cache_s"] = time.perf_counter() - began
        began = time.perf_counter()
        check_output(folder, overwrite=True)
        rows["check_again_same_process_s"] = time.perf_counter() - began
    result = {"bytes": size, **{k: round(v, 4) for k, v in rows.items()},
              **{k[:-2] + "_MB_per_s": round(size / v / 1e6) for k, v in rows.items() if "again" not in k}}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        print(f"{key:36s} {value}")


if __name__ == "__main__":
    main()
