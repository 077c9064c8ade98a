"""Atomic artifact folders: build beside the destination, rename into place on success.

Work happens in hidden sibling folders of the destination (same filesystem, so the final
``os.rename`` is atomic). On any failure they are removed and the destination is untouched.
Replacing an existing folder (``overwrite``) renames the old one aside, renames the new one
in, then deletes the old: the destination is always either the complete old artifact or the
complete new one (and absent only between two renames), never a mixture.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType


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
        ['model.onnx']
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

    def __enter__(self) -> Staging:
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        return self

    def new_folder(self) -> Path:
        """An empty hidden folder beside the destination, removed at exit unless committed."""
        folder = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", suffix=".partial", dir=self.out_dir.parent))
        self._folders.append(folder)
        return folder

    def commit(self, folder: Path) -> Path:
        """Move ``folder`` to the destination, replacing an old artifact only when allowed."""
        self._check_destination()
        if self.out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", suffix=".old", dir=self.out_dir.parent))
            os.rename(self.out_dir, old / "artifact")
            try:
                os.rename(folder, self.out_dir)
            except BaseException:
                os.rename(old / "artifact", self.out_dir)
                raise
            finally:
                self._folders.append(old)
        else:
            os.rename(folder, self.out_dir)
        self._folders.remove(folder)
        self.committed = True
        return self.out_dir

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for folder in self._folders:
            shutil.rmtree(folder, ignore_errors=True)
        self._folders.clear()
