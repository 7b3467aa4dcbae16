"""Triton kernels: matmuls with a group-wise quantized weight, dequantized tile by tile in
registers, so W~ is never written to GPU memory.

    W~[k, n] = s[g(k), n] * (q[k, n] - z[g(k), n])        (docs/DESIGN.md, "The math")

- `quant_matmul`:    y  = x  @ W~      x [M, K]  -> y  [M, N]   (the forward pass)
- `quant_matmul_t`:  dx = dy @ W~^T    dy [M, N] -> dx [M, K]   (the input gradient)
- `quant_matvec`:    y  = x  @ W~ for M <= 8 (decoding): no tensor cores to fill, so each
  program reduces a slice of K for a strip of outputs with elementwise products, and the K
  slices are summed afterwards (split-K gives a 4096-wide layer enough programs for a GPU).

Layouts are the checkpoint's, untouched: `qweight` int32 [K*b/32, N] holds the codes as a
little-endian bit stream along K (3-bit values may straddle two words, the GPTQ layout);
scales [G, N]; zero points either float32 [G, N] (merged QA-LoRA) or GPTQ v1 `qzeros` int32
[G, N*b/32] packed along N and stored as z-1; g_idx int32 [K]. W~ is formed in float32 and
rounded to the input's dtype before the product, as the torch reference does, so the two agree
to the rounding of the accumulation order.

Under TRITON_INTERPRET=1 the kernels run on the CPU (numpy), which is how CI checks them; the
autotuner then has a single small configuration so that tests stay quick.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# At most this many rows take the matrix-vector path.
MATVEC_MAX_M = 8


def _configs(large: list[tuple[int, ...]], small: tuple[int, ...], names: tuple[str, ...]) -> list[triton.Config]:
    """Autotuned tile sizes on a GPU; one small tile under the interpreter."""
    chosen = [small] if INTERPRET else large
    out = []
    for c in chosen:
        *tiles, warps, stages = c
        out.append(triton.Config(dict(zip(names, tiles)), num_warps=warps, num_stages=stages))
    return out


@triton.jit
def _codes(qw_ptr, offs_k, offs_n, K, N, BITS: tl.constexpr):
    """The codes q[offs_k, offs_n] as int32 [BK, BN]; out-of-range entries are 0."""
    bit = offs_k * BITS
    word = bit // 32
    shift = (bit % 32).to(tl.uint32)
    ok = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    lo = tl.load(qw_ptr + word[:, None] * N + offs_n[None, :], mask=ok, other=0).to(tl.uint32, bitcast=True)
    # Logical shifts on uint32: an arithmetic shift would drag the sign bit into the value.
    q = (lo >> shift[:, None]) & ((1 << BITS) - 1)
    if 32 % BITS != 0:
        # A value that starts in the last bits of a word continues in the next one.
        straddle = (shift + BITS) > 32
        ok_hi = ok & straddle[:, None]
        hi = tl.load(qw_ptr + (word[:, None] + 1) * N + offs_n[None, :], mask=ok_hi, other=0).to(tl.uint32,
                                                                                               bitcast=True)
        left = tl.where(straddle, 32 - shift, 0)
        q = q | tl.where(ok_hi, (hi << left[:, None]) & ((1 << BITS) - 1), 0)
    return q.to(tl.int32)


@triton.jit
def _zero_points(z_ptr, g, offs_n, N, mask, BITS: tl.constexpr, ZERO_FLOAT: tl.constexpr):
    """z[g, offs_n] as float32, for g and offs_n broadcast to one shape. Integer zeros are read
    from the packed v1 `qzeros` (bit stream along N, stored as z - 1)."""
    if ZERO_FLOAT:
        return tl.load(z_ptr + g * N + offs_n, mask=mask, other=0.0)
    words_per_row = N * BITS // 32
    bit = offs_n * BITS
    word = bit // 32
    shift = (bit % 32).to(tl.uint32)
    lo = tl.load(z_ptr + g * words_per_row + word, mask=mask, other=0).to(tl.uint32, bitcast=True)
    z = (lo >> shift) & ((1 << BITS) - 1)
    if 32 % BITS != 0:
        straddle = (shift + BITS) > 32
        ok_hi = mask & straddle
        hi = tl.load(z_ptr + g * words_per_row + word + 1, mask=ok_hi, other=0).to(tl.uint32, bitcast=True)
        z = z | tl.where(ok_hi, (hi << tl.where(straddle, 32 - shift, 0)) & ((1 << BITS) - 1), 0)
    return ((z + 1) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _weight_tile(qw_ptr, s_ptr, z_ptr, gi_ptr, offs_k, offs_n, K, N,
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_FLOAT: tl.constexpr,
                 CONTIGUOUS: tl.constexpr):
    """W~[offs_k, offs_n] in float32 [BK, BN] (0 outside the matrix)."""
    q = _codes(qw_ptr, offs_k, offs_n, K, N, BITS).to(tl.float32)
    if CONTIGUOUS:
        g = offs_k // GROUP_SIZE
    else:  # act-order: a column's group is read from g_idx
        g = tl.load(gi_ptr + offs_k, mask=offs_k < K, other=0)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    g2 = g[:, None] + offs_n[None, :] * 0
    n2 = offs_n[None, :] + g[:, None] * 0
    s = tl.load(s_ptr + g2 * N + n2, mask=mask, other=0.0).to(tl.float32)
    z = _zero_points(z_ptr, g2, n2, N, mask, BITS, ZERO_FLOAT)
    return s * (q - z)


@triton.autotune(
    configs=_configs([(64, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3), (128, 64, 64, 4, 3),
                      (32, 128, 64, 4, 4), (16, 128, 128, 4, 4), (16, 64, 128, 4, 5)],
                     (16, 32, 32, 4, 1), ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
    key=["M_BUCKET", "N", "K", "BITS", "ZERO_FLOAT", "CONTIGUOUS"],
)
@triton.jit
def _matmul_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, gi_ptr, y_ptr, M, N, K, M_BUCKET,
                   stride_xm, stride_ym,
                   BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_FLOAT: tl.constexpr,
                   CONTIGUOUS: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _weight_tile(qw_ptr, s_ptr, z_ptr, gi_ptr, offs_k, offs_n, K, N, BITS, GROUP_SIZE, ZERO_FLOAT,
                         CONTIGUOUS)
        acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.autotune(
    configs=_configs([(64, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3), (128, 64, 64, 4, 3),
                      (32, 64, 128, 4, 4)],
                     (16, 32, 32, 4, 1), ("BLOCK_M", "BLOCK_K", "BLOCK_N")),
    key=["M_BUCKET", "N", "K", "BITS", "ZERO_FLOAT", "CONTIGUOUS"],
)
@triton.jit
def _matmul_t_kernel(dy_ptr, qw_ptr, s_ptr, z_ptr, gi_ptr, dx_ptr, M, N, K, M_BUCKET,
                     stride_dym, stride_dxm,
                     BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_FLOAT: tl.constexpr,
                     CONTIGUOUS: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :],
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        w = _weight_tile(qw_ptr, s_ptr, z_ptr, gi_ptr, offs_k, offs_n, K, N, BITS, GROUP_SIZE, ZERO_FLOAT,
                         CONTIGUOUS)
        acc += tl.dot(dy, tl.trans(w.to(dy.dtype)), input_precision=PRECISION)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.autotune(
    configs=_configs([(64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (32, 256, 4, 4),
                      (256, 32, 4, 4), (32, 128, 2, 4)],
                     (32, 32, 1, 1), ("BLOCK_N", "BLOCK_K")),
    key=["N", "K", "ROWS", "SPLIT_K", "BITS", "ZERO_FLOAT", "CONTIGUOUS"],
)
@triton.jit
def _matvec_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, gi_ptr, part_ptr, M, N, K, stride_xm,
                   BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_FLOAT: tl.constexpr,
                   CONTIGUOUS: tl.constexpr, ROWS: tl.constexpr, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[split, m, n] = the sum over this split's K tiles of x[m, k] W~[k, n]. One row: an
    elementwise product reduced over K; up to 8 rows: a dot with the rows padded to ROWS=16
    (decoding is bound by reading the weight, so the padded tensor-core work costs nothing)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_s * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = _weight_tile(qw_ptr, s_ptr, z_ptr, gi_ptr, offs_k, offs_n, K, N, BITS, GROUP_SIZE, ZERO_FLOAT,
                         CONTIGUOUS)
        if ROWS == 1:
            x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0)
            # W~ rounded to the input's dtype, as in the other kernels; products summed in float32.
            w = w.to(x.dtype).to(tl.float32)
            acc += tl.sum(x.to(tl.float32)[:, None] * w, axis=0)[None, :]
        else:
            x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                        mask=(rows[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
    tl.store(part_ptr + pid_s * M * N + rows[:, None] * N + offs_n[None, :], acc,
             mask=(rows[:, None] < M) & (offs_n[None, :] < N))


def _split_k(n: int, k: int, device: torch.device) -> int:
    """K slices per output strip, so that a decoding step has about two programs per
    multiprocessor (a 4096 x 4096 layer has only 32 strips of 128 outputs); each slice keeps at
    least 256 columns so the partial sums stay few. Fixed per shape, hence deterministic."""
    if device.type != "cuda":
        return 2 if k >= 64 else 1   # the interpreter: exercise the split path on small shapes
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    strips = triton.cdiv(n, 128)
    return max(1, min(triton.cdiv(2 * sms, strips), k // 256, 16))


def _m_bucket(m: int) -> int:
    """Autotune once per power-of-two batch size, not once per sequence length."""
    return 1 << max(0, (m - 1).bit_length())


def _check(x: torch.Tensor, width: int, what: str) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"{what}: expected [rows, {width}], got {list(x.shape)}")
    return x if x.stride(1) == 1 else x.contiguous()


def _precision(x: torch.Tensor) -> str:
    """float32 inputs multiply in full float32, as torch.matmul does by default (Triton would
    use TF32); the setting does not apply to 16-bit inputs."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _meta(bits: int, group_size: int, zeros: torch.Tensor, contiguous: bool) -> dict:
    return dict(BITS=bits, GROUP_SIZE=group_size, ZERO_FLOAT=zeros.dtype.is_floating_point, CONTIGUOUS=contiguous)


