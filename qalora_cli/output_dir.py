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
from typing import Callable, Iterator

from .errors import UserError
from .process_owner import alive, owner_tag


def check_writable(target: str | Path, overwrite: bool) -> Path:
    target = Path(target)
    sweep_stale(target)  # a killed writer's leftovers: its finished output back in place, temporaries gone
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
    output's expected size in bytes, when the caller knows it). A process killed at any moment
    leaves `target` finished or absent, never half-written; an output it was replacing is put
    back (or its temporaries removed) by the next writer of `target` (`sweep_stale`)."""
    target = check_writable(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
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
        old = _sibling(target, "old")
        os.replace(target, old)  # a kill from here to the next rename: sweep_stale puts it back
    os.replace(tmp, target)
    if old is not None:
        discard(old, of=target)


# Temporary siblings of an output `X`, named by the process that made them (pid and start time,
# so a later process that happens to get the same pid is told apart):
#   .X.partial-OWNER-*  being built;  .X.old-OWNER  the finished X being replaced;
#   .X.trash-OWNER  being deleted.
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old|trash)-(?P<pid>\d+)\.(?P<start>\d+)(-.*)?$")


def temp_sibling(target: str | Path) -> Path:
    """A fresh folder beside `target` to build it in, named as this process's."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{owner_tag()}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's is private; the folder becomes an ordinary output
    return tmp


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{owner_tag()}")


def discard(folder: str | Path, of: str | Path | None = None) -> None:
    """Delete a folder so that it is never seen half-deleted under its name: renamed first to a
    trash sibling of `of` (the output it belongs to; itself by default), which `sweep_stale(of)`
    finishes deleting if this process is killed meanwhile."""
    folder = Path(folder)
    if not folder.exists():
        return
    trash = _sibling(Path(of) if of is not None else folder, "trash")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def stale_temporaries(target: str | Path) -> list[Path]:
    """The temporary siblings of `target` whose process is gone."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    found = []
    for p in target.parent.iterdir():
        m = _TEMP.match(p.name)
        if m and m["name"] == target.name and not alive(int(m["pid"]), m["start"]):
            found.append(p)
    return sorted(found)


def sweep_stale_in(folder: str | Path) -> None:
    """Delete every temporary in `folder` whose process is gone (checkpoint folders: nothing
    there is ever restored, newer checkpoints stand in for a half-replaced one)."""
    folder = Path(folder)
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _TEMP.match(p.name)
        if m and not alive(int(m["pid"]), m["start"]):
            shutil.rmtree(p, ignore_errors=True)


def sweep_stale(target: str | Path, finished: Callable[[Path], bool] | None = None,
                resumable: Callable[[Path], bool] | None = None) -> None:
    """Undo what a killed writer of `target` left: the finished output it was replacing goes
    back in place if the new one never arrived (`finished(target)` false; by default: `target`
    absent, as atomic outputs appear only whole), replacing what the new one left unfinished;
    its half-built and half-deleted folders go. An output built in place (a fine-tune) may be
    `resumable` part way: then what it replaced comes back only if that was finished, since an
    --overwrite of an unfinished run (or an empty folder) asked for the new run, checkpoints and all."""
    target = Path(target)
    done = finished or (lambda p: p.exists())
    part_way = resumable or (lambda p: False)
    for p in stale_temporaries(target):
        kind = _TEMP.match(p.name)["kind"]
        if kind == "old" and not done(target) and (done(p) or not part_way(target)):
            if target.exists():
                discard(target)  # the replacement that never finished; the old one is still whole
            os.replace(p, target)
        elif kind == "old":
            discard(p, of=target)  # whole until renamed: never restore a half-deleted one
        else:
            shutil.rmtree(p, ignore_errors=True)  # still named stale if cut short: the next sweep goes on


def set_aside(target: str | Path) -> Path:
    """Move a finished output out of the way of its replacement (an --overwrite that builds in
    place, as a fine-tune does), as this process's `old` sibling: delete it with `discard(old,
    of=target)` once the replacement is finished; if this process is killed first,
    `sweep_stale(target, finished)` puts it back."""
    old = _sibling(Path(target), "old")
    os.replace(target, old)
    return old


def _ordinary_permissions(folder: Path) -> None:
    """mkdtemp (and safetensors) create private files; the output is an ordinary folder."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
