"""Where the adapters start (`lora.init`): zero (B = 0), svd (weight-only) or quailora (calibrated).

The adapter changes a layer's weight by Delta = M E^T, with M [out, groups] the value every weight
of (row o, group j) receives, M = (alpha/r) B A / g_j (lora/merge.group_delta), and E [in, groups]
the group membership (by g_idx). With R = W - W~ the quantization residual and H the layer's input
Gram matrix (GPTQ's, 2/N sum x x^T), the calibrated objective is

    f(M) = |(R - M E^T) X|^2 = tr(R H R^T) - 2 <M, C> + <M G, M>,  C = R H E [out, L], G = E^T H E [L, L]

so only C, G and the scalar tr(R H R^T) are needed (lora/init_stats.py computes and stores them).
The rank-r minimiser is closed form (docs/DESIGN.md, "Calibrated initialisation"): with
G + lambda I = Lc Lc^T and N = M Lc, f = |N - C Lc^-T|^2 + const, so N* = [C Lc^-T]_r
(Eckart-Young) and M* = N* Lc^-1.
QuAILoRA's alternating solve converges to the same point; the closed form needs no iterations.
Everything runs in float64 on the CPU: per layer one L x L Cholesky and one out x L SVD.
"""

from __future__ import annotations

import torch

# lambda = RIDGE * mean(diag G). G is singular when a group's inputs are all zero (or the calibration
# is tiny); the ridge keeps the solve defined while moving the optimum by ~1e-6 relative.
RIDGE = 1e-6


def objective(M: torch.Tensor, C: torch.Tensor, G: torch.Tensor, rhr: float) -> float:
    """f(M) = |(R - M E^T) X|^2 from the statistics; f(0) = rhr."""
    M, C, G = M.double(), C.double(), G.double()
    return float(rhr - 2 * (M * C).sum() + ((M @ G) * M).sum())


def _cholesky(G: torch.Tensor) -> torch.Tensor:
    G = G.double()
    lam = RIDGE * float(G.diagonal().mean().clamp_min(1e-30))
    return torch.linalg.cholesky(G + lam * torch.eye(G.shape[0], dtype=torch.float64))


def quailora_delta(C: torch.Tensor, G: torch.Tensor, rank: int) -> torch.Tensor:
    """M* [out, L]: the rank-`rank` minimiser of f (ridge RIDGE), closed form."""
    Lc = _cholesky(G)
    N = torch.linalg.solve_triangular(Lc, C.double().t(), upper=False).t()       # C Lc^-T
    U, S, Vh = torch.linalg.svd(N, full_matrices=False)
    k = min(rank, S.numel())
    Nr = (U[:, :k] * S[:k]) @ Vh[:k]
    return torch.linalg.solve_triangular(Lc.t(), Nr.t(), upper=True).t()        # Nr Lc^-1


def full_rank_delta(C: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """M_ls = C G^-1: the best group-constant correction of any rank (the upper bound)."""
    return torch.cholesky_solve(C.double().t(), _cholesky(G)).t()


def svd_delta(R_mean: torch.Tensor, counts: torch.Tensor, rank: int) -> torch.Tensor:
    """Weight-only: the rank-`rank` minimiser of |R - M E^T|_F. That equals sum_j c_j |Rbar_j - M_j|^2 + const
    (Rbar = per-group row mean), so the SVD is of Rbar diag(sqrt c): plain SVD of Rbar for equal groups."""
    w = counts.double().sqrt()
    U, S, Vh = torch.linalg.svd(R_mean.double() * w, full_matrices=False)
    k = min(rank, S.numel())
    return ((U[:, :k] * S[:k]) @ Vh[:k]) / w


def adapter_factors(M: torch.Tensor, counts: torch.Tensor, scaling: float,
                    A0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, L], B [out, r]) with (alpha/r) B A / c_j = M, split symmetrically (sqrt of the singular values on
    each side, so neither factor dwarfs the other when training starts). Rank the update does not use keeps
    the zero init's A0 rows (random) and zero B columns: it still trains as a zero-initialized adapter would."""
    r = A0.shape[0]
    K = M.double() * counts.double() / scaling                                   # B A = K
    U, S, Vh = torch.linalg.svd(K, full_matrices=False)
    k = min(r, int((S > S[0] * 1e-12).sum()) if S.numel() and S[0] > 0 else 0)
    A = A0.detach().double().cpu().clone()
    B = torch.zeros(K.shape[0], r, dtype=torch.float64)
    root = S[:k].sqrt()
    A[:k] = root[:, None] * Vh[:k]
    B[:, :k] = U[:, :k] * root
    return A, B
