"""Asymmetric calibration: aim each layer at the reference model's output, not at its own
weight on the inputs the already-quantized layers give it.

Sequential GPTQ minimizes |W X - W~ X|^2 with X the quantized model's inputs to the layer, so
errors of earlier layers are never corrected, only not made worse. With X' the reference
model's inputs for the same tokens, |W X' - W~ X|^2 = |(W_t - W~) X|^2 + const, where

    W_t = W C H^-1,    C = sum_t x'_t x_t^T,  H = sum_t x_t x_t^T

(normal equations; damped towards W, see asymmetric_target), so GPTQ run on the target W_t
with the usual H minimizes it (the idea of GPTAQ, Li et al. 2025). `quantize.target: float` uses
it, and so does the GPTQ export of a merge with `merge.refit_target: exact`: the fine-tune's effect
is small against the rounding noise, and letting that noise pile up block after block loses it.
"""

from __future__ import annotations

import torch


class CrossAccumulator:
    """C = 2/N sum over tokens of x' x^T, normalized as HessianAccumulator's H."""

    def __init__(self, in_features: int, device):
        self.C = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x_ref: torch.Tensor, x: torch.Tensor) -> None:
        x_ref = x_ref.reshape(-1, x_ref.shape[-1]).to(self.C.device, torch.float32)
        x = x.reshape(-1, x.shape[-1]).to(self.C.device, torch.float32)
        n = x.shape[0]
        self.C *= self.tokens / (self.tokens + n)
        self.tokens += n
        self.C.addmm_(x_ref.t(), x, alpha=2.0 / self.tokens)


def asymmetric_target(weight: torch.Tensor, C: torch.Tensor, H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """W_t = W + W (C - H) (H + damp)^-1 [out, in], in float64 for the solve.

    The least-squares target with the damping pulling W_t towards W, not towards 0:
    min |W X' - W_t X|^2 + damp |W_t - W|^2 gives W_t (H + damp) = W (C + damp). Where the
    inputs agree (X' = X, the first layers) W_t is W exactly, and input directions the
    calibration hardly visits keep their weights: damping W_t itself would shrink them, which
    costs every text unlike the calibration text."""
    eye = torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
    Hd = H.double() + damp_percent * torch.diag(H).double().mean() * eye
    W = weight.double().to(H.device)
    rhs = (W @ (C.double() - H.double())).t()                       # (W (C - H))^T = H_d (W_t - W)^T
    return (W + torch.linalg.solve(Hd, rhs).t()).to(torch.float32)
