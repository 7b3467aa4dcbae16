"""Progress for long work: a rich bar on a terminal, a plain line per step otherwise (logs)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def block_progress(description: str, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if enabled and not console.is_terminal:
        start = time.perf_counter()

        def log_line(done: int, total: int) -> None:
            print(f"{description}: {done}/{total} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

        yield log_line
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not enabled, transient=False) as bar:
        task = bar.add_task(description, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance
