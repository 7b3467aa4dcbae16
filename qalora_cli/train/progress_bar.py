"""Training progress: a rich bar with loss, learning rate and tokens/s on a terminal, one plain
line every few steps otherwise (logs, CI)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from ..progress import on_terminal, rich_bar


@contextmanager
def training_progress(total: int, start: int, enabled: bool = True,
                      every: int = 10) -> Iterator[Callable[[int, dict], None]]:
    if not enabled:
        yield lambda step, record: None
        return
    if not on_terminal():
        def line(step: int, r: dict) -> None:
            if step % every == 0 or step == total or "eval_loss" in r:
                ev = f" eval_loss {r['eval_loss']:.4f}" if "eval_loss" in r else ""
                print(f"step {step}/{total} loss {r['loss']:.4f} lr {r['lr']:.2e} "
                      f"{r['tokens_per_s']:.0f} tok/s{ev}", file=sys.stderr, flush=True)

        yield line
        return
    from rich.progress import TextColumn, TimeRemainingColumn

    with rich_bar("train", TextColumn("{task.fields[stats]}"), tail=(TimeRemainingColumn(),), total=total,
                  completed=start, stats="") as update_bar:
        last_eval = ""

        def update(step: int, r: dict) -> None:
            nonlocal last_eval
            if "eval_loss" in r:
                last_eval = f" eval {r['eval_loss']:.3f}"
            update_bar(completed=step, stats=f"loss {r['loss']:.3f} lr {r['lr']:.1e} "
                                             f"{r['tokens_per_s']:.0f} tok/s{last_eval}")

        yield update
