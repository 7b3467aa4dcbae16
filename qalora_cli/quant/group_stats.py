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


class _Grams:
    """H per layer; layers fed the same tensor (q/k/v, gate/up) share one accumulator."""

    def __init__(self):
        self.accs: dict[str, HessianAccumulator] = {}

    def add(self, xs: dict[str, torch.Tensor]) -> None:
        by_input: dict[int, HessianAccumulator] = {}   # xs holds the tensors: their ids stay unique
        for name, x in xs.items():
            acc = by_input.get(id(x))
            if acc is None:
                acc = self.accs.get(name) or HessianAccumulator(x.shape[-1], x.device)
                acc.add(x)
                by_input[id(x)] = acc
            self.accs[name] = acc

    def result(self) -> dict[str, torch.Tensor]:
        return {n: a.H for n, a in self.accs.items()}


class _Crosses:
    """C per layer, pairing the reference inputs with another stream's."""

    def __init__(self):
        self.accs: dict[str, CrossAccumulator] = {}

    def add(self, ref: dict[str, torch.Tensor], xs: dict[str, torch.Tensor]) -> None:
        by_pair: dict[tuple[int, int], CrossAccumulator] = {}
        for name, x in xs.items():
            key = (id(ref[name]), id(x))
            acc = by_pair.get(key)
            if acc is None:
                acc = self.accs.get(name) or CrossAccumulator(x.shape[-1], x.device)
                acc.add(ref[name], x)
                by_pair[key] = acc
            self.accs[name] = acc

    def result(self) -> dict[str, torch.Tensor]:
        return {n: a.C for n, a in self.accs.items()}


@torch.no_grad()
def group_stats(names: list[str], main: Stream, ref: Stream | None = None, corr: Stream | None = None,
                cross: bool = False) -> GroupStats:
    """H of `main` for the named layers; with `cross`, C against `ref`; with `corr`, that stream's
    H and C against `ref` (which it then needs)."""
    if (cross or corr is not None) and ref is None:
        raise ValueError("C needs the reference stream")
    H, C, H_corr, C_corr = _Grams(), _Crosses(), _Grams(), _Crosses()
    for i, kw in enumerate(main.inputs.kwargs):
        mine = layer_inputs(main.block, names, main.inputs.hidden[i], kw)
        H.add(mine)
        r = layer_inputs(ref.block, names, ref.inputs.hidden[i], kw) if ref is not None else None
        if cross:
            C.add(r, mine)
        if corr is not None:
            c = layer_inputs(corr.block, names, corr.inputs.hidden[i], kw)
            H_corr.add(c)
            C_corr.add(r, c)
    return GroupStats(H.result(), C.result() if cross else None,
                      H_corr.result() if corr is not None else None, C_corr.result() if corr is not None else None)
