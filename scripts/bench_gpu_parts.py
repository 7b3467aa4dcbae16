"""The measurements of scripts/bench_gpu.py, each run in a child process of it (one per role:
prepare, kernels, decode:<variant>, train:<variant>), so a crash, an out-of-memory or a poisoned CUDA
context costs one row, not the run, and each training variant's peak memory is its own.
Nothing here is meant to be run directly; see bench_gpu.py for the commands and the figures.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import platform
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from bench_merge import LLAMA2_7B, make_random_checkpoint
from benchlib import error_line


DTYPE = torch.bfloat16   # activations, scales and dense weights; --dtype fp16 for kernels and decode
# --smoke: tiny stand-ins (CPU, Triton interpreter) that take every code path; k/v are as wide
# as q because make_random_checkpoint gives k_proj and v_proj hidden x hidden (Llama-2-7B).
SMOKE_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                   rms_norm_eps=1e-5, tie_word_embeddings=False)
# (K, N) of Llama-2-7B's linears: q/k/v/o, gate/up, down; per decoder layer 4, 2 and 1 of them.
KERNEL_SHAPES = {False: [(4096, 4096), (4096, 11008), (11008, 4096)], True: [(64, 64), (64, 128), (128, 64)]}
KERNEL_ROWS = {False: [1, 8, 512, 4096], True: [1, 8, 16, 32]}


class Skip(Exception):
    """A variant that cannot run here (a peer's library is missing): reported with the reason."""


def one_line(e: BaseException) -> str:
    return error_line(e, 300)


def device(args) -> torch.device:
    return torch.device("cpu" if args.smoke else "cuda")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, dev: torch.device, cpu_reps: int = 3) -> float:
    """Median seconds of fn(). On a GPU triton.testing.do_bench: CUDA events, 25 ms of warm-up,
    100 ms of runs, and the L2 cache flushed before each run, so weights come from HBM as in
    decoding (a 4096 x 4096 INT4 layer is 8 MB and would otherwise sit in H100's 50 MB L2)."""
    fn()  # untimed: the first call compiles and autotunes
    if dev.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    times = []
    for _ in range(cpu_reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def versions() -> dict:
    out = {}
    for pkg in ("torch", "triton", "transformers", "peft", "accelerate", "bitsandbytes", "gptqmodel"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# ----------------------------------------------------------------------------- models

def checkpoint_path(args) -> Path:
    """The INT4 g32 GPTQ checkpoint: --checkpoint, or a random one of Llama-2-7B's shape with
    --layers blocks, made once and kept in --work (bench_merge.py's maker; no GPTQ run)."""
    if args.checkpoint:
        return Path(args.checkpoint)
    if args.smoke:
        name = "tiny-int4-random"
    else:  # 32 layers: the same folder (same seed, same files) bench_merge.py makes
        name = "llama2-7b-int4-random" + ("" if args.layers == 32 else f"-L{args.layers}")
    path = Path(args.work) / name
    if not (path.with_name(path.name + "-adapter") / "adapter_config.json").is_file():  # written last
        shape = dict(SMOKE_MODEL if args.smoke else LLAMA2_7B, num_hidden_layers=args.layers)
        make_random_checkpoint(path, shape, bits=4, group=32)
    return path


def dense_config(ckpt: Path):
    """The checkpoint's model config without its quantization: the bf16 model of the same shape."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(ckpt)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    return cfg


def random_dense(cfg, dev: torch.device):
    """A bf16 model with random weights, initialized on the device (seconds for 7B on a GPU)."""
    from transformers import AutoModelForCausalLM

    with torch.device(dev):
        return AutoModelForCausalLM.from_config(cfg, dtype=DTYPE).eval()


def bf16_folder(args, ckpt: Path, dev: torch.device) -> Path:
    """A saved bf16 copy of the shape: bitsandbytes quantizes inside from_pretrained, so QLoRA
    needs a folder (13.5 GB for 7B, made only for it). Kept in --work."""
    out = Path(args.work) / f"{ckpt.name}-bf16"
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + ".partial")  # renamed when complete: an interrupted write is redone
        shutil.rmtree(tmp, ignore_errors=True)
        model = random_dense(dense_config(ckpt), dev)
        model.save_pretrained(tmp)
        del model
        tmp.rename(out)
    return out


def use_kernel(model, name: str, need_grad: bool) -> str:
    """Every TorchQuantLinear's kernel through kernels.registry -> its summary. The gptqmodel
    peer raises Skip when its library is missing or its backend refuses a layer."""
    from qalora_cli.errors import UserError
    from qalora_cli.kernels.registry import use_backend

    if name == "gptqmodel" and importlib.util.find_spec("gptqmodel") is None:
        raise Skip("gptqmodel is not installed")
    try:
        return use_backend(model, name, DTYPE, need_grad).summary()
    except UserError as e:
        if name == "gptqmodel":
            raise Skip(f"the gptqmodel backend refuses: {e}") from e
        raise


def random_quant_linear(k: int, n: int, bits: int, zero_kind: str, dev: torch.device):
    """A TorchQuantLinear [k -> n], g32, random contents made on the device (any bit pattern is
    a valid set of codes and packed zero points; speed does not depend on the values)."""
    from qalora_cli.kernels.torch_quant_linear import TorchQuantLinear

    with torch.device(dev):
        m = TorchQuantLinear(k, n, bits, 32, False, zero_kind, DTYPE)
        m.qweight.copy_(torch.randint(-2**31, 2**31 - 1, m.qweight.shape, dtype=torch.int32))
        if zero_kind == "int":
            m.qzeros.copy_(torch.randint(-2**31, 2**31 - 1, m.qzeros.shape, dtype=torch.int32))
        else:
            m.zeros.copy_(torch.rand(m.zeros.shape) * 2**bits)
        m.scales.copy_(torch.rand(m.scales.shape) * 0.009 + 0.001)
        m.g_idx.copy_(torch.arange(k, dtype=torch.int32) // 32)
    return m


def quant_bytes(m) -> int:
    """What a fused kernel must read of a layer: packed codes, scales, zero points (and bias)."""
    zeros = m.zeros if m.zero_kind == "float" else m.qzeros
    return sum(t.nbytes for t in (m.qweight, m.scales, zeros)) + (m.bias.nbytes if m.bias is not None else 0)


def bandwidth(n: int, dev: torch.device) -> float:
    """Bytes/s of a device-to-device copy of n bytes, far larger than L2: read + written / time."""
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    return 2 * n / seconds(lambda: b.copy_(a), dev)


def matmul_rate(k: int, dev: torch.device) -> float:
    """FLOP/s of a dense bf16 k^3 matmul (the training floor's numerator): a square size cuBLAS
    runs near its peak."""
    x, y = torch.randn(k, k, dtype=torch.bfloat16, device=dev), torch.randn(k, k, dtype=torch.bfloat16, device=dev)
    return 2 * k**3 / seconds(lambda: x @ y, dev)


def role_prepare(args) -> dict:
    """Device, versions, memory bandwidth, bf16 matmul rate, and the model folders."""
    if not args.smoke and not torch.cuda.is_available():
        return {"fatal": "torch sees no CUDA GPU; --smoke runs every part on the CPU (figures meaningless)"}
    dev = device(args)
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
           f"CPU {platform.machine()} (smoke)", "versions": versions(), "cuda": torch.version.cuda}
    n, k = (64 << 20, 256) if args.smoke else (2 << 30, 8192)
    res["copy_bytes"], res["bandwidth_gbs"] = n, bandwidth(n, dev) / 1e9
    res["matmul_n"], res["matmul_tflops"] = k, matmul_rate(k, dev) / 1e12
    if {"decode", "train"} & set(args.parts):
        t = time.perf_counter()
        ckpt = checkpoint_path(args)
        res["checkpoint"], res["checkpoint_s"] = str(ckpt), time.perf_counter() - t
        cfg = dense_config(ckpt)
        res["layers"], res["hidden"], res["intermediate"] = (cfg.num_hidden_layers, cfg.hidden_size,
                                                             cfg.intermediate_size)
        if "train" in args.parts and "qlora-nf4" in args.train_variants and \
                all(importlib.util.find_spec(m) for m in ("peft", "bitsandbytes")):
            t = time.perf_counter()
            res["bf16_dir"], res["bf16_dir_s"] = str(bf16_folder(args, ckpt, dev)), time.perf_counter() - t
    return res


def role_kernels(args, prep: dict) -> dict:
    """Per layer shape, kind and row count: Triton forward and input gradient, the torch path
    (dequantize then matmul, nothing cached), dense bf16 (cuBLAS, the roofline), gptqmodel."""
    from qalora_cli.kernels import triton_quant_matmul as T
    from qalora_cli.kernels.triton_backend import kernel_args

    dev, bw = device(args), prep["bandwidth_gbs"] * 1e9
    shapes = KERNEL_SHAPES[args.smoke]
    chosen = {"int4": [(k, n, 4, "int") for k, n in shapes], "int4-float": [(*shapes[0], 4, "float")],
              "int3": [(*shapes[0], 3, "int")], "int2": [(*shapes[0], 2, "int")]}
    configs = [c for name in args.kernel_configs for c in chosen[name]]
    rows = []
    for k, n, bits, zero_kind in configs:
        print(f"[kernels] {k}x{n} int{bits} {zero_kind} zeros", file=sys.stderr, flush=True)
        layer = random_quant_linear(k, n, bits, zero_kind, dev)
        layer.set_backend("torch", None)   # the reference path, and no cached weight
        qargs, qbytes = kernel_args(layer), quant_bytes(layer)
        w = torch.randn(n, k, dtype=DTYPE, device=dev) * 0.02   # dense, nn.Linear's [out, in]
        mine = []
        for m in KERNEL_ROWS[args.smoke]:
            x, dy = torch.randn(m, k, dtype=DTYPE, device=dev), torch.randn(m, n, dtype=DTYPE, device=dev)
            row = dict(K=k, N=n, bits=bits, zeros=zero_kind, M=m, quant_bytes=qbytes, dense_bytes=w.nbytes)
            with torch.no_grad():
                ref, y = layer(x).float(), T.quant_matmul(x, *qargs).float()
                row["rel_err"] = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                row["triton_fwd_s"] = seconds(lambda: T.quant_matmul(x, *qargs), dev)
                row["triton_dx_s"] = seconds(lambda: T.quant_matmul_t(dy, *qargs), dev)
                row["torch_fwd_s"] = seconds(lambda: layer(x), dev)
                # what _DequantMatmul.backward runs: rebuild W~, multiply by its transpose
                row["torch_dx_s"] = seconds(lambda: torch.matmul(dy, layer._weight_in_out(DTYPE).t()), dev)
                row["dense_fwd_s"] = seconds(lambda: torch.nn.functional.linear(x, w), dev)
                row["dense_dx_s"] = seconds(lambda: torch.matmul(dy, w), dev)
            mine.append(row)
        peer(layer, mine, dev)
        rows += mine
    for row in rows:  # achieved bandwidth: the bytes a kernel must read / its time (M=1: all of it)
        for kind in ("triton", "torch", "gptqmodel", "dense"):
            if row.get(f"{kind}_fwd_s"):
                b = row["dense_bytes" if kind == "dense" else "quant_bytes"]
                row[f"{kind}_fwd_gbs"] = b / row[f"{kind}_fwd_s"] / 1e9
                row[f"{kind}_fwd_pct_bw"] = 100 * b / row[f"{kind}_fwd_s"] / bw
    return {"rows": rows}


def peer(layer, rows: list, dev: torch.device) -> None:
    """gptqmodel's kernel on the same layer, last (its backend may repack the tensors)."""
    try:
        use_kernel(torch.nn.Sequential(layer), "gptqmodel", need_grad=False)
        for row in rows:
            x = torch.randn(row["M"], row["K"], dtype=DTYPE, device=dev)
            with torch.no_grad():
                row["gptqmodel_fwd_s"] = seconds(lambda: layer(x), dev)
            if layer._backend.support.trainable_input:   # backward alone, through autograd
                xg, dy = x.clone().requires_grad_(True), torch.randn(row["M"], row["N"], dtype=DTYPE, device=dev)
                y = layer(xg)
                row["gptqmodel_dx_s"] = seconds(lambda: torch.autograd.grad(y, xg, dy, retain_graph=True), dev)
    except Skip as e:
        for row in rows:
            row["gptqmodel_note"] = f"skipped: {e}"
    except Exception as e:
        traceback.print_exc()
        for row in rows:
            row["gptqmodel_note"] = f"failed: {one_line(e)}"
    finally:
        for row in rows:
            row["gptqmodel_kernel"] = peer_kernels(layer)
        layer.set_backend("torch", None)


def peer_kernels(model) -> str:
    """The GPTQModel classes the gptqmodel backend chose (exllama v2, Marlin, Triton v2, torch):
    read from its per-layer cache, best effort."""
    names = set()
    for m in model.modules():
        cached = getattr(m, "_gptqmodel_linear", None)
        if isinstance(cached, tuple) and len(cached) == 2 and isinstance(cached[1], dict):
            names |= {f"{type(k).__name__}{' (grad)' if role else ''}" for role, k in cached[1].items()}
    return ", ".join(sorted(names))


def run_role(args) -> dict:
    global DTYPE
    if args.role in ("kernels", "decode") and args.dtype == "fp16":
        DTYPE = torch.float16   # e.g. for gptqmodel's exllama v2 kernel; training stays bf16
    if args.role == "prepare":
        return role_prepare(args)
    prep = json.loads((Path(args.run) / "prepare.json").read_text())
    if args.role == "kernels":
        return role_kernels(args, prep)
    if args.role.startswith("decode:"):
        from bench_gpu_decode import role_decode

        return role_decode(args, prep, args.role.split(":", 1)[1])
    from bench_gpu_train import role_train

    return role_train(args, prep, args.role.split(":", 1)[1])
