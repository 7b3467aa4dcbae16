"""Who made a file: a tag of the process (pid and start time), and whether that process still
runs. The start time tells apart a later process that happens to get the same pid."""

from __future__ import annotations

import os
from pathlib import Path


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), "0" where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return "0"


def owner_tag() -> str:
    """This process, as "PID.START"."""
    return f"{os.getpid()}.{start_time(os.getpid())}"


def alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's live process
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2:].split()[0] in ("Z", "X"):
            return False  # killed, not yet reaped by its parent
    except (OSError, ValueError, IndexError):
        pass
    now = start_time(pid)
    return now == start or now == "0" or start == "0"


def tag_alive(tag: str) -> bool:
    """Whether the process of a "PID.START" tag still runs; a malformed tag is a dead one."""
    pid, _, start = tag.strip().partition(".")
    return pid.isdigit() and alive(int(pid), start or "0")
