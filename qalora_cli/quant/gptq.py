"""GPTQ (Frantar et al. 2022): quantize columns in order, feeding each column's rounding
error forward through the inverse Hessian of the layer inputs, in lazy blocks.

The whole method is `gptq_quantize`; the Hessian is accumulated by `HessianAccumulator`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import UserError
from .grid import dequantize, fit_params, quantize_codes
from .groups import num_groups
from .result import QuantizedWeight


class HessianAccumulator:
    """H = 2/N * sum over calibration tokens of x x^T, in float32 (float64 is not needed:
    the damping dominates the rounding)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        n = x.shape[0]
        self.H *= self.tokens / (self.tokens + n)
        self.tokens += n
        x = x * (2.0 / self.tokens) ** 0.5
        self.H.addmm_(x.t(), x)


@dataclass
class GPTQStats:
    damp_percent: float   # the damping that made H positive definite (after retries)


def _inverse_hessian_cholesky(H: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H^-1 after damping; retries with more damping when H is not
    positive definite (rank-deficient calibration, dead inputs)."""
    mean_diag = torch.mean(torch.diag(H))
    damp = damp_percent
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    while True:
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U, damp
        if damp >= 1.0:
            raise UserError(
                "the layer Hessian is not positive definite even with damping 1.0; "
                "use more or longer calibration samples"
            )
        damp = min(1.0, damp * 10)


@contextmanager
def _one_cpu_thread(device: torch.device):
    """The column loop is hundreds of tiny operations: on a CPU, threads only add spin-waits,
    and with one core busy elsewhere they slow it ten-fold or more. The solve runs on one
    thread; the forward passes around it keep them all."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    clip_search: bool = False,
    grid: QuantizedWeight | None = None,
) -> tuple[QuantizedWeight, GPTQStats]:
    """Quantize `weight` [out, in] given the input Hessian `H` [in, in].

    act_order processes columns by decreasing Hessian diagonal. Groups are then either formed
    in that processing order and recorded in `g_idx` (non-contiguous groups), or, with
    `static_groups`, fixed to the contiguous columns up front (g_idx stays k // g). Either way
    every column's group is exact in `g_idx`, which is what QA-LoRA pools by.

    `grid` fixes the groups and their scales and zeros (its codes are ignored): only the codes
    are chosen, with the same error feedback. The GPTQ export of a merge uses it to carry an
    adapter's fractional zero shift by a few code changes (export/gptq_refit.py).
    """
    W = weight.detach().to(H.device, torch.float32).clone()
    H = H.clone()
    in_f = W.shape[1]
    g = in_f if group_size == -1 else group_size
    fixed = grid is not None or static_groups or group_size == -1
    if not fixed:
        # Groups fitted on the fly never straddle a lazy block, so a group's parameters are
        # fitted to its columns as GPTQ has updated them so far.
        block_size = max(g, (block_size // g) * g)
    _neutralize_dead_columns(W, H, keep_codes=grid is not None)
    scales, zeros, col_group = _starting_grid(W, bits, group_size, sym, clip_search, fixed, grid)

    perm = torch.arange(in_f, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    Hinv, damp_used = _inverse_hessian_cholesky(H, damp_percent)
    # Read per column as a list: no device sync inside the loop.
    groups = _Groups(scales, zeros, col_group[perm].tolist() if fixed else None, g, bits, sym, clip_search)
    Q, g_idx_perm = _quantize_columns(W, Hinv, groups, block_size)
    return _in_column_order(Q, g_idx_perm, perm, scales, zeros, bits, group_size), GPTQStats(damp_used)


def _neutralize_dead_columns(W: torch.Tensor, H: torch.Tensor, keep_codes: bool) -> None:
    """Inputs never seen in calibration (zero Hessian diagonal) get a unit diagonal so that H
    stays invertible, and a zero weight: nothing can tell what they should be."""
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    if not keep_codes:  # on a fixed grid a dead column keeps its nearest code: no reason to move it
        W[:, dead] = 0


def _starting_grid(W: torch.Tensor, bits: int, group_size: int, sym: bool, clip_search: bool, fixed: bool,
                   grid: QuantizedWeight | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (scales, zeros [groups, out], each column's group): the given grid, the contiguous
    groups fitted up front when fixed, or zeros to be fitted in the column loop."""
    out_f, in_f = W.shape
    if grid is not None:
        return (grid.scales.to(W.device, torch.float32).clone(), grid.zeros.to(W.device, torch.float32).clone(),
                grid.g_idx.to(W.device).long())
    g = in_f if group_size == -1 else group_size
    n_groups = num_groups(in_f, group_size)
    scales = torch.zeros(n_groups, out_f, device=W.device)
    zeros = torch.zeros(n_groups, out_f, device=W.device)
    if fixed:
        for j in range(n_groups):
            scales[j], zeros[j] = fit_params(W[:, j * g:(j + 1) * g], bits, sym, clip_search)
    return scales, zeros, (torch.arange(in_f) // g).to(W.device).long()


@dataclass
class _Groups:
    """The quantization grid the column loop rounds to. `group_of` gives each processed
    column's group when the groups are fixed; otherwise (None) a group is fitted when the loop
    reaches its first column, to the columns as the error feedback has left them."""
    scales: torch.Tensor
    zeros: torch.Tensor
    group_of: list[int] | None
    g: int
    bits: int
    sym: bool
    clip_search: bool

    def group_at(self, col: int, W1: torch.Tensor, i: int) -> int:
        """The group of processed column `col` (column `i` of the current block W1)."""
        if self.group_of is not None:
            return self.group_of[col]
        j = col // self.g
        if col % self.g == 0:
            self.scales[j], self.zeros[j] = fit_params(W1[:, i:i + self.g], self.bits, self.sym, self.clip_search)
        return j


def _quantize_columns(W: torch.Tensor, Hinv: torch.Tensor, groups: _Groups,
                      block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (the dequantized weight, each column's group), both in processing order. W's later
    columns take each block's error at once (the lazy batch update)."""
    in_f = W.shape[1]
    Q = torch.zeros_like(W)
    g_idx_perm = torch.zeros(in_f, dtype=torch.int32, device=W.device)
    with _one_cpu_thread(W.device):
        for i1 in range(0, in_f, block_size):
            i2 = min(i1 + block_size, in_f)
            Q[:, i1:i2], Err1 = _quantize_block(W, Hinv, i1, i2, groups, g_idx_perm)
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, g_idx_perm


def _quantize_block(W: torch.Tensor, Hinv: torch.Tensor, i1: int, i2: int, groups: _Groups,
                    g_idx_perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns i1..i2 one by one, each rounding error spread over the block's later columns.
    -> (the block dequantized, its scaled errors for the update of the columns after it)."""
    W1 = W[:, i1:i2].clone()
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
        j = groups.group_at(i1 + i, W1, i)
        g_idx_perm[i1 + i] = j
        w = W1[:, i]
        s, z = groups.scales[j], groups.zeros[j]
        q = dequantize(quantize_codes(w, s, z, groups.bits), s, z)
        Q1[:, i] = q
        err = (w - q) / Hinv1[i, i]
        W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err
    return Q1, Err1


def _in_column_order(Q: torch.Tensor, g_idx_perm: torch.Tensor, perm: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Undo the act-order permutation and read the codes back off the dequantized weight."""
    invperm = torch.argsort(perm)
    Q = Q[:, invperm]
    g_idx = g_idx_perm[invperm].to(torch.int32)
    s_full = scales[g_idx.long()].t()
    z_full = zeros[g_idx.long()].t()
    codes = quantize_codes(Q, s_full, z_full, bits).to(torch.uint8)
    return QuantizedWeight(codes=codes.cpu(), scales=scales.cpu(), zeros=zeros.cpu(),
                           g_idx=g_idx.cpu(), bits=bits, group_size=group_size)


def output_error(weight: torch.Tensor, approx: torch.Tensor, H: torch.Tensor) -> float:
    """Relative squared error of the layer output on the calibration inputs:
    tr(D H D^T) / tr(W H W^T) with D = W - W~ (H is proportional to X X^T)."""
    W = weight.to(H.device, torch.float32)
    D = W - approx.to(H.device, torch.float32)
    num = torch.sum((D @ H) * D)
    den = torch.sum((W @ H) * W)
    return float(num / den) if den > 0 else float(num)
