"""Write and read quantized checkpoints: a Hugging Face folder whose quantized linear layers
hold `qweight`, `qzeros` (z - 1, GPTQ v1), `scales` and `g_idx`, with `quantization_config`
in config.json. transformers + GPTQModel, vLLM and exllama read the same files.

The merged format (`quant_method: qalora`) is the same but for the layers an adapter was
merged into: they hold float32 `zeros` [groups, out] instead of `qzeros`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..config.schema import QuantizeSection
from ..errors import UserError, first_line
from ..kernels.torch_quant_linear import TorchQuantLinear
from ..quant.result import QuantizedWeight
from .modules import set_module


MERGED_QUANT_METHOD = "qalora"  # float zero points: no GPTQ reader may take these files for its own


def read_model_config(path: str | Path) -> dict:
    """A model folder's config.json as a dict (UserError when it is missing or not JSON)."""
    f = Path(path) / "config.json"
    try:
        config = json.loads(f.read_text())
    except FileNotFoundError:
        raise UserError(f"'{path}' is not a model folder (no config.json)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"'{f}' could not be read: {e}") from None
    return config if isinstance(config, dict) else {}


def quant_method_of(config: dict) -> str | None:
    """'gptq', 'qalora' (merged), another method's name, or None for an unquantized model."""
    qc = config.get("quantization_config")
    return qc.get("quant_method") if isinstance(qc, dict) else None


def gptq_quantization_config(q: QuantizeSection) -> dict:
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": q.bits,
        "group_size": q.group_size,
        "desc_act": q.act_order and q.method == "gptq",
        "static_groups": q.static_groups and q.method == "gptq",
        "sym": q.sym,
        "true_sequential": q.true_sequential,
        "damp_percent": q.damp_percent,
        "lm_head": False,
        "pack_dtype": "int32",
        "quantizer": [f"qalora:{_version()}"],
    }


def _version() -> str:
    from .. import __version__

    return __version__


def install_quant_linears(model: nn.Module, weights: dict[str, QuantizedWeight], dtype: torch.dtype) -> None:
    """Replace each named nn.Linear by a TorchQuantLinear holding its quantized weight."""
    for name, qw in weights.items():
        lin = model.get_submodule(name)
        set_module(model, name, TorchQuantLinear.from_quantized(qw, lin.bias, "int", dtype))


def save_quantized(model: nn.Module, tokenizer, out_dir: Path, quantization_config: dict,
                   dtype: torch.dtype, max_shard_size: str) -> None:
    model.to(dtype)  # floating tensors only: packed int32 buffers keep their type
    model.config.quantization_config = quantization_config
    model.config.dtype = dtype
    model.save_pretrained(out_dir, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # GPTQModel and older AutoGPTQ readers look for this file beside config.json.
    (out_dir / "quantize_config.json").write_text(json.dumps(quantization_config, indent=2) + "\n")


def weight_files(path: str | Path) -> list[Path]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            if not names or not all(isinstance(n, str) and n and Path(n).name == n for n in names):
                raise ValueError("its weight_map does not name shard files of this folder")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"'{index}' is damaged: {first_line(e)}") from None
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"'{path}' holds no safetensors weights (model.safetensors or an index)")


