"""The merged model as an mlx-lm folder (Apple MLX's affine quantization), streamed from the
base checkpoint tensor by tensor.

MLX stores a quantized Linear as w = scales * q + biases per group of input columns, with the
codes packed low bits first into uint32 words along each row. A merged QA-LoRA layer is
exactly that with scales = s and biases = -s z' (z' the merged, fractional zero point): the
codes and the scales are the base's, so the only rounding is the bias to float16 (or none
beyond float32 with `merge.mlx_dtype: float32`). Everything else (embeddings, norms, an untied
lm_head) is written as it is in the base.

The files are written with torch and numpy alone; mlx and mlx-lm check them (the weights read
back with mx.load + mx.dequantize, the model run by mlx_lm.load), so the format asks for both.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..dtypes import DTYPES
from ..errors import UserError
from ..lora.adapter_io import merged_adapter_record
from ..models.safetensors_stream import StreamWriter
from ..quant.groups import GroupLayout
from ..quant.pack import pack_cols, unpack_cols
from ..quant.result import QuantizedWeight
from .checkpoint_reader import CheckpointReader
from .gguf_merge import merged_loader
from .layer_merge import LayerMerger

MLX_BITS = (2, 3, 4, 8)            # MLX also has 5 and 6; the toolkit quantizes to these
MLX_GROUP_SIZES = (32, 64, 128)    # what mx.quantize / quantized_matmul accept for affine
INDEX = "model.safetensors.index.json"
_DTYPES = {name: DTYPES[name] for name in ("float16", "float32")}  # the choices of merge.mlx_dtype
_NOT_COPIED = {"config.json", "quantize_config.json", INDEX}
_GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")
# Verification compares the MLX model (its stored values, run in float32) with the unmerged
# torch model in float32. With float16 biases the only difference is their rounding, at most
# half an fp16 ulp of |b| = |s z'| per weight. Measured, as a share of the largest logit: 2.0e-3
# to 2.7e-3 on the tiny random test models (INT2/3/4/8, groups 32/64/128; GGUF Q4_1, which rounds
# m = -s z' the same way, gives the same figure) and 2.5e-3 on SmolLM2-135M INT4 g32; float32
# biases: 8e-7 and 3.9e-6. Half a step added to one layer's zero points gives 2.5e-2 (INT8
# g128) to 6e-1 (INT3). 1e-2 sits between: 3.7x the largest rounding measured, 2.5x below the
# smallest such error.
MLX_RELATIVE_TOLERANCE = 1e-2


def install_hint() -> str:
    cpu = " mlx-cpu" if sys.platform.startswith("linux") else ""  # Linux wheels need the CPU backend
    return f"pip install mlx mlx-lm{cpu}"


def mlx_importable() -> bool:
    """Whether mlx (with a backend) and mlx-lm import. A function so tests can pretend otherwise."""
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except Exception:  # ImportError, or an OSError from a missing backend library
        return False
    return True


def check_mlx_compatible(base: Path, qc: dict) -> None:
    """Every refusal of the mlx format, in one line each, before anything is written."""
    bits, group = qc["bits"], qc["group_size"]
    if bits not in MLX_BITS or group not in MLX_GROUP_SIZES:
        raise UserError(f"the mlx format supports bits {', '.join(map(str, MLX_BITS))} and group size "
                        f"{', '.join(map(str, MLX_GROUP_SIZES))}; this model has bits {bits}, group size {group}: "
                        "use --format qalora")
    _check_contiguous_groups(base)
    if not mlx_importable():
        raise UserError(f"the mlx format needs mlx and mlx-lm: {install_hint()}")
    _check_architecture(qc.get("model_type"))


def _check_contiguous_groups(base: Path) -> None:
    """MLX groups are runs of consecutive input columns; act-order g_idx scatters them. Read
    from every layer's g_idx (small), not the config, so any checkpoint is judged by its data."""
    with CheckpointReader(base) as reader:
        for key in reader.file_of:
            if key.endswith(".g_idx"):
                prefix = key[: -len(".g_idx")]
                if not GroupLayout(reader.get(key), reader.shape(f"{prefix}.scales")[0]).contiguous:
                    raise UserError(f"{prefix}: its groups are not contiguous (act-order), which MLX cannot hold: "
                                    "quantize with quantize.static_groups=true (or quantize.act_order=false)")


