"""Atomic artifact folders: build beside the destination, rename into place on success.

Work happens in hidden scratch folders beside the destination (:mod:`cwca_export.scratch`:
same filesystem, so the final ``os.rename`` is atomic). On any failure, SIGINT or SIGTERM
they are removed and the destination is untouched; ones a killed process left are cleaned
when the next run writes beside them. Replacing an existing folder (``overwrite``) renames the
old one aside, renames the new one in, then deletes the old: the destination is always either
the complete old artifact or the complete new one (and absent only between two renames, with
signals held), never a mixture. Only a folder that is exactly what the tool wrote (every file
recorded with its sha256, none added or edited) may be replaced
(:func:`cwca_export.outputs.check_output`), and every committed folder carries such a record
(``cwca_files.json``, or the export manifest). That check hashes the old folder before the
renames, with signals live (seconds for a multi-GB artifact); the second one, with them held,
re-reads only what changed since (a stat per file).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import TracebackType

from cwca_export.interrupts import deferred_signals
from cwca_export.outputs import check_output, write_inventory
from cwca_export.scratch import OLD_CONTENT, apply_umask, clean_stale, scratch_folder


class Staging:
    """Scratch folders next to ``out_dir`` and the commit that turns one into ``out_dir``.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "artifact"
        >>> with Staging(out) as staging:
        ...     folder = staging.new_folder()
        ...     _ = (folder / "model.onnx").write_bytes(b"graph")
        ...     path = staging.commit(folder)
        >>> sorted(p.name for p in out.iterdir())
        ['cwca_files.json', 'model.onnx']
    """

    def __init__(self, out_dir: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir).absolute()
        self.overwrite = overwrite
        self._folders: list[Path] = []
        self.committed = False
        self._check_destination()

    def _check_destination(self) -> None:
        if self.out_dir.exists() and not self.overwrite:
            raise FileExistsError(
                f"{self.out_dir} already exists; hint: pass overwrite=True (--overwrite) or another --out"
            )
        check_output(self.out_dir, overwrite=self.overwrite)

    def __enter__(self) -> Staging:
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(self.out_dir.parent)
        return self

    def new_folder(self) -> Path:
        """An empty hidden folder beside the destination, removed at exit unless committed."""
        with deferred_signals():  # registered before a signal can leave it unowned
            folder = scratch_folder(self.out_dir)
            self._folders.append(folder)
        return folder

    def commit(self, folder: Path) -> Path:
        """Record ``folder``'s files, then move it to the destination, replacing an old artifact only when allowed."""
        write_inventory(folder)
        apply_umask(folder)
        self._check_destination()  # the old folder hashed now, while a signal can still stop the run
        with deferred_signals():
            self._check_destination()  # again at the renames: stat calls unless something changed
            if self.out_dir.exists():
                old = scratch_folder(self.out_dir, "old")
                self._folders.append(old)
                os.rename(self.out_dir, old / OLD_CONTENT)
                try:
                    os.rename(folder, self.out_dir)
                except BaseException:
                    os.rename(old / OLD_CONTENT, self.out_dir)
                    raise
            else:
                os.rename(folder, self.out_dir)
            self._folders.remove(folder)
            self.committed = True
        return self.out_dir

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with deferred_signals():  # a second Ctrl-C must not stop the cleaning half-way
            for folder in self._folders:
                shutil.rmtree(folder, ignore_errors=True)
            self._folders.clear()
