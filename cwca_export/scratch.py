"""Hidden scratch files and folders beside an output, and the cleaning of those a dead run left.

Outputs are built in scratch entries next to their destination (same filesystem, so the final
rename is atomic). Their names say whose they are::

    .<destination>.cwca-<host>-<pid>-<random>.partial   a folder being built
    .<destination>.cwca-<host>-<pid>-<random>.old       an old folder moved aside while replaced
    .<destination>.cwca-<host>-<pid>-<random>.tmp       a file being written

``<host>`` is a short hash of the host name. A run that ends normally, by an error or by
SIGINT / SIGTERM removes its own entries; one killed outright (SIGKILL, power loss) cannot,
so :func:`clean_stale` removes entries whose process no longer runs on this host. Nothing
else is ever touched: another host's entries (a shared filesystem), a live process's, another
user's, or any name outside the pattern. An ``.old`` folder whose destination is missing (the
run died between its two renames) is put back instead of deleted.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

HOST_TAG = hashlib.sha256(socket.gethostname().encode("utf-8")).hexdigest()[:8]
_NAME = re.compile(
    r"^\.(?P<dest>.+)\.cwca-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[A-Za-z0-9_]+\.(?P<kind>partial|old|tmp)$"
)
OLD_CONTENT = "artifact"  # inside an .old folder: the destination moved aside


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _prefix(dest: Path) -> str:
    return f".{dest.name}.cwca-{HOST_TAG}-{os.getpid()}-"


def scratch_folder(dest: Path, kind: str = "partial") -> Path:
    """A new empty hidden folder beside ``dest``, with the permissions of a ``mkdir`` (the umask).

    ``tempfile.mkdtemp`` makes it 0700; an output folder should not be private when the
    user's umask says otherwise.
    """
    folder = Path(tempfile.mkdtemp(prefix=_prefix(dest), suffix=f".{kind}", dir=dest.parent))
    os.chmod(folder, 0o777 & ~current_umask())
    return folder


def apply_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain ``mkdir`` / ``open`` would have.

    Libraries that write through private temporary files (safetensors, mkstemp) leave them
    0600; an output should be as readable as the user's umask allows.
    """
    mask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, 0o777 & ~mask)
        else:
            os.chmod(path, (0o666 | (path.stat().st_mode & 0o111)) & ~mask)


def scratch_file(dest: Path) -> tuple[int, Path]:
    """An open descriptor and path of a new hidden file beside ``dest`` (mode 0600 until chmod)."""
    fd, name = tempfile.mkstemp(prefix=_prefix(dest), suffix=".tmp", dir=dest.parent)
    return fd, Path(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_stale(entry: Path) -> bool:
    """True for a scratch entry of this host whose process is gone and which this user owns."""
    match = _NAME.match(entry.name)
    if match is None or match["host"] != HOST_TAG:
        return False
    pid = int(match["pid"])
    if pid == os.getpid() or _alive(pid):
        return False
    try:
        return not hasattr(os, "getuid") or entry.lstat().st_uid == os.getuid()
    except OSError:
        return False


def clean_stale(parent: str | os.PathLike) -> list[Path]:
    """Remove the stale scratch entries directly in ``parent``; returns what was cleaned."""
    parent = Path(parent)
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    cleaned = []
    for entry in entries:
        if not is_stale(entry):
            continue
        match = _NAME.match(entry.name)
        assert match is not None
        dest = parent / match["dest"]
        moved_aside = entry / OLD_CONTENT
        try:
            if match["kind"] == "old" and moved_aside.is_dir() and not os.path.lexists(dest):
                os.rename(moved_aside, dest)  # the run died between its renames: the old output returns
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        cleaned.append(entry)
    return cleaned
