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
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
