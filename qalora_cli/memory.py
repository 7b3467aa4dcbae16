"""Peak memory, as the reports record it."""

from __future__ import annotations

import resource
import sys

import torch


def peak_rss_mib() -> float:
    """The process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def peak_memory_mib(device: torch.device) -> float:
    """The peak of the memory the work ran in: allocated CUDA memory on a GPU, else the RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()
