"""Training progress: a rich bar with loss, learning rate and tokens/s on a terminal, one plain
line every few steps otherwise (logs, CI)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def training_progress(total: int, start: int, enabled: bool = True,
                      every: int = 10) -> Iterator[Callable[[int, dict], None]]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    console = Console(stderr=True)
    if not enabled:
        yield lambda step, record: None
        return
    if not console.is_terminal:
        def line(step: int, r: dict) -> None:
            if step % every == 0 or step == total or "eval_loss" in r:
                ev = f" eval_loss {r['eval_loss']:.4f}" if "eval_loss" in r else ""
                print(f"step {step}/{total} loss {r['loss']:.4f} lr {r['lr']:.2e} "
                      f"{r['tokens_per_s']:.0f} tok/s{ev}", file=sys.stderr, flush=True)

        yield line
        return
    columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train", total=total, completed=start, stats="")
        last_eval = ""

        def update(step: int, r: dict) -> None:
            nonlocal last_eval
            if "eval_loss" in r:
                last_eval = f" eval {r['eval_loss']:.3f}"
            bar.update(task, completed=step, stats=f"loss {r['loss']:.3f} lr {r['lr']:.1e} "
                                                   f"{r['tokens_per_s']:.0f} tok/s{last_eval}")

        yield update