def _check_architecture(model_type: str | None) -> None:
    from mlx_lm.utils import MODEL_REMAPPING

    name = MODEL_REMAPPING.get(model_type, model_type)
    if not name or importlib.util.find_spec(f"mlx_lm.models.{name}") is None:
        raise UserError(f"mlx-lm has no model type '{model_type}': use --format qalora")


def pack_mlx(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int codes [out, in] -> uint32 [out, in * bits / 32]: each row one little-endian bit stream,
    value k at bit k * bits (3 bits straddle words). That is GPTQ's packing along the input
    dim, transposed (quant/pack.py), which tests check against mx.quantize's own."""
    return pack_cols(codes, bits, "the input width").view(torch.uint32)


def mlx_layer(qw: QuantizedWeight, dtype_name: str, layer: str) -> dict[str, torch.Tensor]:
    """{"weight", "scales", "biases"} of one quantized linear in MLX's layout, scales and biases
    in `dtype_name` (float16 or float32)."""
    s = qw.scales.detach().cpu().double().T.numpy()  # [out, groups]
    scales = s.astype(dtype_name)
    if not np.array_equal(scales.astype(np.float64), s):
        raise UserError(f"{layer}: the scales are not {dtype_name} values, so MLX cannot store them exactly: "
                        "use merge.mlx_dtype=float32")
    # numpy rounds float64 -> float16 once (torch would go through float32 and could round twice)
    b = (-s * qw.zeros.detach().cpu().double().T.numpy()).astype(dtype_name)
    if not np.isfinite(b).all():
        raise UserError(f"{layer}: a zero point times its scale overflows {dtype_name}: use --format qalora")
    return {"weight": pack_mlx(qw.codes, qw.bits), "scales": torch.from_numpy(np.ascontiguousarray(scales)),
            "biases": torch.from_numpy(np.ascontiguousarray(b))}


def plan_shards(reader: CheckpointReader, bits: int, dtype: torch.dtype) -> list[tuple[str, list]]:
    """[(file name, [(name, dtype, shape, layer or None)...])], one output shard per base shard; layer:
    the quantized linear the tensor is made from, None for a tensor copied as it is. A quantized
    layer's three tensors go where its qweight is, together (written from one merged layer);
    its GPTQ parts (qweight, qzeros, scales, g_idx) are not written."""
    quantized = {k[: -len(".qweight")] for k in reader.file_of if k.endswith(".qweight")}
    n, shards = len(reader.files), []
    for i, f in enumerate(reader.files):
        entries = []
        for key in reader.keys_in(f):
            prefix, _, leaf = key.rpartition(".")
            if prefix not in quantized or leaf not in _GPTQ_PARTS:  # a linear's float bias stays
                entries.append((key, reader.dtype(key), reader.shape(key), None))
            elif leaf == "qweight":
                groups, out = reader.shape(f"{prefix}.scales")
                n_in = reader.shape(f"{prefix}.g_idx")[0]
                entries += [(f"{prefix}.weight", torch.uint32, (out, n_in * bits // 32), prefix),
                            (f"{prefix}.scales", dtype, (out, groups), prefix),
                            (f"{prefix}.biases", dtype, (out, groups), prefix)]
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"  # mlx-lm globs model*
        shards.append((name, entries))
    return shards


def write_merged_mlx(merger: LayerMerger, base: Path, out_dir: Path, dtype_name: str, base_sha256: str,
                     on_layer=None) -> list[dict]:
    """Write the mlx-lm folder. -> one report row per merged layer."""
    reader = merger.base
    rows: list[dict] = []
    load = merged_loader(merger, rows, on_layer)
    weight_map, total = {}, 0
    for file_name, entries in plan_shards(reader, merger.bits, _DTYPES[dtype_name]):
        with StreamWriter(out_dir / file_name, [e[:3] for e in entries], {"format": "mlx"}) as w:
            tensors: dict[str, torch.Tensor] = {}
            for name, _, _, layer in entries:
                if layer is None:
                    w.write(name, reader.get(name))
                    continue
                leaf = name.rpartition(".")[2]
                if leaf == "weight":  # the first of the layer's three tensors: make all three
                    tensors = mlx_layer(load(name), dtype_name, layer)
                w.write(name, tensors[leaf])
        weight_map.update({e[0]: file_name for e in entries})
        total += w.data_bytes
    if len(set(weight_map.values())) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    merged = merged_adapter_record(merger.config, base_sha256)
    write_mlx_config(base, out_dir, merger.bits, merger.group_size, merged)
    return rows


def write_mlx_config(base: Path, out_dir: Path, bits: int, group_size: int, merged_info: dict) -> None:
    """config.json as mlx-lm reads it; the tokenizer and the other side files copied."""
    from transformers import AutoConfig

    weights = {p.name for p in base.glob("*.safetensors")}
    for p in sorted(base.iterdir()):
        if p.is_file() and p.name not in weights | _NOT_COPIED:
            shutil.copy2(p, out_dir / p.name)
    config = json.loads((base / "config.json").read_text())
    quantization = {"group_size": group_size, "bits": bits, "mode": "affine"}
    # mlx-lm reads "quantization" (older versions "quantization_config"); the GPTQ one must go.
    config.update(quantization=quantization, quantization_config=dict(quantization), qalora_merged_adapter=merged_info)
    # mlx-lm's Llama defaults tie_word_embeddings to true (and then drops lm_head): say what transformers uses.
    config["tie_word_embeddings"] = bool(getattr(AutoConfig.from_pretrained(base), "tie_word_embeddings", False))
    _legacy_rope_keys(config)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _legacy_rope_keys(config: dict) -> None:
    """transformers 5 writes RoPE as `rope_parameters`; mlx-lm's Llama/Qwen/Mistral read
    `rope_theta` and `rope_scaling` (else theta 10000: SmolLM2's is 100000)."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" not in params:
        return  # absent, or per layer type (models that read it themselves)
    if config.get("rope_theta") is None:
        config["rope_theta"] = params["rope_theta"]
    if params.get("rope_type", "default") != "default" and config.get("rope_scaling") is None:
        config["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}


def _stored_arrays(out_dir: Path) -> dict:
    """name -> lazy mx.array (mx.load maps nothing in until each array is evaluated)."""
    import mlx.core as mx

    arrays = {}
    for f in sorted(out_dir.glob("model*.safetensors")):
        arrays.update(mx.load(str(f)))
    return arrays


def _half_spacing(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return 0.5 * np.spacing(np.abs(x).astype(dtype)).astype(np.float64)


def check_mlx_weights(merger: LayerMerger, out_dir: Path) -> dict:
    """Read the folder back with mx.load and check every tensor against what it must equal:
    codes and scales exactly; mx.dequantize's weights within half a storage-dtype ulp of the
    group's bias -s z' (plus float32 slack) of the exact merge; float tensors exactly."""
    import mlx.core as mx

    stored, reader, load = _stored_arrays(out_dir), merger.base, merged_loader(merger)
    expected = [e for _, entries in plan_shards(reader, merger.bits, torch.float32) for e in entries]
    worst_diff, worst_ratio, checked = 0.0, 0.0, 0
    for name, _, _, layer in expected:
        if name not in stored:
            raise UserError(f"mlx check: tensor '{name}' is missing from {out_dir}")
        if layer is None:
            bf16 = reader.dtype(name) == torch.bfloat16  # numpy has no bfloat16: compare as float32 (exact)
            got = np.array(stored[name].astype(mx.float32) if bf16 else stored[name])
            want = reader.get(name).float().numpy() if bf16 else reader.get(name).numpy()
            if got.dtype != want.dtype or not np.array_equal(got, want):
                raise UserError(f"mlx check: '{name}' differs from the base's")
            checked += 1
        elif name.endswith(".weight"):
            diff, ratio = _check_layer(stored, layer, load(name))
            worst_diff, worst_ratio, checked = max(worst_diff, diff), max(worst_ratio, ratio), checked + 1
    return {"max_abs_diff": worst_diff, "max_ratio_to_bound": worst_ratio, "tensors": checked}


def _check_layer(stored: dict, prefix: str, qw: QuantizedWeight) -> tuple[float, float]:
    import mlx.core as mx

    w, s, b = (stored[f"{prefix}.{k}"] for k in ("weight", "scales", "biases"))
    codes = unpack_cols(torch.from_numpy(np.array(w).view(np.int32)), qw.bits, qw.codes.shape[1])
    if not torch.equal(codes, qw.codes.cpu()) or not np.array_equal(np.array(s.astype(mx.float32)),
                                                                   qw.scales.cpu().float().T.numpy()):
        raise UserError(f"mlx check: '{prefix}': codes or scales differ from the merged model")
    got = np.array(mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=qw.group_size,
                                 bits=qw.bits)).astype(np.float64)
    exact = replace(qw, scales=qw.scales.double(), zeros=qw.zeros.double()).dequantize().cpu().numpy()  # float64
    b64 = np.array(b.astype(mx.float32)).astype(np.float64)
    top = (1 << qw.bits) - 1
    bound = _half_spacing(b64, np.dtype(str(b.dtype).split(".")[-1])) \
        + 4 * float(np.finfo(np.float32).eps) * (top * np.abs(np.array(s.astype(mx.float32))) + np.abs(b64))
    bound = np.repeat(bound, qw.group_size, axis=1)
    diff = np.abs(got - exact)
    if not (diff <= bound).all():
        raise UserError(f"mlx check: '{prefix}' differs from the merged model by {diff.max():.3g}, "
                        f"{(diff / bound).max():.3g} times the rounding of its bias")
    return float(diff.max()), float((diff / bound).max())


class _TorchView:
    """Just enough of a torch causal LM around an mlx-lm model for eval/perplexity.py."""

    def __init__(self, model):
        self.model = model

    def parameters(self):
        yield torch.empty(0)  # perplexity() reads the device from the first parameter: the CPU

    def __call__(self, input_ids: torch.Tensor):
        import mlx.core as mx

        logits = self.model(mx.array(input_ids.numpy()))
        return SimpleNamespace(logits=torch.from_numpy(np.array(logits.astype(mx.float32))))


def mlx_probe(probe):
    """The probe for the MLX model: without perplexity where MLX runs on the CPU. Its Linux CPU
    backend multiplies with reference BLAS, about 20x slower than torch (SmolLM2-135M's check: 21
    min with the 4096-token perplexity, 4 to 10 without, on 2 busy cores); logits and greedy tokens
    are still compared."""
    import mlx.core as mx

    return replace(probe, ppl_ids=None) if mx.default_device() == mx.cpu else probe


def run_mlx_probe(out_dir: Path, probe) -> dict:
    """export/verify.py's run_probe for the MLX folder, loaded by mlx_lm.load: the logits of
    every prompt, greedy continuations of the first two, perplexity with the same windows.
    The model runs in float32 (a lossless upcast of what the files hold), so the comparison
    measures the file, not float16 arithmetic."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from ..eval.perplexity import perplexity

    model, _ = load(str(out_dir))
    model.set_dtype(mx.float32)
    view = _TorchView(model)
    logits = [view(input_ids=p[None]).logits[0] for p in probe.prompts]
    greedy = []
    for p in probe.prompts[:2] if probe.generate_tokens else []:
        steps = generate_step(mx.array(p.tolist()), model, max_tokens=probe.generate_tokens)  # argmax sampler
        greedy.append([int(tok) for tok, _ in steps])
    ppl = None
    if probe.ppl_ids is not None:
        seq = min(probe.ppl_seq_len, probe.ppl_ids.numel() - 1)
        ppl = perplexity(view, probe.ppl_ids, seq_len=seq, batch_size=4)["ppl"]
    return {"logits": logits, "greedy": greedy, "ppl": ppl}
