"""The read-back check of a written GGUF file: gguf's own reader and dequantizer, each tensor
compared with what it must equal, within the rounding of its storage type."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from ..errors import UserError
from ..quant.result import QuantizedWeight
from .gguf_writer import BLOCK, BLOCK_BYTES, Q4_1, heads_to_permute, permute_rows

_EPS32 = float(np.finfo(np.float32).eps)


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def verify_gguf_weights(gguf_file: Path, expected: Callable[[str], QuantizedWeight | torch.Tensor],
                        names: list[str]) -> dict:
    """Read the file back (gguf's own reader and dequantizer) and check each named tensor
    against what it must equal. Q4_1: codes and d exactly, the weights within half an fp16 ulp of
    the block's m (plus float32 slack); F16/F32: within their own rounding. Raises UserError on the
    first mismatch; returns {"max_abs_diff", "max_ratio_to_bound", "tensors"}."""
    reader = gguf.GGUFReader(gguf_file)
    n_head, n_kv = _field(reader, "llama.attention.head_count"), _field(reader, "llama.attention.head_count_kv")
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, _field(reader, "llama.block_count"))
    stored = {t.name: t for t in reader.tensors}
    worst_diff, worst_ratio, checked = 0.0, 0.0, 0
    for hf_name in names:
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name not in stored:
            if hf_name == "lm_head.weight" and "output.weight" not in stored:
                continue  # tied embeddings
            raise UserError(f"gguf check: tensor '{hf_name}' ({name}) is missing from {gguf_file}")
        t, want = stored[name], expected(hf_name)
        heads = heads_to_permute(hf_name, n_head, n_kv)
        unperm = (lambda x: permute_rows(x, heads, inverse=True)) if heads else (lambda x: x)
        got = unperm(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)).astype(np.float64)
        if isinstance(want, QuantizedWeight):
            diff, ratio = _q4_1_error(hf_name, t, want, got, unperm)
        else:
            diff, ratio = _float_error(t, want, got)
        if not (ratio <= 1).all():
            raise UserError(f"gguf check: '{hf_name}' differs from the merged model by {diff.max():.3g}, "
                            f"{ratio.max():.3g} times the rounding of its storage type")
        worst_diff, worst_ratio = max(worst_diff, float(diff.max())), max(worst_ratio, float(ratio.max()))
        checked += 1
    return {"max_abs_diff": worst_diff, "max_ratio_to_bound": worst_ratio, "tensors": checked}


def _q4_1_error(hf_name: str, t, want: QuantizedWeight, got: np.ndarray, unperm) -> tuple[np.ndarray, np.ndarray]:
    """Codes and d must be the merged layer's exactly; -> (|got - merged|, that over the bound
    of m's fp16 rounding plus float32 slack), per weight."""
    if t.tensor_type != Q4_1:
        raise UserError(f"gguf check: '{hf_name}' is {t.tensor_type.name}, not Q4_1")
    out = got.shape[0]
    blocks = unperm(np.asarray(t.data).reshape(out, -1, BLOCK_BYTES))
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    qs = blocks[..., 4:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(out, -1)
    if not np.array_equal(codes, want.codes.cpu().numpy()) or \
            not np.array_equal(d, want.scales.cpu().double().numpy().T):
        raise UserError(f"gguf check: '{hf_name}': codes or scales differ from the merged model")
    ref = want.dequantize().cpu().double().numpy().reshape(out, -1, BLOCK)
    bound = 0.5 * np.spacing(np.abs(m).astype(np.float16)).astype(np.float64) \
        + 4 * _EPS32 * (15 * np.abs(d) + 2 * np.abs(m))
    diff = np.abs(got.reshape(out, -1, BLOCK) - ref)
    return diff, diff / bound[..., None]


def _float_error(t, want: torch.Tensor, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (|got - want|, that over half a unit of F16's last place; F32 must be exact)."""
    ref = want.detach().cpu().double().numpy()
    if t.tensor_type == gguf.GGMLQuantizationType.F16:
        bound = 0.5 * np.spacing(np.abs(ref).astype(np.float16)).astype(np.float64)
    else:
        bound = np.zeros_like(ref)  # F32 holds float32 exactly
    diff = np.abs(got.reshape(ref.shape) - ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / bound)
    return diff, ratio
