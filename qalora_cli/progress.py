"""Progress for long work: a rich bar on a terminal, a plain line per step otherwise (logs)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

# Where a terminal is absent (logs, CI), one progress line at most this often.
LOG_EVERY_S = 10.0


@contextmanager
def block_progress(description: str, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """-> show(done, total, phase=None): a later phase of the same work (e.g. the refit's
    distillation after its block pass) renames the bar instead of opening a second one."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if enabled and not console.is_terminal:
        start = time.perf_counter()

        def log_line(done: int, total: int, phase: str | None = None) -> None:
            print(f"{phase or description}: {done}/{total} ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                  flush=True)

        yield log_line
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not enabled, transient=False) as bar:
        task = bar.add_task(description, total=None)

        def advance(done: int, total: int, phase: str | None = None) -> None:
            bar.update(task, completed=done, total=total, **({"description": phase} if phase else {}))

        yield advance


@contextmanager
def rate_progress(description: str, unit: str = "questions") -> Iterator[Callable[[int, int], None]]:
    """A bar with units/s on a terminal; otherwise a plain line every LOG_EVERY_S (logs)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    console = Console(stderr=True)
    start = time.perf_counter()
    if not console.is_terminal:
        last = [0.0]

        def log_line(done: int, total: int) -> None:
            now = time.perf_counter() - start
            if done == total or now - last[0] >= LOG_EVERY_S:
                last[0] = now
                rate = done / now if now > 0 else 0.0
                print(f"{description}: {done}/{total} {unit} ({rate:.1f}/s, {now:.0f} s)", file=sys.stderr,
                      flush=True)

        yield log_line
        return

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            elapsed = task.elapsed or 0.0
            return Text(f"{task.completed / elapsed:.1f} {unit}/s" if elapsed > 0 else "")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task(description, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance
