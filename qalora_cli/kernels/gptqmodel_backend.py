"""The GPTQModel backend: the peer library's own QuantLinear kernels run on this layer's GPTQ
tensors, for comparison and for its CUDA kernels. Integer zero points only: GPTQModel keeps
zero points packed as integers (`qzeros`), so a merged model's fractional zeros cannot be held.

Kernel per layer, the first whose SUPPORTS_* data and `validate()` accept it (GPTQModel 7.6.0):
  cpu   TorchLinear      unpacks and dequantizes W~ in every forward, then matmul; W~ is
                         dropped after each call (unless GPTQ_TORCH_CACHE_WEIGHTS=1 turns on
                         GPTQModel's own weight cache).
  cuda  ExllamaV2Linear  4-bit. Shuffles qweight in place (so it gets a packed copy) and
                         dequantizes big batches into a per-device scratch the size of one fp16
                         weight, shared by the layers of that shape (as GPTQModel shares one).
        MarlinLinear     4/8-bit, symmetric zeros only (it drops qzeros): a repacked copy of
                         qweight and permuted scales, no float weight.
        TritonV2Linear   Triton dequantize, then matmul; W~ is transient, as in TorchLinear.
        TorchLinear      as on the CPU.
With a gradient wanted, TorchLinear runs (GPTQModel's one trainable kernel), behind a Function
that rebuilds W~ in the backward pass instead of letting autograd save it per layer.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

from ..quant.gptq_format import decode_qzeros
from ..quant.groups import GroupLayout
from ..quant.pack import pack_cols
from .base import BackendSupport

KERNEL_DTYPES = (torch.float16, torch.bfloat16)   # SUPPORTS_DTYPES of every kernel used here

SUPPORT = BackendSupport(
    name="gptqmodel",
    bits=(2, 3, 4, 8),
    # TorchLinear.SUPPORTS_GROUP_SIZE (the kernel every device falls back to); a test checks it.
    group_sizes=(-1, 16, 32, 64, 128, 256, 512, 1024),
    zero_kinds=("int",),
    devices=("cpu", "cuda"),
    trainable_input=True,
    act_order=True,
    dtypes=KERNEL_DTYPES,
)

# (module under gptqmodel.nn_modules.qlinear, class), fastest first; the CPU has only torch.
CUDA_KERNELS = (("exllamav2", "ExllamaV2Linear"), ("marlin", "MarlinLinear"),
                ("tritonv2", "TritonV2Linear"), ("torch", "TorchLinear"))
_SCRATCH: dict = {}   # (device, bytes) -> exllama v2 ScratchSpace


@functools.cache
def _import_error() -> str | None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")   # its CPU thread pool, else cores/2
    try:
        import gptqmodel  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name == "gptqmodel":
            return "gptqmodel is not installed (pip install gptqmodel)"
        return f"gptqmodel fails to import: {e} (pip install -U gptqmodel)"
    except Exception as e:  # noqa: BLE001 - a broken install (CUDA/ABI mismatch) says why
        return f"gptqmodel fails to import: {e} (pip install -U gptqmodel)"
    return None


def _kernel_class(module: str, name: str):
    return getattr(importlib.import_module(f"gptqmodel.nn_modules.qlinear.{module}"), name)


def _v2_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """v1 `qzeros` hold z - 1 (masked to b bits); the kernels here read v2, z itself.
    GPTQModel's convert_gptq_v1_to_v2_format adds 1 to every field of a packed word at once,
    which carries into the next field where z = 0 (stored as 2^b - 1): so decode, repack."""
    return pack_cols(zeros.to(torch.int32), bits, "the output width")


def _build(cls, layer, device: torch.device, dtype: torch.dtype, qzeros: torch.Tensor, sym: bool,
           act_order: bool):
    m = cls(bits=layer.bits, group_size=layer.group_size, desc_act=act_order, sym=sym,
            in_features=layer.in_features, out_features=layer.out_features, bias=False,
            pack_dtype=torch.int32, register_buffers=False, dtype=dtype)
    # Exllama and Marlin rewrite qweight, scales and g_idx in place in post_init (Marlin even
    # copies its repacked words back into the storage it was given): they get copies, scales in
    # the kernel's dtype. The others only read them and share the layer's tensors.
    rewrites = cls.__name__ in ("ExllamaV2Linear", "MarlinLinear")
    tensors = {"qweight": layer.qweight, "qzeros": qzeros, "scales": layer.scales, "g_idx": layer.g_idx}
    for name, t in tensors.items():
        if rewrites and name != "qzeros":
            t = t.to(dtype if name == "scales" else t.dtype, copy=True)
        if isinstance(getattr(m, name, None), torch.nn.Parameter):   # Marlin registers parameters
            setattr(m, name, torch.nn.Parameter(t, requires_grad=False))
        else:
            m.register_buffer(name, t)
    m.bias = None                    # our module adds the bias
    m.qzero_format(format=2)
    # TorchLinear.post_init torch.compiles its dequantize per instance: seconds of C++ build per
    # layer on the CPU, recompiled for every layer shape until dynamo's cache limit, after
    # which it runs eager anyway. Marked as done, it runs the same code eagerly.
    m.optimized = True
    if cls.__name__ == "ExllamaV2Linear":
        key = (device, m.temp_dq_size())
        if key not in _SCRATCH:
            from gptqmodel.utils.exllamav2 import ScratchSpace
            _SCRATCH[key] = ScratchSpace(key[1], device)
        m.post_init(scratch_space=_SCRATCH[key])
    else:
        m.post_init()
    return m.eval()   # eval: TritonV2 falls back to the torch path in training mode


def _kernel(layer, device: torch.device, trainable: bool):
    """The GPTQModel module for this layer: built once, rebuilt when the layer moves or its
    tensors change (by storage or in-place version)."""
    bufs = (layer.qweight, layer.qzeros, layer.scales, layer.g_idx)
    key = (device, tuple((t.data_ptr(), t._version) for t in bufs))
    cached = getattr(layer, "_gptqmodel_linear", None)
    if cached is None or cached[0] != key:
        # A tuple, not a Module attribute: nn.Module would register it as a submodule and
        # save and move its tensors with ours.
        cached = layer._gptqmodel_linear = (key, {})
    # CUDA: a fast inference kernel, and TorchLinear once gradients are wanted; on the CPU
    # both are TorchLinear, so one module serves.
    role = trainable and device.type == "cuda"
    if role not in cached[1]:
        cached[1][role] = _choose(layer, device, trainable)
    return cached[1][role]


def _choose(layer, device: torch.device, trainable: bool):
    dtype = layer.scales.dtype if layer.scales.dtype in KERNEL_DTYPES else torch.float16
    zeros = decode_qzeros(layer.qzeros, layer.bits, layer.out_features)
    qzeros = _v2_qzeros(zeros, layer.bits)
    sym = bool((zeros == 2 ** (layer.bits - 1)).all())
    layout = GroupLayout(layer.g_idx, layer.scales.shape[0])
    act_order = not layout.contiguous
    names = CUDA_KERNELS if device.type == "cuda" and not trainable else CUDA_KERNELS[-1:]
    for module, name in names:
        try:
            cls = _kernel_class(module, name)
        except ImportError:
            continue
        ok = cls.cached_validate_once()[0] and cls.validate(
            bits=layer.bits, group_size=layer.group_size, desc_act=act_order, sym=sym,
            in_features=layer.in_features, out_features=layer.out_features, pack_dtype=torch.int32,
            dtype=dtype, device=device, trainable=trainable)[0]
        # Exllama and Marlin map rows to groups by position after sorting g_idx: equal sizes only.
        if not ok or (name in ("ExllamaV2Linear", "MarlinLinear") and not layout.equal_sizes):
            continue
        if name == "TorchLinear":
            return _build(cls, layer, device, dtype, qzeros, sym, act_order)
        try:   # a CUDA kernel whose extension fails to build here: fall back, and say so
            return _build(cls, layer, device, dtype, qzeros, sym, act_order)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"gptqmodel {name} unusable here ({e}); trying the next kernel")
    raise RuntimeError(f"no GPTQModel kernel accepts {layer.extra_repr()} on {device}")


class _TorchKernelMatmul(torch.autograd.Function):
    """y = x W~^T by GPTQModel's TorchLinear; dx = dy W~ with W~ rebuilt by its dequantize
    rather than saved by autograd (a full-precision copy of every layer until backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module) -> torch.Tensor:
        ctx.module = module
        return module(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        w = ctx.module.dequantize_weight()   # [in, out]
        return torch.matmul(dy, w.to(dy.dtype).t()), None


class GPTQModelBackend:
    support = SUPPORT

    def unavailable(self) -> str | None:
        return _import_error()

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        trainable = torch.is_grad_enabled() and x.requires_grad
        module = _kernel(layer, layer.qweight.device, trainable)
        dtype = x.dtype
        if dtype not in KERNEL_DTYPES:   # the kernels are declared for float16/bfloat16 only
            x = x.to(module.scales.dtype if module.scales.dtype in KERNEL_DTYPES else torch.float16)
        if trainable:
            y = _TorchKernelMatmul.apply(x, module)
        else:
            y = module(x)
        return y.to(dtype)
