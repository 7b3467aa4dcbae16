"""Helpers of the kill -9 tests (issue 17, item 2): run a `qalora` command in a subprocess, kill
it with SIGKILL at a chosen moment, and compare what the stages wrote with an uninterrupted
run's output (tensors bit for bit, JSON apart from timing fields)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# Fields that measure time or speed, not results: they differ between any two runs.
TIMING_KEYS = {"seconds", "tokens_per_s", "peak_memory_mib", "elapsed_s", "time", "seconds_stats", "peak_rss_mib",
               "peak_rss_mib_merge"}


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", QALORA_DEBUG="1", PYTHONUNBUFFERED="1")


def start(args: list) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qalora_cli", *map(str, args)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@dataclass
class Outcome:
    killed: bool
    returncode: int
    stderr: str
    seconds: float


def run_until(args: list, stop: Callable[[float], bool], timeout: float = 600) -> Outcome:
    """Run `qalora ARGS`; SIGKILL it as soon as `stop(seconds since start)` is true (polled every
    10 ms), unless it ends first. The process is reaped before this returns."""
    t0 = time.perf_counter()
    p = start(args)
    killed = False
    while p.poll() is None:
        elapsed = time.perf_counter() - t0
        if stop(elapsed) or elapsed > timeout:
            p.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    _, err = p.communicate()
    return Outcome(killed and p.returncode == -signal.SIGKILL, p.returncode, err, time.perf_counter() - t0)


def run(args: list, timeout: float = 600) -> Outcome:
    return run_until(args, lambda _t: False, timeout)


def run_timed(args: list, begun: Callable[[], bool], done: Callable[[], bool]) -> tuple[Outcome, tuple[float, float]]:
    """Run `qalora ARGS` to its end -> (outcome, (seconds until `begun()` first held, until
    `done()` first held)): from the moment the stage began to write (before it the process only
    imports and loads) to the moment its output was in place (after it, it only exits)."""
    t0 = time.perf_counter()
    marks: dict[str, float] = {}

    def watch(_t):
        for name, probe in (("begun", begun), ("done", done)):
            if name not in marks and probe():
                marks[name] = time.perf_counter() - t0
        return False

    o = run_until(args, watch)
    return o, (marks.get("begun", 0.0), marks.get("done", o.seconds))


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in Path(folder).rglob("*") if p.is_file())


def differences(a: Path, b: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """What differs between two outputs: safetensors by tensors (dtype, shape, every bit) and
    metadata, JSON apart from timing fields and `ignore`d keys, anything else byte for byte."""
    from safetensors import safe_open

    fa, fb = files(a), files(b)
    if fa != fb:
        return [f"files: {fa} != {fb}"]
    out = []
    for rel in fa:
        pa, pb = a / rel, b / rel
        if rel.suffix == ".safetensors":
            with safe_open(pa, "pt") as x, safe_open(pb, "pt") as y:
                if x.metadata() != y.metadata() or sorted(x.keys()) != sorted(y.keys()):
                    out.append(f"{rel}: metadata or names")
                    continue
                for k in x.keys():
                    s, t = x.get_tensor(k), y.get_tensor(k)
                    if s.dtype != t.dtype or s.shape != t.shape or not torch.equal(_bits(s), _bits(t)):
                        out.append(f"{rel}: {k}")
        elif rel.suffix in (".json", ".jsonl"):
            ja, jb = (_json(p, ignore) for p in (pa, pb))
            if ja != jb:
                out.append(f"{rel}")
        elif pa.read_bytes() != pb.read_bytes():
            out.append(f"{rel}")
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _json(path: Path, ignore: tuple[str, ...]):
    lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
    docs = [strip_timing(json.loads(line)) for line in lines if line.strip()]
    for d in docs:
        for key in ignore:
            if isinstance(d, dict):
                d.pop(key, None)
    return docs


def leftovers(parent: Path, keep: set[str]) -> list[str]:
    """Entries of `parent` other than the expected ones: temporaries a run left behind."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name not in keep)
