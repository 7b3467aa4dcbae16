"""Architecture facts found by inspection, not by per-model tables: the decoder blocks, the
inputs they receive, and the order in which their linear layers see data."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding one entry per hidden layer (model.model.layers for Llama)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return name, mod
    raise UserError(f"could not find the {n} decoder blocks of {type(model).__name__}")


class StopForward(Exception):
    """Raised by a hook to end a forward pass early once the wanted inputs are captured."""


@dataclass
class BlockInputs:
    """What block 0 receives for each calibration batch: hidden states plus the keyword
    arguments (masks, position embeddings) that every block receives alike."""
    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor]) -> BlockInputs:
    captured = BlockInputs()

    def grab(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden)
        captured.kwargs.append({k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")})
        raise StopForward

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


def linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def sequential_groups(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """The block's linear layers in the order they run, grouped by shared input.

    Layers that read the very same tensor (q/k/v, gate/up) form one group and share one
    Hessian; each later group depends on the quantized output of the earlier ones. For a
    Llama block: [q, k, v], [o], [gate, up], [down].
    """
    layers = linear_layers(block)
    # The tensors themselves, not their ids: a freed tensor's id is reused by later ones.
    order: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, mod in layers.items():
        handles.append(mod.register_forward_pre_hook(
            lambda _m, args, name=name: order.append((name, args[0]))))
    try:
        block(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_input = None
    for name, inp in order:
        if any(name in g for g in groups):
            continue
        if inp is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = inp
    missing = set(layers) - {n for g in groups for n in g}
    if missing:
        groups.append(sorted(missing))  # never called on this input: quantize with the rest
    return groups
