"""Which examples each step, micro-batch and process sees: a pure function of the step number,
so resuming needs only the step (the data position) and every process agrees without talking.

The training examples are shuffled once per epoch (seeded by seed + epoch) and read as one
endless stream; step s takes the next `batch_size` of them. They are sorted by length (less
padding), dealt into micro-batches, and micro-batch i goes to process i % world.
"""

from __future__ import annotations

import torch


def step_indices(step: int, n_examples: int, batch_size: int, seed: int) -> list[int]:
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n_examples)
        perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        take = perm[offset: offset + batch_size - len(out)]
        out += take
        pos += len(take)
    return out


def micro_batches_for(step: int, lengths: list[int], batch_size: int, micro_batch_size: int, seed: int,
                      rank: int, world: int) -> list[list[int]]:
    """The micro-batches (lists of example indices) that process `rank` runs at `step`."""
    idx = sorted(step_indices(step, len(lengths), batch_size, seed), key=lambda i: (lengths[i], i))
    micro = [idx[i:i + micro_batch_size] for i in range(0, batch_size, micro_batch_size)]
    return micro[rank::world]


def epoch_of(step: int, n_examples: int, batch_size: int) -> float:
    return step * batch_size / n_examples
