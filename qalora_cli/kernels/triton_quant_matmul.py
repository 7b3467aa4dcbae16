"""Triton kernels for a group-wise quantized weight, as the checkpoint stores it:

    W~[k, n] = s[g(k), n] * (q[k, n] - z[g(k), n])        (docs/DESIGN.md, "The math")

- `quant_matvec`:    y  = x  @ W~ for M <= 8 rows (decoding): W~ is dequantized tile by tile in
  registers and never written; each program reduces a slice of K for a strip of outputs, and
  the K slices are summed afterwards (split-K gives a 4096-wide layer enough programs).
- `dequantize`:      W~ [K, N] in the input's dtype, one pass that reads the packed codes once.
- `quant_matmul`:    y  = x  @ W~      x [M, K]  -> y  [M, N]   (the forward pass)
- `quant_matmul_t`:  dx = dy @ W~^T    dy [M, N] -> dx [M, K]   (the input gradient)

Above 8 rows the product is bound by arithmetic, not by reading the weight, so the two matmuls
write W~ once and hand it to cuBLAS, which no tile loop that dequantizes per row block can
match. Measured on an H200 (docs/BENCHMARKS.md, "Kernels on CUDA"): the fused tile kernels this
replaced took 43x cuBLAS's time at M = 512; writing W~ adds about 45 us to a 4096 x 11008
layer's cuBLAS product (launch included), 0.9-1.0x dense bf16's speed at M = 4096.
W~ lives only for the one call: the backward pass dequantizes again, so no W~ is kept between
the passes, and at most one layer's W~ exists at a time (bitsandbytes' NF4 path does the same).

Layouts are the checkpoint's, untouched: `qweight` int32 [K*b/32, N] holds the codes as a
little-endian bit stream along K (3-bit values may straddle two words, the GPTQ layout);
scales [G, N]; zero points either float32 [G, N] (merged QA-LoRA) or GPTQ v1 `qzeros` int32
[G, N*b/32] packed along N and stored as z-1; g_idx int32 [K]. W~ is formed in float32 and
rounded to the input's dtype, as the torch reference does, so `dequantize` gives the torch
path's W~ bit for bit and the matmuls agree with it to the accumulation order.

With contiguous groups a tile of rows is chosen inside one group, so its scales and zero points
are one row each, read once per tile; act-order layers read each row's group from g_idx.

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
def _weight_tile(qw_ptr, s_ptr, z_ptr, gi_ptr, offs_k, offs_n, K, N, BITS: tl.constexpr, ZERO_FLOAT: tl.constexpr):
    """W~[offs_k, offs_n] in float32 [BK, BN] (0 outside the matrix), each row's group read
    from g_idx (act-order, or groups a tile cannot stay inside)."""
    q = _codes(qw_ptr, offs_k, offs_n, K, N, BITS).to(tl.float32)
    g = tl.load(gi_ptr + offs_k, mask=offs_k < K, other=0)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    g2 = g[:, None] + offs_n[None, :] * 0
    n2 = offs_n[None, :] + g[:, None] * 0
    s = tl.load(s_ptr + g2 * N + n2, mask=mask, other=0.0).to(tl.float32)
    z = _zero_points(z_ptr, g2, n2, N, mask, BITS, ZERO_FLOAT)
    return s * (q - z)


@triton.jit
def _tile(qw_ptr, s_ptr, z_ptr, gi_ptr, k0, offs_k, offs_n, K, N,
          BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_FLOAT: tl.constexpr, ONE_GROUP: tl.constexpr):
    """W~[offs_k, offs_n] in float32 [BK, BN] for offs_k = k0 + arange(BK). ONE_GROUP: contiguous
    groups and BK dividing the group size, so the whole tile is group k0 // GROUP_SIZE and its
    scales and zero points are a single row [BN]; otherwise each row's group is looked up."""
    if ONE_GROUP:
        q = _codes(qw_ptr, offs_k, offs_n, K, N, BITS).to(tl.float32)
        g = k0 // GROUP_SIZE
        ok_n = offs_n < N
        s = tl.load(s_ptr + g * N + offs_n, mask=ok_n, other=0.0).to(tl.float32)
        z = _zero_points(z_ptr, g, offs_n, N, ok_n, BITS, ZERO_FLOAT)
        w = s[None, :] * (q - z[None, :])
        return tl.where(offs_k[:, None] < K, w, 0.0)
    return _weight_tile(qw_ptr, s_ptr, z_ptr, gi_ptr, offs_k, offs_n, K, N, BITS, ZERO_FLOAT)


