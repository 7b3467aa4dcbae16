"""The memory of `qalora quantize` (recipes/quantize.py, quant/sequential.py, quant/gptq.py).

The float model is loaded on the CPU and stays there; each block visits the quantize device for
its turn. What grows is the result: every layer's GPTQ codes stay int32 [out, in] (4 bytes a
weight, as much as a float32 model) with float32 scales and zeros until all blocks are done and
packed, so the CPU peak comes at the end of the block loop."""

from __future__ import annotations

from ..config.schema import RunConfig
from .budget import Phase, StagePlan
from .devices import DTYPE_BYTES, planned_device
from .quantized_bytes import groups_of, packed_model_bytes
from .runtime import add_allocator_margin, add_gpu_context, add_runtime
from .shapes import ModelShape


def plan_quantize(cfg: RunConfig, shape: ModelShape) -> StagePlan:
    q, c = cfg.quantize, cfg.calibration
    dev = planned_device(q.device)
    md = DTYPE_BYTES[cfg.model.dtype]
    phases = [_load(shape, md), _block_loop(cfg, shape, dev, md), _pack(cfg, shape, md)]
    if dev != "cpu":
        phases += _device_side(cfg, shape, dev, md)
    settings = (f"{q.method} INT{q.bits} g{q.group_size}, calibration {c.num_samples} x {c.seq_len} tokens, "
                f"{cfg.model.dtype} model, on {dev}")
    return StagePlan("quantize", shape.source, settings, add_allocator_margin(phases))


def _load(shape: ModelShape, md: int) -> Phase:
    p = add_runtime(Phase("loading the float model"), "quantize")
    p.add(f"float model, {shape.total_params / 1e9:.3g}B parameters", "cpu", shape.total_params * md)
    if shape.gguf:  # transformers maps the file and dequantizes it tensor by tensor, to float32
        p.add("GGUF file, mapped while read", "cpu", shape.weight_file_bytes)
        p.add("largest tensor dequantized to float32", "cpu", shape.vocab * shape.hidden * 4)
    return p


def _results(p: Phase, cfg: RunConfig, shape: ModelShape) -> Phase:
    """Every layer's result, held until all are packed: int32 codes, float32 scales and zeros, and
    the lora.init statistics C [out, groups], R_mean [out, groups], G [groups, groups] (float32)."""
    g = cfg.quantize.group_size
    p.add("GPTQ codes of every layer (int32 until packed)", "cpu", shape.linear_weights * 4)
    p.add("scales and zeros of every layer (float32)", "cpu",
          sum(2 * groups_of(lin, g) * lin.out_features * 4 for lin in shape.linears()))
    if cfg.output.init_stats:
        p.add("lora.init statistics (output.init_stats)", "cpu",
              sum((2 * lin.out_features + groups_of(lin, g)) * groups_of(lin, g) * 4 for lin in shape.linears()))
    return p


def _block_loop(cfg: RunConfig, shape: ModelShape, dev: str, md: int) -> Phase:
    """The last block: every earlier block's result is held, and this block's work on `dev`."""
    p = add_runtime(Phase("end of the block loop"), "quantize")
    p.add("float model", "cpu", shape.total_params * md)
    _results(p, cfg, shape)
    if dev == "cpu":
        _block_work(p, cfg, shape, "cpu", md)
    return p


def _block_work(p: Phase, cfg: RunConfig, shape: ModelShape, dev: str, md: int) -> None:
    """One block's turn on `dev`: the calibration activations going in and coming out, the
    Hessian of the widest input (float32), and GPTQ's float32 copies of the largest layer."""
    c = cfg.calibration
    tokens = c.num_samples * c.seq_len
    p.add(f"calibration activations in and out ({c.num_samples} x {c.seq_len} x {shape.hidden})", dev,
          2 * tokens * shape.hidden * md)
    p.add("rotary position tables per batch", dev, 2 * tokens * shape.head_dim * md)
    widest = shape.largest(lambda lin: lin.in_features).in_features
    # the accumulated H, its damped copy, the Cholesky factor, H^-1 and its factor (quant/gptq.py)
    p.add(f"Hessians of the widest input ({widest} x {widest} float32, 5 copies)", dev, 5 * widest ** 2 * 4)
    largest = shape.largest(lambda lin: lin.weights).weights
    # W, Q, the dequantized W~, its expanded scales and zeros, the codes: 6 float32-sized copies
    p.add("GPTQ work on the largest layer (6 float32 copies)", dev, 6 * largest * 4)


def _pack(cfg: RunConfig, shape: ModelShape, md: int) -> Phase:
    """Packing: each float layer is replaced by its packed form while the codes are still held."""
    p = add_runtime(Phase("packing and saving"), "quantize")
    p.add("float embeddings, norms and head", "cpu", (shape.float_params) * md)
    _results(p, cfg, shape)
    out = DTYPE_BYTES[cfg.output.dtype]
    p.add("packed layers (qweight, qzeros, scales, g_idx)", "cpu",
          packed_model_bytes(shape, cfg.quantize.bits, cfg.quantize.group_size, out))
    return p


def _device_side(cfg: RunConfig, shape: ModelShape, dev: str, md: int) -> list[Phase]:
    """On a GPU: one block's weights and work (and, for calibration.source mix, the whole float
    model while it writes its own calibration text)."""
    p = add_gpu_context(Phase(f"one block on {dev}"), dev)
    block = sum(lin.weights for lin in shape.blocks[0]) + shape.block_other_params // shape.layers
    p.add("one decoder block's float weights", dev, block * md)
    p.add("embeddings and output layer (while the first inputs are captured)", dev, shape.outside_params * md)
    _block_work(p, cfg, shape, dev, md)
    if cfg.calibration.source != "mix":
        return [p]
    c = cfg.calibration
    rows = round(c.num_samples * c.generated_fraction)
    gen = add_gpu_context(Phase(f"calibration text generated on {dev}"), dev)
    gen.add("whole float model", dev, shape.total_params * md)
    gen.add(f"key/value cache of {rows} rows x {c.seq_len} tokens", dev,
            2 * rows * c.seq_len * shape.layers * shape.kv_heads * shape.head_dim * md)
    gen.add("next-token logits", dev, 2 * rows * shape.vocab * 4)
    return [p, gen]
