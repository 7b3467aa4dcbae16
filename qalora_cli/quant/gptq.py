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
    out_f, in_f = W.shape
    H = H.clone()
    g = in_f if group_size == -1 else group_size
    n_groups = num_groups(in_f, group_size)
    fixed = grid is not None or static_groups or group_size == -1
    if not fixed:
        # Groups fitted on the fly never straddle a lazy block, so a group's parameters are
        # fitted to its columns as GPTQ has updated them so far.
        block_size = max(g, (block_size // g) * g)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    if grid is None:  # on a fixed grid a dead column keeps its nearest code: no reason to move it
        W[:, dead] = 0

    scales = torch.zeros(n_groups, out_f, device=W.device)
    zeros = torch.zeros(n_groups, out_f, device=W.device)
    col_group = (grid.g_idx if grid is not None else torch.arange(in_f) // g).to(W.device).long()
    if grid is not None:
        scales, zeros = grid.scales.to(W.device, torch.float32).clone(), grid.zeros.to(W.device, torch.float32).clone()
    elif fixed:
        for j in range(n_groups):
            scales[j], zeros[j] = fit_params(W[:, j * g:(j + 1) * g], bits, sym, clip_search)

    perm = torch.arange(in_f, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    Hinv, damp_used = _inverse_hessian_cholesky(H, damp_percent)
    group_of = col_group[perm].tolist()  # read per column: no device sync inside the loop

    Q = torch.zeros_like(W)
    g_idx_perm = torch.zeros(in_f, dtype=torch.int32, device=W.device)
    with _one_cpu_thread(W.device):
        for i1 in range(0, in_f, block_size):
            i2 = min(i1 + block_size, in_f)
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if fixed:
                    j = group_of[col]
                else:
                    j = col // g
                    if col % g == 0:
                        scales[j], zeros[j] = fit_params(W1[:, i:i + g], bits, sym, clip_search)
                g_idx_perm[col] = j
                w = W1[:, i]
                d = Hinv1[i, i]
                q = dequantize(quantize_codes(w, scales[j], zeros[j], bits), scales[j], zeros[j])
                Q1[:, i] = q
                err = (w - q) / d
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            Q[:, i1:i2] = Q1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    invperm = torch.argsort(perm)
    Q = Q[:, invperm]
    g_idx = g_idx_perm[invperm].to(torch.int32)
    s_full = scales[g_idx.long()].t()
    z_full = zeros[g_idx.long()].t()
    codes = quantize_codes(Q, s_full, z_full, bits).to(torch.int32)
    qw = QuantizedWeight(codes=codes.cpu(), scales=scales.cpu(), zeros=zeros.cpu(),
                         g_idx=g_idx.cpu(), bits=bits, group_size=group_size)
    return qw, GPTQStats(damp_percent=damp_used)


def output_error(weight: torch.Tensor, approx: torch.Tensor, H: torch.Tensor) -> float:
    """Relative squared error of the layer output on the calibration inputs:
    tr(D H D^T) / tr(W H W^T) with D = W - W~ (H is proportional to X X^T)."""
    W = weight.to(H.device, torch.float32)
    D = W - approx.to(H.device, torch.float32)
    num = torch.sum((D @ H) * D)
    den = torch.sum((W @ H) * W)
    return float(num / den) if den > 0 else float(num)
