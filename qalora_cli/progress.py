"""Progress for long work: a rich bar on a terminal, a plain line per step otherwise (logs).
`rich_bar` is the one bar every kind of progress draws (blocks, questions, training steps)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

# Where a terminal is absent (logs, CI), one progress line at most this often.
LOG_EVERY_S = 10.0


def on_terminal() -> bool:
    """Whether progress goes to a terminal (stderr) that can redraw a bar."""
    from rich.console import Console

    return Console(stderr=True).is_terminal


@contextmanager
def rich_bar(description: str, *columns, tail: tuple = (), enabled: bool = True, total: int | None = None,
             completed: int = 0, **fields) -> Iterator[Callable[..., None]]:
    """A bar on stderr: the description, the bar, done/total, `columns`, the elapsed time, then
    `tail`. -> update(**kw), rich's Progress.update for this bar (completed=, total=, description=,
    or the task's own `fields`)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *columns,
                  TimeElapsedColumn(), *tail, console=Console(stderr=True), disable=not enabled,
                  transient=False) as bar:
        task = bar.add_task(description, total=total, completed=completed, **fields)
        yield lambda **kw: bar.update(task, **kw)


@contextmanager
def block_progress(description: str, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """-> show(done, total, phase=None): a later phase of the same work (e.g. the refit's
    distillation after its block pass) renames the bar instead of opening a second one."""
    if enabled and not on_terminal():
        start = time.perf_counter()

        def log_line(done: int, total: int, phase: str | None = None) -> None:
            print(f"{phase or description}: {done}/{total} ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                  flush=True)

        yield log_line
        return
    with rich_bar(description, enabled=enabled) as update:

        def advance(done: int, total: int, phase: str | None = None) -> None:
            update(completed=done, total=total, **({"description": phase} if phase else {}))

        yield advance


@contextmanager
def rate_progress(description: str, unit: str = "questions") -> Iterator[Callable[[int, int], None]]:
    """A bar with units/s on a terminal; otherwise a plain line every LOG_EVERY_S (logs)."""
    if not on_terminal():
        start, last = time.perf_counter(), [0.0]

        def log_line(done: int, total: int) -> None:
            now = time.perf_counter() - start
            if done == total or now - last[0] >= LOG_EVERY_S:
                last[0] = now
                rate = done / now if now > 0 else 0.0
                print(f"{description}: {done}/{total} {unit} ({rate:.1f}/s, {now:.0f} s)", file=sys.stderr,
                      flush=True)

        yield log_line
        return
    with rich_bar(description, _rate_column(unit)) as update:
        yield lambda done, total: update(completed=done, total=total)


def _rate_column(unit: str):
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            elapsed = task.elapsed or 0.0
            return Text(f"{task.completed / elapsed:.1f} {unit}/s" if elapsed > 0 else "")

    return Rate()
