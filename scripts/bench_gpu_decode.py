"""The decoding part of the GPU benchmark (scripts/bench_gpu.py --parts decode): greedy
generation at batch 1 and 8, dense bf16 against the INT4 checkpoint (GPTQ zeros, merged float
zeros, GPTQModel's kernels), through HF generate and as a replayed CUDA graph (`-graph`), and
the bandwidth floor."""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path

import torch

import bench_gpu_parts as P  # P.DTYPE is read when used: --dtype may have set it
from bench_gpu_parts import Skip, dense_config, device, peer_kernels, quant_bytes, random_dense, sync, use_kernel


def to_float_zeros(model) -> None:
    """GPTQ integer zeros -> the merged format's float32 zeros, in place (what `qalora merge`
    writes, without writing it): same codes, same scales, float zero points."""
    from qalora_cli.kernels.torch_quant_linear import TorchQuantLinear
    from qalora_cli.quant.gptq_format import decode_qzeros

    for name, m in list(model.named_modules()):
        if isinstance(m, TorchQuantLinear) and m.zero_kind == "int":
            with torch.device("meta"):  # every buffer is replaced below: allocate nothing
                new = TorchQuantLinear(m.in_features, m.out_features, m.bits, m.group_size, m.bias is not None,
                                       "float", m.scales.dtype)
            new.qweight, new.scales, new.g_idx = m.qweight, m.scales, m.g_idx
            new.zeros = decode_qzeros(m.qzeros, m.bits, m.out_features).float()
            if m.bias is not None:
                new.bias = m.bias
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)


# ----------------------------------------------------------------------------- roles

def bytes_per_step(model, batch: int, context: float) -> float:
    """Bytes one decoding step must read from memory: every quantized layer's codes, scales and
    zeros (or every dense weight), lm_head in full, the norms, one embedding row per sequence,
    and each sequence's KV cache at the mean context length."""
    from qalora_cli.kernels.torch_quant_linear import TorchQuantLinear

    emb, total = model.get_input_embeddings(), 0
    for m in model.modules():
        if isinstance(m, TorchQuantLinear):
            total += quant_bytes(m)
        elif m is emb:
            total += batch * emb.weight[0].nbytes
        else:
            total += sum(p.nbytes for p in m.parameters(recurse=False))
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * context * torch.finfo(P.DTYPE).bits // 8
    return total + batch * kv


def generation_speed(model, args, batch: int, bandwidth: float) -> dict:
    """Greedy HF generate with its KV cache, prompt_len random tokens, new_tokens forced by
    min_new_tokens. Decoding rate = (new_tokens - 1) steps / (time for new_tokens - time for 1),
    so the prefill is not counted; end-to-end counts it."""
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len), generator=g).to(dev)

    def run(new: int) -> float:
        sync(dev)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
        sync(dev)
        assert out.shape[1] == args.prompt_len + new, out.shape
        return time.perf_counter() - t

    run(2)   # warm-up: autotunes the prefill and decoding shapes, allocates
    full = statistics.median(run(args.new_tokens) for _ in range(args.reps))
    prefill = statistics.median(run(1) for _ in range(args.reps))
    step = (full - prefill) / (args.new_tokens - 1)
    nbytes = bytes_per_step(model, batch, args.prompt_len + args.new_tokens / 2)
    floor = batch * bandwidth * 1e9 / nbytes
    return {"decode_tokens_per_s": batch / step, "e2e_tokens_per_s": batch * args.new_tokens / full,
            "ms_per_step": 1e3 * step, "prefill_s": prefill, "generate_s": full, "bytes_per_step": nbytes,
            "floor_tokens_per_s": floor, "pct_floor": 100 * batch / step / floor}


def rewind(cache, pos: torch.Tensor, length: int) -> None:
    """Back to `length` cached tokens, in place (the graph holds these tensors' addresses).
    Recent transformers' static layers count their own write position (`cumulative_length`)
    instead of reading cache_position, so both are set; left alone, the repetitions write past
    the cache's end (a device-side index assert on an H200, 2026-11-30)."""
    pos.fill_(length)
    for layer in getattr(cache, "layers", []):
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            layer.cumulative_length.fill_(length)


def graph_speed(model, args, batch: int, bandwidth: float) -> dict:
    """Greedy decoding without Python in the loop: a static KV cache, one decoding step (forward,
    argmax, position + 1) captured once as a CUDA graph and replayed new_tokens - 1 times. What
    the GPU alone can do, apart from eager PyTorch's per-op launch cost that bounds `generate`.
    On the CPU (--smoke) the same step runs eagerly."""
    from transformers import StaticCache

    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len), generator=g).to(dev)
    cache = StaticCache(config=model.config, max_cache_len=args.prompt_len + args.new_tokens + 8)
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True,
                       cache_position=torch.arange(args.prompt_len, device=dev)).logits
    token = logits[:, -1:].argmax(-1)
    pos = torch.tensor([args.prompt_len], device=dev)

    def step():
        with torch.no_grad():
            out = model(input_ids=token, past_key_values=cache, cache_position=pos, use_cache=True).logits
        token.copy_(out[:, -1:].argmax(-1))
        pos.add_(1)

    steps = args.new_tokens - 1
    if dev.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # autotunes the M = batch kernels, outside the capture
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
        steps -= 4   # the warm-up and captured steps used cache slots too
    else:
        run = step
    times = []
    for _ in range(args.reps):
        rewind(cache, pos, args.prompt_len)   # rewrite the same slots: same work every repetition
        sync(dev)
        t = time.perf_counter()
        for _ in range(steps):
            run()
        sync(dev)
        times.append((time.perf_counter() - t) / steps)
    step_s = statistics.median(times)
    nbytes = bytes_per_step(model, batch, args.prompt_len + args.new_tokens / 2)
    floor = batch * bandwidth * 1e9 / nbytes
    return {"decode_tokens_per_s": batch / step_s, "e2e_tokens_per_s": None, "ms_per_step": 1e3 * step_s,
            "bytes_per_step": nbytes, "floor_tokens_per_s": floor, "pct_floor": 100 * batch / step_s / floor}


def role_decode(args, prep: dict, variant: str) -> dict:
    """One variant, in its own process: a device-side assert or an out-of-memory poisons the
    CUDA context, and must cost that variant's rows only."""
    from qalora_cli.models.quantized_io import load_quantized

    dev, ckpt = device(args), Path(prep["checkpoint"])
    if variant in ("dense", "dense-graph"):
        model, kernels = random_dense(dense_config(ckpt), dev), f"dense {str(P.DTYPE)[6:]} (torch.matmul)"
    else:
        if variant == "int4-gptqmodel" and importlib.util.find_spec("gptqmodel") is None:
            raise Skip("gptqmodel is not installed")   # before loading 4 GB for nothing
        model, _ = load_quantized(ckpt, dev, P.DTYPE)
        if variant in ("int4-merged", "int4-merged-graph"):
            to_float_zeros(model)
        kernels = use_kernel(model, "gptqmodel" if variant == "int4-gptqmodel" else "triton", False)
    speed = graph_speed if variant.endswith("-graph") else generation_speed
    out = {"kernels": kernels, "batches": {str(b): speed(model, args, b, prep["bandwidth_gbs"]) for b in args.batches}}
    if variant == "int4-gptqmodel":
        out["kernels"] += f"; GPTQModel modules: {peer_kernels(model)}"
    return out
