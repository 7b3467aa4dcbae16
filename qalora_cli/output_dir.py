"""Outputs are built in a temporary folder beside the target and renamed into place, so a
crash or an error never leaves a half-written output, and nothing is overwritten unasked."""

from __future__ import annotations

import os
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


@contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces `target`, on error it is removed."""
    target = check_writable(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
