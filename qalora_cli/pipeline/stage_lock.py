"""One process at a time per stage run of a recipe. Two `qalora recipe run` of one recipe (or of
recipes sharing an output folder: a sweep split over two machines on one file system) would
otherwise run the same stage into the same folder at once. The second waits for the first's
stage, then finds it finished and reuses it. A lock whose process is gone (killed) is taken over."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..process_owner import owner_tag, tag_alive

POLL_S = 2.0


def _try_lock(lock: Path) -> str | None:
    """Take the lock -> None, or -> the tag of the live process that holds it."""
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = lock.read_text()
            except FileNotFoundError:
                continue  # released meanwhile: try again
            if holder and tag_alive(holder):
                return holder
            if not holder and time.time() - _mtime(lock) < 10:
                return "?"  # being written by its taker this instant
            lock.unlink(missing_ok=True)  # left by a killed run
            continue
        with os.fdopen(fd, "w") as f:
            f.write(owner_tag())
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


@contextmanager
def stage_lock(state_dir: Path, name: str, echo: Callable[[str], None], poll_s: float = POLL_S) -> Iterator[None]:
    """Hold `<state_dir>/NAME.lock` while the block runs, waiting for another live holder."""
    lock = state_dir / f"{name}.lock"
    told = False
    while (holder := _try_lock(lock)) is not None:
        if not told:
            echo(f"[wait ] {name}: being run by process {holder.partition('.')[0]}; waiting for it")
            told = True
        time.sleep(poll_s)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