@triton.autotune(
    configs=_configs([(64, 4, 1), (128, 4, 1), (256, 4, 1), (256, 8, 1)], (32, 1, 1), ("BLOCK_N",)),
    key=["N", "K", "BITS", "ZERO_FLOAT", "ONE_GROUP", "BLOCK_K"],
)
@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, gi_ptr, w_ptr, N, K,
                    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_FLOAT: tl.constexpr,
                    ONE_GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """w[k, n] = W~[k, n] in w's dtype, one [BLOCK_K, BLOCK_N] tile per program."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _tile(qw_ptr, s_ptr, z_ptr, gi_ptr, k0, offs_k, offs_n, K, N, BITS, GROUP_SIZE, ZERO_FLOAT, ONE_GROUP)
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty),
             mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))


@triton.autotune(
    configs=_configs([(64, 4, 3), (128, 4, 3), (256, 4, 3), (128, 8, 3), (256, 8, 4), (32, 2, 4)],
                     (32, 1, 1), ("BLOCK_N",)),
    key=["N", "K", "ROWS", "SPLIT_K", "BITS", "ZERO_FLOAT", "ONE_GROUP", "BLOCK_K"],
)
@triton.jit
def _matvec_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, gi_ptr, part_ptr, M, N, K, stride_xm,
                   BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_FLOAT: tl.constexpr,
                   ONE_GROUP: tl.constexpr, ROWS: tl.constexpr, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
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
        w = _tile(qw_ptr, s_ptr, z_ptr, gi_ptr, k0, offs_k, offs_n, K, N, BITS, GROUP_SIZE, ZERO_FLOAT, ONE_GROUP)
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


def _block_k(group_size: int, contiguous: bool) -> tuple[int, bool]:
    """(rows per tile, whether a tile lies inside one group). With contiguous groups: the
    largest power of two dividing the group size, at most 64, so tiles start on group
    boundaries' multiples and never straddle one; tl.dot needs at least 16. Otherwise 32 rows
    whose groups are looked up one by one."""
    if contiguous:
        bk = min(group_size & -group_size, 64)
        if bk >= 16:
            return bk, True
    return 32, False


def _split_k(n: int, k: int, device: torch.device) -> int:
    """K slices per output strip, so that a decoding step has about two programs per
    multiprocessor (a 4096 x 4096 layer has only 32 strips of 128 outputs); each slice keeps at
    least 256 columns so the partial sums stay few. Fixed per shape, hence deterministic."""
    if device.type != "cuda":
        return 2 if k >= 64 else 1   # the interpreter: exercise the split path on small shapes
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    strips = triton.cdiv(n, 128)
    return max(1, min(triton.cdiv(2 * sms, strips), k // 256, 16))


def _check(x: torch.Tensor, width: int, what: str) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"{what}: expected [rows, {width}], got {list(x.shape)}")
    return x if x.stride(1) == 1 else x.contiguous()


def _precision(x: torch.Tensor) -> str:
    """float32 inputs multiply in full float32, as torch.matmul does by default (Triton would
    use TF32); the setting does not apply to 16-bit inputs."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _meta(bits: int, group_size: int, zeros: torch.Tensor, contiguous: bool) -> dict:
    block_k, one_group = _block_k(group_size, contiguous)
    return dict(BITS=bits, GROUP_SIZE=group_size, ZERO_FLOAT=zeros.dtype.is_floating_point, ONE_GROUP=one_group,
                BLOCK_K=block_k)


def dequantize(qweight, scales, zeros, g_idx, bits: int, group_size: int, contiguous: bool,
               dtype: torch.dtype) -> torch.Tensor:
    """W~ [K, N] in `dtype` (float32 values rounded once, as the torch path's W~)."""
    K, N = qweight.shape[0] * 32 // bits, qweight.shape[1]
    w = torch.empty(K, N, dtype=dtype, device=qweight.device)
    meta = _meta(bits, group_size, zeros, contiguous)

    def grid(m):
        return triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(N, m["BLOCK_N"])

    _dequant_kernel[grid](qweight, scales, zeros, g_idx, w, N, K, **meta)
    return w


def quant_matmul(x, qweight, scales, zeros, g_idx, bits: int, group_size: int, contiguous: bool) -> torch.Tensor:
    """y = x @ W~: x [M, K] -> [M, N] in x's dtype. group_size: the columns per group where
    `contiguous` (g = k // group_size); otherwise g_idx is read. Up to 8 rows: the fused
    matrix-vector kernel; more: W~ for this call, then cuBLAS."""
    K = qweight.shape[0] * 32 // bits
    x = _check(x, K, "x")
    if x.shape[0] <= MATVEC_MAX_M:
        return quant_matvec(x, qweight, scales, zeros, g_idx, bits, group_size, contiguous)
    return x @ dequantize(qweight, scales, zeros, g_idx, bits, group_size, contiguous, x.dtype)


def quant_matmul_t(dy, qweight, scales, zeros, g_idx, bits: int, group_size: int, contiguous: bool) -> torch.Tensor:
    """dx = dy @ W~^T: dy [M, N] -> [M, K] in dy's dtype (training's backward: many rows)."""
    dy = _check(dy, qweight.shape[1], "dy")
    return dy @ dequantize(qweight, scales, zeros, g_idx, bits, group_size, contiguous, dy.dtype).t()


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
