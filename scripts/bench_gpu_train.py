"""The training part of the GPU benchmark (scripts/bench_gpu.py --parts train): one variant per
child process, QA-LoRA (our kernels) vs QLoRA (bitsandbytes NF4 + PEFT) vs LoRA on bf16."""

from __future__ import annotations

import gc
import importlib.util
import resource
import time
from pathlib import Path

import torch

import bench_gpu_parts as P  # P.DTYPE is read when used: --dtype may have set it
from bench_gpu_parts import Skip, dense_config, device, random_dense, sync, use_kernel
from bench_train_cpu import TARGETS, flops_per_token, make_batch  # noqa: F401


def build_trainable(args, prep: dict, variant: str, dev: torch.device):
    """-> (causal LM with rank-64 alpha-16 adapters on q/k/v/o/gate/up/down, only they trainable;
    what computes the frozen linears)."""
    if variant == "qalora":
        from qalora_cli.config.schema import LoraSection
        from qalora_cli.lora.inject import inject_qalora
        from qalora_cli.models.quantized_io import load_quantized

        model, _ = load_quantized(prep["checkpoint"], dev, P.DTYPE)   # as `qalora finetune` under bf16
        inject_qalora(model, LoraSection(rank=64, alpha=16, dropout=0.05, targets=TARGETS))
        return model, use_kernel(model, "triton", need_grad=True)
    if importlib.util.find_spec("peft") is None:
        raise Skip("peft is not installed")
    if variant == "qlora-nf4" and importlib.util.find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes is not installed")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if variant == "lora-bf16":   # the same shape made on the device: no folder to write or read
        model, kernels = random_dense(dense_config(Path(prep["checkpoint"])), dev), "dense bf16"
    else:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=P.DTYPE,
                                 bnb_4bit_use_double_quant=True)
        # No prepare_model_for_kbit_training: it would cast norms and embeddings to fp32, unlike
        # the other two variants (as in bench_train_cpu.py).
        model = AutoModelForCausalLM.from_pretrained(prep["bf16_dir"], quantization_config=bnb, dtype=P.DTYPE,
                                                     device_map={"": dev.index or 0} if dev.type == "cuda" else
                                                     {"": "cpu"})
        kernels = "bitsandbytes NF4 double-quant, bf16 compute"
    lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, lora).base_model.model, kernels


def role_train(args, prep: dict, variant: str) -> dict:
    from qalora_cli.train.loss import ResponseLoss

    dev = device(args)
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    model, kernels = build_trainable(args, prep, variant, dev)
    load_s = time.perf_counter() - t
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn, opt = ResponseLoss(model), torch.optim.AdamW(params, lr=2e-4)
    ids, mask, labels = (x.to(dev) for x in make_batch(args, model.config.vocab_size))  # same in every child
    denominator = float((labels[:, 1:] != -100).sum())

    def step() -> torch.Tensor:
        with torch.autocast(dev.type, dtype=P.DTYPE):   # as the project's loop (accelerate bf16)
            loss = loss_fn(ids, mask, labels, denominator)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    gc.collect()
    cuda = dev.type == "cuda"
    if cuda:   # loading has transients of its own: the steps' peak is measured from here
        sync(dev)
        load_peak = torch.cuda.max_memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    first = [float(step()) for _ in range(args.warmup)]
    sync(dev)
    t0 = time.perf_counter()
    losses = [step() for _ in range(args.steps)]   # no .item() per step: it would stall the queue
    sync(dev)
    secs = time.perf_counter() - t0
    losses = [float(x) for x in losses]
    mib = 2.0**20
    mem = {"train_peak_mib": torch.cuda.max_memory_allocated(dev) / mib, "load_peak_mib": load_peak / mib,
           "memory": "torch.cuda.max_memory_allocated"} if cuda else \
        {"train_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "load_peak_mib": None,
         "memory": "ru_maxrss of the process (CPU smoke run)"}
    trainable = sum(p.numel() for p in params)
    return {"kernels": kernels, "tokens_per_s": args.steps * ids.numel() / secs, "ms_per_step": 1e3 * secs / args.steps,
            "load_s": load_s, **mem, "loss_first": (first or losses)[0], "loss_last": losses[-1],
            "trainable_params": trainable, "flops_per_token": flops_per_token(model, args.seq_len, trainable)}


