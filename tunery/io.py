"""Atomic writes: a reader never sees a half-written file or folder.

Everything is written next to its destination under a temporary name and renamed into place
(rename is atomic on one filesystem), so a crash leaves either the old output or the new one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@functools.cache
def _umask() -> int:
    """The process umask, read once (reading it means setting it: not something to do per write
    while other threads may be creating files)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_created(path: Path, mode: int, dest: Path) -> None:
    """mkstemp/mkdtemp create 0600/0700 (private to us); outputs get the mode `dest` already has,
    else the one any tool gives a new file or folder (0644/0755 under the usual umask), so a
    group can read reports. A mode the caller set on the temporary path is kept."""
    if not path.exists() or stat.S_IMODE(path.stat().st_mode) not in (0o600, 0o700):
        return
    os.chmod(path, stat.S_IMODE(dest.stat().st_mode) if dest.exists() else mode & ~_umask())


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it replaces `dest`, on error it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _as_created(tmp_path, 0o666, dest)
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _sweep_killed(dest: Path) -> None:
    """Remove the temporary folders a killed writer of `dest` left beside it: their names carry
    the writer's pid (`.<name>.<pid>.<random>.tmp`), and a pid no longer running on this host
    (SIGKILL, OOM, power loss: no `finally` ran) will never finish them. A live writer's is kept."""
    for tmp in dest.parent.glob(f".{dest.name}.*.tmp"):
        pid = tmp.name[len(dest.name) + 2 :].split(".", 1)[0]
        if tmp.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `dest`; on success it replaces `dest` whole.
    Folders left by a killed earlier writer of `dest` are removed first (`_sweep_killed`)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep_killed(dest)
    prefix = f".{dest.name}.{os.getpid()}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        _as_created(tmp, 0o777, dest)
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def file_md5(path: str | Path) -> str:
    """MD5 of a file's bytes: what DVC 3 records for a file output in dvc.lock."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
