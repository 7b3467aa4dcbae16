"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch

from ..config.schema import TrainSection
from ..errors import UserError


def optimizer_name(t: TrainSection, device: torch.device) -> str:
    if t.optimizer != "auto":
        return t.optimizer
    # Paged AdamW keeps optimizer state out of the way of activation spikes on the GPU (QLoRA,
    # and the paper's code); on the CPU there is nothing to page to.
    if device.type == "cuda" and _has_bitsandbytes():
        return "paged_adamw_32bit"
    return "adamw"


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def build_optimizer(params: list[torch.nn.Parameter], t: TrainSection, device: torch.device):
    name = optimizer_name(t, device)
    kwargs = dict(lr=t.learning_rate, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs), name
    if device.type != "cuda":
        raise UserError(f"train.optimizer {name} needs bitsandbytes on a CUDA GPU; use train.optimizer=adamw "
                        "on this device")
    if not _has_bitsandbytes():
        raise UserError(f"train.optimizer {name} needs bitsandbytes: pip install bitsandbytes")
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
    return cls(params, **kwargs), name


def lr_factor(step: int, t: TrainSection) -> float:
    """Linear warmup, then constant or cosine decay to zero at max_steps (step counts from 0)."""
    if step < t.warmup_steps:
        return (step + 1) / (t.warmup_steps + 1)
    if t.schedule == "constant":
        return 1.0
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer, t: TrainSection):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t))
