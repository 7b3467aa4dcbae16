"""`lora.init` (zero | svd | quailora), the math: the closed form against independent float64
solves, the objective never above zero init's, the adapter's update equal to M* E^T. The
statistics, the fine-tune and the refusals: test_quailora_init_stats.py."""

import numpy as np
import pytest
import torch

from qalora_cli.kernels.torch_quant_linear import TorchQuantLinear
from qalora_cli.lora import init as init_math
from qalora_cli.lora.init_stats import layer_stats
from qalora_cli.lora.qalora_linear import QALoraLinear
from qalora_cli.quant.rtn import rtn_quantize


# ---------- the math, against float64 numpy computed from X itself ----------

def _problem(seed, out=12, n=48, g=8, tokens=200, scattered=False, deficient=False):
    rng = np.random.default_rng(seed)
    L = n // g
    g_idx = np.arange(n) // g
    if scattered:  # act-order: a group's columns anywhere
        g_idx = rng.permutation(g_idx)
    X = rng.normal(size=(n, tokens)) * rng.uniform(0.2, 3, size=(n, 1))
    X[: n // 4] += rng.normal(size=(1, tokens))  # correlated inputs, as a layer's are
    if deficient:  # fewer tokens than groups can tell apart
        X = X[:, : L - 1]
    R = rng.normal(size=(out, n)) * 0.01 + rng.normal(size=(out, 1)) * 0.01
    E = np.eye(L)[g_idx]
    H = 2 * X @ X.T / X.shape[1]
    return R, X, E, H, g_idx, L


def _stats(R, H, g_idx, L):
    s = layer_stats(torch.tensor(R), torch.zeros(R.shape, dtype=torch.float64), torch.tensor(H),
                    torch.tensor(g_idx), L)
    return s["C"].double(), s["G"].double(), float(s["rhr"])


def _f(M, R, X, E):
    """|(R - M E^T) X|^2, normalized as H is (2/N)."""
    return float(np.sum(((R - M @ E.T) @ X) ** 2) * 2 / X.shape[1])


@pytest.mark.parametrize("scattered", [False, True])
def test_full_rank_limit_is_the_least_squares_solution(scattered):
    R, X, E, H, g_idx, L = _problem(0, scattered=scattered)
    C, G, _ = _stats(R, H, g_idx, L)
    M = init_math.full_rank_delta(C, G).numpy()
    # row by row: min |X^T E m - X^T r|, numpy's lstsq on the inputs themselves
    Z = X.T @ E
    ref = np.stack([np.linalg.lstsq(Z, X.T @ r, rcond=None)[0] for r in R])
    assert np.allclose(M, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    # and the rank-r closed form at r >= L is it
    assert np.allclose(init_math.quailora_delta(C, G, L).numpy(), M, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("rank", [1, 2, 4])
@pytest.mark.parametrize("scattered", [False, True])
def test_rank_r_closed_form_is_reduced_rank_regression(rank, scattered):
    R, X, E, H, g_idx, L = _problem(1 + rank, scattered=scattered)
    C, G, rhr = _stats(R, H, g_idx, L)
    M = init_math.quailora_delta(C, G, rank).numpy()
    assert np.linalg.matrix_rank(M, tol=1e-10 * np.abs(M).max()) == rank
    # Independent: reduced-rank regression (Izenman): project the least-squares fit Y^ = M_ls Z onto
    # its top-r left singular vectors, M* = P_r M_ls, everything from X in numpy float64.
    Y, Z = R @ X, E.T @ X
    M_ls = np.linalg.lstsq(Z.T, Y.T, rcond=None)[0].T
    U = np.linalg.svd(M_ls @ Z, full_matrices=False)[0][:, :rank]
    ref = U @ U.T @ M_ls
    assert np.allclose(M, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    # QuAILoRA's alternating solve (A := R H B (B^T H B)^-1 form, adapted) converges to the same value
    # min over A [out, r], B [L, r] of |Y - A B^T Z|^2, each half-step an exact least-squares solve
    rng = np.random.default_rng(0)
    B = rng.normal(size=(L, rank))
    ZZ = Z @ Z.T
    for _ in range(500):
        A = Y @ Z.T @ B @ np.linalg.inv(B.T @ ZZ @ B)
        B = (np.linalg.inv(A.T @ A) @ A.T @ Y @ Z.T @ np.linalg.inv(ZZ)).T
    f_als = _f(A @ B.T, R, X, E)
    f_closed = _f(M, R, X, E)
    assert f_closed <= f_als * (1 + 1e-9) and f_als <= f_closed * (1 + 1e-4)
    # the statistics give the objective exactly as X does
    assert init_math.objective(torch.tensor(M), C, G, rhr) == pytest.approx(f_closed, rel=1e-6)


@pytest.mark.parametrize("seed", range(40))
def test_quailora_never_worse_than_zero_or_svd_on_its_calibration_data(seed):
    # random problems (a property test; hypothesis is not a dependency): ranks, layouts, rank-deficient inputs
    pick = np.random.default_rng(1000 + seed)
    rank, scattered, deficient = int(pick.integers(1, 9)), bool(pick.integers(2)), bool(pick.integers(2))
    R, X, E, H, g_idx, L = _problem(seed, out=int(pick.integers(1, 20)), g=int(pick.choice([4, 8, 16])),
                                    scattered=scattered, deficient=deficient)
    C, G, _ = _stats(R, H, g_idx, L)
    f_zero = _f(np.zeros((R.shape[0], L)), R, X, E)
    f_q = _f(init_math.quailora_delta(C, G, rank).numpy(), R, X, E)
    counts = torch.tensor(np.bincount(g_idx, minlength=L))
    R_mean = torch.tensor(R @ E / np.bincount(g_idx, minlength=L))
    f_svd = _f(init_math.svd_delta(R_mean, counts, rank).numpy(), R, X, E)
    tol = 1e-6 * f_zero  # the ridge (1e-6 of G's mean diagonal)
    assert f_q <= f_zero + tol
    assert f_q <= f_svd + tol


def test_svd_init_is_numpy_svd_of_the_group_means():
    rng = np.random.default_rng(3)
    R = rng.normal(size=(10, 64))
    g_idx = np.arange(64) // 16
    means = np.stack([R[:, g_idx == j].mean(1) for j in range(4)], 1)
    U, S, Vh = np.linalg.svd(means)
    for rank in (1, 2, 4, 9):
        k = min(rank, 4)
        ref = (U[:, :k] * S[:k]) @ Vh[:k]
        s = layer_stats(torch.tensor(R), torch.zeros(10, 64, dtype=torch.float64), torch.eye(64),
                        torch.tensor(g_idx), 4)
        got = init_math.svd_delta(s["R_mean"].double(), torch.full((4,), 16), rank).numpy()
        assert np.allclose(got, ref, atol=1e-6)


# ---------- the adapter carries M* exactly ----------

@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("rank", [2, 16])
def test_the_adapter_update_equals_M_E_transpose(act_order, rank):
    torch.manual_seed(0)
    W = torch.randn(32, 64) * 0.1
    qw = rtn_quantize(W, 4, 16)
    if act_order:
        perm = torch.randperm(64)
        qw.g_idx = qw.g_idx[perm].contiguous()
    layer = QALoraLinear(TorchQuantLinear.from_quantized(qw, None, "int", torch.float32), rank, alpha=16)
    A0 = layer.lora_A.detach().clone()
    M = init_math.svd_delta(torch.randn(32, 4, dtype=torch.float64) * 1e-2, torch.ones(4), rank)  # rank <= r
    A, B = init_math.adapter_factors(M, layer.pool.counts, layer.scaling, layer.lora_A)
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    assert torch.allclose(layer.delta_groups(), M, atol=1e-7 * M.abs().max())
    E = torch.nn.functional.one_hot(qw.g_idx.long(), 4).double()
    x = torch.randn(5, 64)
    ref = x.double() @ (M @ E.t()).t()
    assert torch.allclose(layer.adapter_output(x).double(), ref, atol=1e-5 * ref.abs().max())
    used = min(rank, 4)
    # rank the update does not need keeps the zero init's random A rows and zero B columns
    assert torch.equal(layer.lora_A[used:], A0[used:]) and not layer.lora_B[:, used:].any()
