"""Outputs are built in a temporary folder beside the target and renamed into place, so a
crash or an error never leaves a half-written output, and nothing is overwritten unasked."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError


def check_writable(target: str | Path, overwrite: bool) -> Path:
    target = Path(target)
    if target.exists() and not overwrite:
        raise UserError(f"output '{target}' already exists; pass --overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise UserError(f"output '{target}' exists and is not a folder")
    return target


_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


def is_disk_full(e: BaseException | None) -> bool:
    """Whether `e`, or an error behind it, is a full disk (or quota): Python's OSError, or the
    message of a library that writes outside Python (safetensors' Rust writer)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(m in str(e) for m in ("No space left on device", "os error 28", "Disk quota exceeded")):
            return True
        if isinstance(e, OSError) and e.errno is None and _SHORT_WRITE.search(str(e)):
            return True  # numpy's tofile (GGUF tensors) reports a full disk only as a short write
        e = e.__cause__ or e.__context__
    return False


def folder_bytes(folder: Path) -> int:
    total = 0
    for p in Path(folder).rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:
            pass
    return total


def _size(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def disk_full_error(target: Path, written: int, needs: int | None = None) -> UserError:
    """One line: what was being written where, how much it needs, how much is free there."""
    place = Path(target).parent
    try:
        free = f"{_size(shutil.disk_usage(place).free)} free"
    except OSError:
        free = "free space unknown"
    need = f"about {_size(needs)}" if needs and needs > written else \
        f"more than {_size(written)}" if written else "more than was free"
    return UserError(f"no space left on the device writing '{target}': it needs {need} in '{place}' ({free}); "
                     "nothing half-written was left: free some space or choose another location")


@contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool, needs: int | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces `target`, on error it is removed.
    A full disk is refused in one line naming the place and the space needed (`needs`: the
    output's expected size in bytes, when the caller knows it)."""
    target = check_writable(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
    except BaseException as e:
        written = folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, UserError) and is_disk_full(e):
            raise disk_full_error(target, written, needs) from e
        raise
    _ordinary_permissions(tmp)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _ordinary_permissions(folder: Path) -> None:
    """mkdtemp (and safetensors) create private files; the output is an ordinary folder."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
