"""Temporary files and folders, and the modes of what a run writes.

Temporary names carry their writer (``.NAME.tmp@HOST@PID@XXXX.tmp``), so what a killed process left
behind is recognised and removed by the next run (`remove_stale_temps`); a finished temporary folder
replaces its destination in one rename (`swap_folder`). mkstemp makes files 0600 and mkdtemp folders
0700, and some libraries write 0600 files: `honour_umask` gives them the mode open() and mkdir() would
(0666 / 0777 minus the umask), so a run is as readable as the umask says.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


_TEMP_OWNER = re.compile(r"\.tmp@([^@/]+)@(\d+)@")


def temp_prefix(name: str) -> str:
    """The prefix of a temporary file or folder that will be renamed to `name`: it names its writer."""
    return f".{name}.tmp@{socket.gethostname()}@{os.getpid()}@"


def swap_folder(tmp: Path, dst: Path) -> None:
    """Put a finished temporary folder in place of `dst` (whatever was there is moved aside first,
    then removed), so a reader sees the old folder or the new one, never a half-written one."""
    old = None
    if dst.exists():
        old = dst.parent / f"{temp_prefix(dst.name)}old"
        dst.rename(old)
    tmp.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: Path, names: list[str] | None = None) -> list[Path]:
    """Remove temporaries (files or folders) in `folder` left by killed writers. With `names`, every
    temporary of those final names goes, whoever wrote it: the caller holds their lock. Without, those
    whose writer ran on this host and is gone. Returns the temporaries that remain."""
    try:
        entries = [Path(e.path) for e in os.scandir(folder) if e.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []
    host, left = socket.gethostname(), []
    for path in entries:
        owner = _TEMP_OWNER.search(path.name)
        if owner is None:
            continue
        if names is not None:
            stale = any(path.name.startswith(f".{n}.tmp@") for n in names)
        else:
            stale = owner.group(1) == host and not _pid_alive(int(owner.group(2)))
        if stale:
            remove_path(path)
        else:
            left.append(path)
    return left


def remove_path(path: Path) -> None:
    """Remove a file or a folder (not following a link); gone already is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


# ---- modes ----------------------------------------------------------------------------------------
def current_umask() -> int:
    """This process's umask (from /proc, which leaves it untouched; else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path, folder: bool = False) -> None:
    """Give a file made by mkstemp (0600) or a folder made by mkdtemp (0700) the mode open()/mkdir()
    would have given it, so a run is as readable as the umask says."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def honour_umask_files(folder: Path) -> None:
    """The umask's mode for a temporary folder of ours and every file a library wrote into it
    (mkdtemp makes the folder 0700; transformers' save_pretrained writes model.safetensors 0600)."""
    for p in [Path(folder), *Path(folder).rglob("*")]:
        honour_umask(p, folder=p.is_dir())


def make_temp_dir(parent: Path, name: str) -> Path:
    """A temporary folder beside `name` in `parent` (named after its writer), with the umask's mode."""
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(name), suffix=".tmp", dir=parent))
    honour_umask(tmp, folder=True)
    return tmp


@contextmanager
def folder_written_whole(dst: Path) -> Iterator[Path]:
    """A temporary folder beside `dst` to fill. When the block ends, its files get the umask's modes
    and it replaces `dst` in one rename (`swap_folder`); when the block fails, it is removed. What a
    killed earlier save left beside `dst` is removed first. (Callers name a failed write in one line
    with scope_cli.errors.write_errors_named.)"""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dst.parent)
    tmp = make_temp_dir(dst.parent, dst.name)
    try:
        yield tmp
        honour_umask_files(tmp)
        swap_folder(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
