"""Asymmetric calibration (quant/asymmetric.py, GPTAQ; `merge.refit_target: exact` and
`quantize.target: float`): the target weight is the least-squares solution its docstring derives."""

import torch

from qalora_cli.quant.asymmetric import CrossAccumulator, asymmetric_target
from qalora_cli.quant.gptq import HessianAccumulator


def test_asymmetric_target_is_the_float64_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out = 400, 24, 10
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    X_ref = X + 0.3 * torch.randn(n, d_in, generator=g, dtype=torch.float64)  # what the float model's layer sees
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    H, C = HessianAccumulator(d_in), CrossAccumulator(d_in, "cpu")
    for rows in torch.arange(n).split(64):  # accumulated batch by batch, as the block pass does
        H.add(X[rows].float())
        C.add(X_ref[rows].float(), X[rows].float())
    W_t = asymmetric_target(W.float(), C.C, H.H, damp_percent=1e-9)
    # min over W_t of |W X_ref^T - W_t X^T|^2: each row is a least-squares fit of W x_ref on x
    reference = torch.linalg.lstsq(X, X_ref @ W.t()).solution.t()
    assert torch.allclose(W_t.double(), reference, rtol=0, atol=1e-4 * reference.abs().max())


def test_where_the_inputs_agree_the_target_is_the_weight_itself_whatever_the_damping():
    """The first layers see the same inputs in both models: the target must be W, not a W shrunk
    along input directions the calibration hardly visits (which would cost other text)."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 16, generator=g) * torch.logspace(0, -3, 16)  # some directions barely visited
    W = torch.randn(8, 16, generator=g)
    H, C = HessianAccumulator(16), CrossAccumulator(16, "cpu")
    H.add(X)
    C.add(X, X)
    # the two accumulators agree to float32 rounding (their arithmetic differs: the bits depend on the BLAS) ...
    assert torch.allclose(C.C, H.H, rtol=1e-5, atol=1e-6 * float(H.H.abs().max()))
    for damp in (1e-4, 0.01, 0.1):
        # ... and with C = H the target is W itself: the damping pulls towards W, never shrinks W_t. (With the
        # accumulated C the solve amplifies that rounding along the barely visited directions: 1e-5 on one
        # CPU, more on an Intel MKL one.)
        assert torch.allclose(asymmetric_target(W, H.H, H.H, damp), W, atol=1e-6)


def test_damping_pulls_the_target_towards_the_weight():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(300, 16, generator=g, dtype=torch.float64)
    X_ref = X + 0.5 * torch.randn(300, 16, generator=g, dtype=torch.float64)
    W = torch.randn(8, 16, generator=g, dtype=torch.float64)
    H, C = HessianAccumulator(16), CrossAccumulator(16, "cpu")
    H.add(X.float())
    C.add(X_ref.float(), X.float())
    moved = [float((asymmetric_target(W.float(), C.C, H.H, d).double() - W).norm()) for d in (1e-6, 0.1, 1.0, 100.0)]
    assert moved == sorted(moved, reverse=True) and moved[-1] < 0.05 * moved[0]
