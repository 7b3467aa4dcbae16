"""The memory of `qalora quantize` (recipes/quantize.py, quant/sequential.py, quant/gptq.py).

The float model is loaded on the CPU; each block visits the quantize device for its turn and,
once done, is packed into the model (its float weights go). So the CPU holds the float model
at the first block, and at the last the float parts, the packed blocks and the `lora.init`
statistics gathered on the way; with calibration.source mix, the model first writes text with
every generated row's key/value cache at once. The peak is the largest of these.
"""

from __future__ import annotations

from ..config.schema import RunConfig
from ..data.calibration import GENERATION_ROWS
from .budget import Phase, StagePlan
from .devices import DTYPE_BYTES, planned_device
from .float_model import add_float_model
from .quantized_bytes import groups_of, packed_model_bytes
from .runtime import add_allocator_margin, add_gpu_context, add_runtime
from .shapes import ModelShape


def plan_quantize(cfg: RunConfig, shape: ModelShape) -> StagePlan:
    q, c = cfg.quantize, cfg.calibration
    dev = planned_device(q.device)
    md = DTYPE_BYTES[cfg.model.dtype]
    phases = [_load(shape, md), *_block_loop(cfg, shape, dev, md), _save(cfg, shape, md)]
    if dev != "cpu":
        phases += _device_side(cfg, shape, dev, md)
    elif cfg.calibration.source == "mix":
        gen = add_runtime(Phase("calibration text generated on cpu"), "quantize")
        gen.add("float model", "cpu", shape.total_params * md)
        phases.append(_generation(gen, cfg, shape, "cpu", md))
    settings = (f"{q.method} INT{q.bits} g{q.group_size}, calibration {c.num_samples} x {c.seq_len} tokens, "
                f"{cfg.model.dtype} model, on {dev}")
    return StagePlan("quantize", shape.source, settings, add_allocator_margin(phases))


def _load(shape: ModelShape, md: int) -> Phase:
    return add_float_model(add_runtime(Phase("loading the float model"), "quantize"), shape, md)


def _stats(p: Phase, cfg: RunConfig, shape: ModelShape) -> Phase:
    """The lora.init statistics of every layer, gathered block by block and held to the end:
    C [out, groups], R_mean [out, groups], G [groups, groups] (float32)."""
    g = cfg.quantize.group_size
    if cfg.output.init_stats:
        p.add("lora.init statistics (output.init_stats)", "cpu",
              sum((2 * lin.out_features + groups_of(lin, g)) * groups_of(lin, g) * 4 for lin in shape.linears()))
    return p


def _packed(p: Phase, cfg: RunConfig, shape: ModelShape) -> Phase:
    out = DTYPE_BYTES[cfg.output.dtype]
    p.add("packed layers (qweight, qzeros, scales, g_idx)", "cpu",
          packed_model_bytes(shape, cfg.quantize.bits, cfg.quantize.group_size, out))
    return p


def _block_loop(cfg: RunConfig, shape: ModelShape, dev: str, md: int) -> list[Phase]:
    """The first block (the whole float model) and the last (every other block packed, the
    statistics of all), each with the block's work when it runs on the CPU."""
    first = add_runtime(Phase("first block"), "quantize")
    first.add("float model", "cpu", shape.total_params * md)
    last = add_runtime(Phase("last block"), "quantize")
    last.add("float embeddings, norms and head", "cpu", shape.float_params * md)
    last.add("the last block's float layers", "cpu", sum(lin.weights for lin in shape.blocks[-1]) * md)
    _stats(_packed(last, cfg, shape), cfg, shape)
    if dev == "cpu":
        for p in (first, last):
            _block_work(p, cfg, shape, "cpu", md)
    return [first, last]


def _block_work(p: Phase, cfg: RunConfig, shape: ModelShape, dev: str, md: int) -> None:
    """One block's turn on `dev`: the calibration activations going in and coming out, the
    Hessian of the widest input (float32), and GPTQ's float32 copies of the largest layer."""
    c = cfg.calibration
    tokens = c.num_samples * c.seq_len
    p.add(f"calibration activations in and out ({c.num_samples} x {c.seq_len} x {shape.hidden})", dev,
          2 * tokens * shape.hidden * md)
    p.add("rotary position tables per batch", dev, 2 * tokens * shape.head_dim * md)
    widest = _widest_in(shape)
    block_weights = sum(lin.weights for lin in shape.blocks[0]) * md
    target = shape.largest(lambda lin: lin.weights).weights * 4
    corrected = cfg.output.init_stats and cfg.output.init_stats_inputs == "corrected"
    if cfg.quantize.target == "float" or corrected:  # quant/asymmetric.py: the float block's copy and its stream
        p.add("the float model's activations and a float copy of the block (target float, corrected statistics)",
              dev, tokens * shape.hidden * md + block_weights)
        p.add(f"cross products C ({widest} squared, float32, and the target weight)", dev, widest ** 2 * 4 + target)
    if corrected:  # quant/sequential.py: the third stream, the model as lora.init corrects it
        p.add("lora.init statistics on the corrected model: its activations, its copy of the block, its H and C",
              dev, tokens * shape.hidden * md + block_weights + 2 * widest ** 2 * 4 + target)
    # quant/group_stats.py: one batch's inputs of a group's layers, on every stream at once
    streams = 1 + (cfg.quantize.target == "float" or corrected) + corrected
    p.add(f"one batch's layer inputs on {streams} stream(s) ({cfg.quantize.batch_size} x {c.seq_len} x {widest})",
          dev, streams * min(cfg.quantize.batch_size, c.num_samples) * c.seq_len * widest * md)
    # the accumulated H, its damped copy, the Cholesky factor, H^-1 and its factor (quant/gptq.py)
    p.add(f"Hessians of the widest input ({widest} x {widest} float32, 5 copies)", dev, 5 * widest ** 2 * 4)
    largest = shape.largest(lambda lin: lin.weights).weights
    # W, Q, the dequantized W~, its expanded scales and zeros, the codes: 6 float32-sized copies
    p.add("GPTQ work on the largest layer (6 float32 copies)", dev, 6 * largest * 4)


def _widest_in(shape: ModelShape) -> int:
    return shape.largest(lambda lin: lin.in_features).in_features


def _save(cfg: RunConfig, shape: ModelShape, md: int) -> Phase:
    p = add_runtime(Phase("saving"), "quantize")
    p.add("float embeddings, norms and head", "cpu", shape.float_params * md)
    return _stats(_packed(p, cfg, shape), cfg, shape)


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
    gen = add_gpu_context(Phase(f"calibration text generated on {dev}"), dev)
    gen.add("whole float model", dev, shape.total_params * md)
    return [p, _generation(gen, cfg, shape, dev, md)]


def _generation(p: Phase, cfg: RunConfig, shape: ModelShape, dev: str, md: int) -> Phase:
    """calibration.source mix: the model writes its share of the samples, all rows at once
    (data/calibration.py): the key/value cache of every row and the last logits."""
    c = cfg.calibration
    rows = min(GENERATION_ROWS, round(c.num_samples * c.generated_fraction))
    p.add(f"key/value cache of {rows} rows x {c.seq_len} tokens", dev,
          2 * rows * c.seq_len * shape.layers * shape.kv_heads * shape.head_dim * md)
    # the logits and the sampler's float32 copies of them (softmax, sorted, cumulative sum)
    p.add("next-token logits and top-p sampling", dev, 4 * rows * shape.vocab * 4)
    return p