def load_quantized(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """-> (model with TorchQuantLinear layers, quantization_config dict). No weight is
    materialized in full precision: the model is built empty, then filled from the files."""
    from .loading import quiet_transformers

    quiet_transformers()
    path = Path(path)
    config, qc = _read_quantized_config(path)
    dtype = _checkpoint_dtype(path, config, dtype)
    files = weight_files(path)
    file_of = _tensor_files(path, files)
    model = _empty_model(path, config, dtype)
    _install_empty_quant_linears(path, model, file_of, qc["bits"], qc["group_size"], dtype)
    state = _read_tensors(path, files)
    _check_tensors(path, model, state)
    _assign_weights(path, model, state)
    _check_g_idx(path, model)
    return model.to(device=device, dtype=dtype).eval(), qc


def _read_quantized_config(path: Path):
    """-> (the transformers config without its quantization_config, that quantization_config
    as a dict): refused unless it is a GPTQ v1 or merged checkpoint with valid bits and groups."""
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise UserError(f"'{path}' is not a quantized model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # the loading boundary: a damaged config.json
        raise UserError(f"'{path / 'config.json'}' could not be read: {first_line(e)}") from e
    qc = getattr(config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    if not isinstance(qc, dict) or qc.get("quant_method") not in ("gptq", MERGED_QUANT_METHOD):
        raise UserError(f"'{path}' is not a quantized checkpoint (no quantization_config with quant_method "
                        f"gptq or {MERGED_QUANT_METHOD})")
    if qc["quant_method"] == "gptq" and qc.get("checkpoint_format", "gptq") != "gptq":
        raise UserError(f"'{path}': checkpoint_format {qc.get('checkpoint_format')!r} is not supported; "
                        "qalora reads the GPTQ v1 layout ('gptq')")
    bits, group_size = qc.get("bits"), qc.get("group_size")
    if bits not in (2, 3, 4, 8) or not isinstance(group_size, int) or isinstance(group_size, bool) or \
            not (group_size == -1 or group_size > 0):
        raise UserError(f"'{path / 'config.json'}': quantization_config has bits {bits!r} and group_size "
                        f"{group_size!r}; expected bits 2, 3, 4 or 8 and a group size > 0 (or -1)")
    # The model is built plain: its quantized layers are installed from the files below.
    del config.quantization_config
    return config, qc


def _checkpoint_dtype(path: Path, config, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype asked for, else the one config.json records, else float16."""
    dtype = dtype or getattr(config, "dtype", None) or torch.float16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserError(f"'{path / 'config.json'}': dtype {dtype!r} is not a floating-point type")
    return dtype


def _tensor_files(path: Path, files: list[Path]) -> dict[str, Path]:
    """{tensor name: the file holding it}, from the headers only."""
    from safetensors import safe_open

    try:
        file_of = {}
        for f in files:
            with safe_open(f, "pt") as sf:
                file_of.update({k: f for k in sf.keys()})
    except Exception as e:
        raise UserError(f"'{path}': corrupt weights file: {first_line(e)}") from e
    return file_of


def _read_tensors(path: Path, files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    state = {}
    try:
        for f in files:
            with safe_open(f, "pt") as sf:
                state.update({k: sf.get_tensor(k) for k in sf.keys()})
    except Exception as e:
        raise UserError(f"'{path}': corrupt weights file: {first_line(e)}") from e
    return state


def _empty_model(path: Path, config, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device: no memory until the weights are assigned."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:  # a damaged config.json can describe a model no one can build
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:
        raise UserError(f"'{path / 'config.json'}' describes no model transformers can build: "
                        f"{first_line(e)}") from e


def _install_empty_quant_linears(path: Path, model: nn.Module, tensor_names, bits: int, group_size: int,
                                 dtype: torch.dtype) -> None:
    """An empty TorchQuantLinear in place of each nn.Linear whose `qweight` the files hold."""
    for key in tensor_names:
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        try:
            lin = model.get_submodule(name)
            if not isinstance(lin, nn.Linear):
                raise AttributeError(f"{name} is a {type(lin).__name__}, not a linear layer")
            # A merged (qalora-format) layer holds float `zeros`; the others GPTQ `qzeros`.
            kind = "float" if f"{name}.zeros" in tensor_names else "int"
            set_module(model, name, TorchQuantLinear(lin.in_features, lin.out_features, bits, group_size,
                                                      lin.bias is not None, kind, dtype))
        except (AttributeError, ValueError, RuntimeError, ZeroDivisionError) as e:
            raise UserError(f"'{path}': weights do not match the model config ({key}: {first_line(e)})") from e


def _assign_weights(path: Path, model: nn.Module, state: dict) -> None:
    """The stored tensors become the model's (no copy); every parameter must be covered."""
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
    except (RuntimeError, ValueError, TypeError) as e:
        raise UserError(f"'{path}': weights do not match the model config ({first_line(e)})") from e
    still_empty = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_empty or result.unexpected_keys:
        what = f"missing {still_empty[:3]}" if still_empty else f"unexpected {result.unexpected_keys[:3]}"
        raise UserError(f"'{path}': weights do not match the model config ({what})")


def _check_g_idx(path: Path, model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, TorchQuantLinear) and m.g_idx.numel() and not (
                0 <= int(m.g_idx.min()) and int(m.g_idx.max()) < m.scales.shape[0]):
            raise UserError(f"'{path}': {name}.g_idx names groups outside 0..{m.scales.shape[0] - 1}")


def _check_tensors(path: Path, model: nn.Module, state: dict) -> None:
    """Each stored tensor has the shape the config gives it, and a dtype of the same kind
    (packed integers stay integers, float weights floats): else one line naming the tensor."""
    want = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for key, t in state.items():
        w = want.get(key)
        if w is None:
            continue  # unexpected keys are reported below, with what is missing
        if w.dtype.is_floating_point:
            same_kind = t.dtype.is_floating_point
        else:  # packed words must be int32; a g_idx may be any integer type
            same_kind = t.dtype == w.dtype or (key.endswith(".g_idx") and t.dtype in (torch.int16, torch.int64))
        if tuple(t.shape) != tuple(w.shape) or not same_kind:
            raise UserError(f"'{path}': weights do not match the model config ({key} is {t.dtype} "
                            f"{tuple(t.shape)}, the config needs {w.dtype} {tuple(w.shape)})")