def quant_matmul(x, qweight, scales, zeros, g_idx, bits: int, group_size: int, contiguous: bool) -> torch.Tensor:
    """y = x @ W~: x [M, K] -> [M, N] in x's dtype. group_size: the columns per group where
    `contiguous` (g = k // group_size); otherwise g_idx is read."""
    K, N = qweight.shape[0] * 32 // bits, qweight.shape[1]
    x = _check(x, K, "x")
    M = x.shape[0]
    if M <= MATVEC_MAX_M:
        return quant_matvec(x, qweight, scales, zeros, g_idx, bits, group_size, contiguous)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)

    def grid(meta):
        return triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"])

    _matmul_kernel[grid](x, qweight, scales, zeros, g_idx, y, M, N, K, _m_bucket(M), x.stride(0), y.stride(0),
                         PRECISION=_precision(x), **_meta(bits, group_size, zeros, contiguous))
    return y


def quant_matmul_t(dy, qweight, scales, zeros, g_idx, bits: int, group_size: int, contiguous: bool) -> torch.Tensor:
    """dx = dy @ W~^T: dy [M, N] -> [M, K] in dy's dtype."""
    K, N = qweight.shape[0] * 32 // bits, qweight.shape[1]
    dy = _check(dy, N, "dy")
    M = dy.shape[0]
    dx = torch.empty(M, K, dtype=dy.dtype, device=dy.device)

    def grid(meta):
        return triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"])

    _matmul_t_kernel[grid](dy, qweight, scales, zeros, g_idx, dx, M, N, K, _m_bucket(M), dy.stride(0), dx.stride(0),
                           PRECISION=_precision(dy), **_meta(bits, group_size, zeros, contiguous))
    return dx


def quant_matvec(x, qweight, scales, zeros, g_idx, bits: int, group_size: int, contiguous: bool) -> torch.Tensor:
    """y = x @ W~ for a few rows (M <= MATVEC_MAX_M): split-K partial sums, added in a fixed
    order afterwards (deterministic, unlike atomic adds)."""
    K, N = qweight.shape[0] * 32 // bits, qweight.shape[1]
    x = _check(x, K, "x")
    M = x.shape[0]
    if M > MATVEC_MAX_M:
        raise ValueError(f"quant_matvec takes at most {MATVEC_MAX_M} rows, got {M}")
    split = _split_k(N, K, x.device)
    part = torch.empty(split, M, N, dtype=torch.float32, device=x.device)

    def grid(meta):
        return triton.cdiv(N, meta["BLOCK_N"]), split

    _matvec_kernel[grid](x, qweight, scales, zeros, g_idx, part, M, N, K, x.stride(0), ROWS=1 if M == 1 else 16,
                         SPLIT_K=split, PRECISION=_precision(x), **_meta(bits, group_size, zeros, contiguous))
    return (part[0] if split == 1 else part.sum(0)).to(x.dtype)
