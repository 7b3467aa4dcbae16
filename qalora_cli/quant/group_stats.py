"""The input statistics of one sequential group of a block's layers, from every stream of the
block pass at once: one partial forward pass per stream and batch.

- H: the Gram matrix of each layer's inputs on the quantized model (GPTQ's Hessian).
- C: their pairing with the reference (float) model's inputs for the same tokens, when a layer
  aims at the reference model's output (quant/asymmetric.py).
- H and C again on the corrected stream, the model as `lora.init` corrects it (lora/init_stats.py).

Gathering each statistic in its own pass ran the quantized block twice and the reference block
twice per group (four times and twice more with the corrected stream); the values are the same,
summed in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.blocks import BlockInputs, StopForward, linear_layers
from .asymmetric import CrossAccumulator
from .gptq import HessianAccumulator


@dataclass
class Stream:
    """A copy of the block and the batches that enter it."""
    block: nn.Module
    inputs: BlockInputs


@dataclass
class GroupStats:
    H: dict[str, torch.Tensor]
    C: dict[str, torch.Tensor] | None = None         # against the reference stream
    H_corr: dict[str, torch.Tensor] | None = None    # the corrected stream's
    C_corr: dict[str, torch.Tensor] | None = None


def layer_inputs(block: nn.Module, names: list[str], hidden: torch.Tensor, kwargs: dict) -> dict[str, torch.Tensor]:
    """The input each named layer receives, from one forward pass stopped once all have seen theirs."""
    layers, seen = linear_layers(block), {}

    def hook(name):
        def f(_mod, args):
            seen[name] = args[0]
            if len(seen) == len(names):
                raise StopForward
        return f

    handles = [layers[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        block(hidden, **kwargs)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return seen


class _Shared:
    """An accumulator per layer (HessianAccumulator or CrossAccumulator); layers fed the very
    same tensors (q/k/v, gate/up) share one, fed once per batch."""

    def __init__(self, make):
        self.make, self.accs = make, {}

    def add(self, tensors: dict[str, tuple[torch.Tensor, ...]]) -> None:
        fed = {}   # `tensors` holds the tensors alive: their ids stay unique
        for name, ts in tensors.items():
            key = tuple(id(t) for t in ts)
            acc = fed.get(key)
            if acc is None:
                acc = self.accs.get(name) or self.make(ts[-1].shape[-1], ts[-1].device)
                acc.add(*ts)
                fed[key] = acc
            self.accs[name] = acc

    def result(self, attr: str) -> dict[str, torch.Tensor]:
        return {n: getattr(a, attr) for n, a in self.accs.items()}


@torch.no_grad()
def group_stats(names: list[str], main: Stream, ref: Stream | None = None, corr: Stream | None = None,
                cross: bool = False) -> GroupStats:
    """H of `main` for the named layers; with `cross`, C against `ref`; with `corr`, that stream's
    H and C against `ref` (which it then needs)."""
    if (cross or corr is not None) and ref is None:
        raise ValueError("C needs the reference stream")
    H, H_corr = _Shared(HessianAccumulator), _Shared(HessianAccumulator)
    C, C_corr = _Shared(CrossAccumulator), _Shared(CrossAccumulator)
    for i, kw in enumerate(main.inputs.kwargs):
        mine = layer_inputs(main.block, names, main.inputs.hidden[i], kw)
        H.add({n: (x,) for n, x in mine.items()})
        r = layer_inputs(ref.block, names, ref.inputs.hidden[i], kw) if ref is not None else None
        if cross:
            C.add({n: (r[n], x) for n, x in mine.items()})
        if corr is not None:
            c = layer_inputs(corr.block, names, corr.inputs.hidden[i], kw)
            H_corr.add({n: (x,) for n, x in c.items()})
            C_corr.add({n: (r[n], x) for n, x in c.items()})
    return GroupStats(H.result("H"), C.result("C") if cross else None,
                      H_corr.result("H") if corr is not None else None, C_corr.result("C") if corr is not None else None)
