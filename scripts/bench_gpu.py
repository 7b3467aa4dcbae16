"""GPU benchmark for the issue "CUDA speed": the Triton kernels, decoding and QA-LoRA training
on Llama-2-7B shapes (random weights: speed does not depend on the values), against the
dense bf16 reference and the peers (gptqmodel kernels, QLoRA with bitsandbytes) where their
libraries are installed; a missing one is skipped with its reason, never a crash.

    .venv/bin/python scripts/bench_gpu.py                       # every part, out/bench/gpu.json + .md
    .venv/bin/python scripts/bench_gpu.py --parts kernels --output out/bench/gpu-kernels.json
    .venv/bin/python scripts/bench_gpu.py --parts decode --layers 8 --output out/bench/gpu-decode.json
    .venv/bin/python scripts/bench_gpu.py --parts train --output out/bench/gpu-train.json
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_gpu.py --smoke  # CPU, Triton interpreter, tiny shapes

On a lent GPU with little time, scripts/bench_gpu_device.sh runs the parts one by one, each under
its own time limit, with the wheels the machine lacks. The random INT4 checkpoint
(and for QLoRA a bf16 copy, which bitsandbytes quantizes while loading; 13.5 GB at 32 layers)
is made once in --work (default out/bench) and reused; the dense models are made on the GPU.

kernels  Llama-2-7B's linear shapes, INT4 g32 with integer (GPTQ) zeros, and on 4096x4096 float
         (merged) zeros, INT3 and INT2; M = 1, 8, 512, 4096 rows. Triton `quant_matmul` (forward)
         and `quant_matmul_t` (input gradient) vs dequantize-then-matmul (TorchQuantLinear's
         torch path, no cached weight) vs dense bf16 torch.matmul (the roofline) vs gptqmodel.
         Median of triton.testing.do_bench (L2 flushed before each run). GB/s = (packed codes +
         scales + zeros bytes, or the dense weight's) / time; % BW against the measured copy
         bandwidth (2 GiB device-to-device copy, bytes read + written / time). err = max |triton
         - torch path| / max |torch path| of the forward.
decode   `dense`: a bf16 HF LlamaForCausalLM, vs the INT4 checkpoint through load_quantized and
         the Triton backend, with its GPTQ integer zeros (`int4-gptq`) and converted to merged
         float zeros (`int4-merged`), and with gptqmodel's kernels (`int4-gptqmodel`; its exllama
         v2 kernel may want --dtype fp16): greedy generate, batch 1 and 8, 32-token prompt, 128
         new tokens (min_new_tokens). `dense-graph`, `int4-gptq-graph`, `int4-merged-graph`: the
         same models with a static KV cache, one greedy step captured as a CUDA graph and replayed
         (no Python or eager launch cost per step), the graph ones compared with dense-graph.
         Decode tok/s excludes the prefill (time(128) - time(1)); the floor is bandwidth / bytes
         read per step (see bench_gpu_parts.bytes_per_step). Targets: INT4 >= 2.5x bf16 at batch
         1, >= 70% of the floor.
train    QA-LoRA (INT4 g32, Triton) vs QLoRA (bitsandbytes NF4 double-quant + PEFT) vs PEFT LoRA
         on bf16: rank 64, alpha 16, dropout 0.05 on q/k/v/o/gate/up/down, micro-batch 4 x 512
         of the same random tokens, bf16 autocast, AdamW, no gradient checkpointing, ResponseLoss;
         each in its own process, peak = torch.cuda.max_memory_allocated over the steps. The floor:
         bf16 matmul rate (8192^3) / FLOPs per token (4 x frozen linear params + 6 x trainable +
         attention; bench_train_cpu.flops_per_token). Target: QA-LoRA >= 1.3x QLoRA tokens/s at
         no more peak memory.

Every part runs in a child process (bench_gpu_parts.py); --smoke proves the code paths only,
its figures are meaningless.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:   # read when the kernels are defined: before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("kernels", "decode", "train")
DECODE_VARIANTS = ("dense", "int4-gptq", "int4-merged", "int4-gptqmodel", "dense-graph", "int4-gptq-graph",
                   "int4-merged-graph")
TRAIN_VARIANTS = ("qalora", "qlora-nf4", "lora-bf16")
KERNEL_CONFIGS = ("int4", "int4-float", "int3", "int2")   # int4: the three layer shapes; the rest 4096x4096
# (full run, --smoke) defaults of the size options
SIZES = {"layers": (32, 2), "prompt_len": (32, 8), "new_tokens": (128, 4), "reps": (3, 1), "micro_batch": (4, 2),
         "seq_len": (512, 16), "warmup": (3, 1), "steps": (10, 2)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ", ".join(PARTS))
    p.add_argument("--output", type=Path, help="JSON results (default out/bench/gpu.json, gpu-smoke.json); "
                                               "the markdown table goes beside it (.md)")
    p.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes: code paths only")
    p.add_argument("--work", type=Path, help="where the random checkpoints are kept (default out/bench)")
    p.add_argument("--checkpoint", type=Path, help="an INT4 GPTQ checkpoint instead of the random one")
    p.add_argument("--batches", default="1,8", help="decoding batch sizes")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16",
                   help="activations and scales of the kernels and decode parts (training is bf16 autocast)")
    p.add_argument("--decode-variants", default=",".join(DECODE_VARIANTS))
    p.add_argument("--train-variants", default=",".join(TRAIN_VARIANTS))
    p.add_argument("--kernel-configs", default=",".join(KERNEL_CONFIGS),
                   help="which kernels rows (each one compiles its own Triton kernels: minutes on a cold cache)")
    for k, (full, _) in SIZES.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=int, help=f"default {full}" + (
            " (decoder layers of the random Llama-2-7B)" if k == "layers" else ""))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--role", help=argparse.SUPPRESS)   # child: prepare, kernels, decode:<variant>, train:<variant>
    p.add_argument("--run", help=argparse.SUPPRESS)    # child: the folder of the children's results
    a = p.parse_args(argv)
    for k, sizes in SIZES.items():
        if getattr(a, k) is None:
            setattr(a, k, sizes[a.smoke])
    a.parts = [x for x in a.parts.split(",") if x]
    a.batches = [int(x) for x in a.batches.split(",") if x]
    a.decode_variants = [x for x in a.decode_variants.split(",") if x]
    a.train_variants = [x for x in a.train_variants.split(",") if x]
    a.kernel_configs = [x for x in a.kernel_configs.split(",") if x]
    if (set(a.parts) - set(PARTS) or set(a.decode_variants) - set(DECODE_VARIANTS)
            or set(a.kernel_configs) - set(KERNEL_CONFIGS)
            or set(a.train_variants) - set(TRAIN_VARIANTS) or a.new_tokens < 2 or a.steps < 1):
        p.error(f"--parts from {PARTS}, --decode-variants from {DECODE_VARIANTS}, --train-variants from "
                f"{TRAIN_VARIANTS}, --kernel-configs from {KERNEL_CONFIGS}; --new-tokens >= 2; --steps >= 1")
    a.output = a.output or ROOT / "out/bench" / ("gpu-smoke.json" if a.smoke else "gpu.json")
    return a


def spawn(args, role: str, run: Path, work: Path) -> dict:
    """One child; its progress goes to our stderr -> its result, or {"error": ...}."""
    out = run / f"{role.replace(':', '-')}.json"
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--role", role, "--run", str(run),
           "--work", str(work)]
    print(f"[{role}] running ...", file=sys.stderr, flush=True)
    t = datetime.datetime.now()
    proc = subprocess.run(cmd, stdout=sys.stderr)   # our stdout is for the tables only
    wall = (datetime.datetime.now() - t).total_seconds()
    print(f"[{role}] done in {wall:.0f} s", file=sys.stderr, flush=True)
    if out.is_file():
        return {**json.loads(out.read_text()), "wall_s": wall}
    return {"error": f"the child exited with {proc.returncode} and no result (its stderr is above)", "wall_s": wall}


def child(args) -> int:
    """Run one role; write its result, or the reason it was skipped or failed."""
    import bench_gpu_parts as parts

    try:
        res = parts.run_role(args)
    except parts.Skip as e:
        res = {"skipped": str(e)}
    except Exception as e:
        traceback.print_exc()
        res = {"error": parts.one_line(e)}
    Path(args.run, f"{args.role.replace(':', '-')}.json").write_text(json.dumps(res, indent=1))
    return 0


# ----------------------------------------------------------------------------- tables

def f(x, fmt: str = ".1f", none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def status(r: dict) -> str | None:
    return f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r['error']}" if "error" in r else None


def kernels_table(res: dict, dtype: str) -> list[str]:
    us = lambda r, k: f(r.get(k) and 1e6 * r[k])  # noqa: E731
    out = [f"## Kernels: microseconds per call (median), {dtype} activations", "",
           "| K x N | bits | zeros | M | triton fwd | triton dx | deq+mm fwd | deq+mm dx | dense fwd | dense dx "
           "| gptqmodel fwd | gptqmodel dx | dense/triton fwd | dense/triton dx | M=1 GB/s (% BW): triton "
           "| dense | gptqmodel | err |", "|" + "---|" * 4 + "---:|" * 14]
    notes = set()
    for r in res["rows"]:
        gbs = [f"{r[k + '_fwd_gbs']:.0f} ({r[k + '_fwd_pct_bw']:.0f}%)" if r["M"] == 1 and r.get(k + "_fwd_gbs")
               else "-" for k in ("triton", "dense", "gptqmodel")]
        out.append(f"| {r['K']}x{r['N']} | {r['bits']} | {r['zeros']} | {r['M']} | {us(r, 'triton_fwd_s')} | "
                   + " | ".join(us(r, f"{k}_s") for k in ("triton_dx", "torch_fwd", "torch_dx", "dense_fwd",
                                                           "dense_dx", "gptqmodel_fwd", "gptqmodel_dx")) + " | "
                   f"{r['dense_fwd_s'] / r['triton_fwd_s']:.2f}x | {r['dense_dx_s'] / r['triton_dx_s']:.2f}x | "
                   f"{' | '.join(gbs)} | {r['rel_err']:.1e} |")
        if r.get("gptqmodel_note") or r.get("gptqmodel_kernel"):
            notes.add(f"- gptqmodel, {r['K']}x{r['N']} {r['bits']}-bit {r['zeros']} zeros: "
                      f"{r.get('gptqmodel_note') or 'GPTQModel ' + r['gptqmodel_kernel']}")
    return out + ["", "- triton fwd is quant_matvec for M <= 8, quant_matmul above; deq+mm = TorchQuantLinear's "
                      "torch path (W~ rebuilt every call); err = max |triton - deq+mm| / max |deq+mm|"] + sorted(notes)


def linear_time_per_token(kernels: dict | None, prep: dict, kind: str, m: int) -> float | None:
    """Seconds the decoder linears of one step take in the kernels part's timings (INT4 int
    zeros, or dense): q/k/v/o + gate/up + down per layer, x layers. None without those rows
    (another model shape, another batch size)."""
    if not kernels or "rows" not in kernels or "hidden" not in prep:
        return None
    h, i = prep["hidden"], prep["intermediate"]
    rows = {(r["K"], r["N"]): r.get(f"{kind}_fwd_s") for r in kernels["rows"]
            if r["bits"] == 4 and r["zeros"] == "int" and r["M"] == m}
    t = [rows.get(s) for s in ((h, h), (h, i), (i, h))]
    if None in t:
        return None
    return prep["layers"] * (4 * t[0] + 2 * t[1] + t[2])


def decode_table(res: dict, kernels: dict | None, prep: dict, dtype: str) -> list[str]:
    out = [f"## Decoding: greedy HF generate with KV cache, {dtype}", "",
           "| variant | batch | decode tok/s | end-to-end tok/s | ms/step | vs dense | floor tok/s | % of floor "
           "| MB read/step | linears alone (kernels part) ms/step |", "|---|" + "---:|" * 9]
    res = {k: v for k, v in res.items() if isinstance(v, dict)}   # variants (not the child's wall_s)
    for name, r in res.items():
        base = res.get("dense-graph" if name.endswith("-graph") else "dense", {}).get("batches", {})
        if status(r):
            out.append(f"| {name} | {status(r)} |" + " |" * 8)
            continue
        for b, s in r["batches"].items():
            ref = base.get(b, {}).get("decode_tokens_per_s")
            kind = "dense" if name.startswith("dense") else "gptqmodel" if name == "int4-gptqmodel" else "triton"
            lin = linear_time_per_token(kernels, prep, kind, int(b)) if "merged" not in name else None
            out.append(f"| {name} | {b} | {s['decode_tokens_per_s']:.1f} | {f(s['e2e_tokens_per_s'])} | "
                       f"{s['ms_per_step']:.2f} | " + (f"{s['decode_tokens_per_s'] / ref:.2f}x" if ref else "-") +
                       f" | {s['floor_tokens_per_s']:.1f} | {s['pct_floor']:.1f}% | {s['bytes_per_step'] / 1e6:.1f} | "
                       f"{f(lin and lin * 1e3, '.2f')} |")
    out += ["", *(f"- {n}: {r['kernels']}" for n, r in res.items() if "kernels" in r),
            "- targets: INT4 decode tok/s >= 2.5x dense bf16 at batch 1, and >= 70% of its floor",
            "- `-graph`: a static KV cache and one decoding step captured as a CUDA graph, replayed (no Python "
            "per step; compared with dense-graph); the others: HF generate, eager",
            "- floor = batch x bandwidth / bytes per step: quantized codes + scales + zeros (or dense weights), "
            "lm_head, norms, one embedding row and the KV cache at the mean context per sequence",
            "- linears alone: the kernels part's times for this model's linear shapes (INT4 int zeros), summed "
            "per step; the gap to ms/step is attention, norms, sampling and Python/launch overhead"]
    return out


def train_table(res: dict, prep: dict) -> list[str]:
    rate = prep.get("matmul_tflops")
    out = ["## Training: one micro-batch step, adapters only", "",
           "| variant | frozen linears | tokens/s | ms/step | peak MiB (steps) | peak MiB (load) | vs QLoRA "
           "| % of floor | floor tok/s | GFLOP/token | trainable | loss first / last |", "|---|---|" + "---:|" * 10]
    q = res.get("qlora-nf4", {})
    for name, r in res.items():
        if status(r):
            out.append(f"| {name} | {status(r)} |" + " |" * 10)
            continue
        floor = rate * 1e12 / r["flops_per_token"] if rate else None
        out.append(f"| {name} | {r['kernels'][:60]} | {r['tokens_per_s']:.0f} | {r['ms_per_step']:.0f} | "
                   f"{r['train_peak_mib']:.0f} | {f(r['load_peak_mib'], '.0f')} | "
                   + (f"{r['tokens_per_s'] / q['tokens_per_s']:.2f}x" if "tokens_per_s" in q else "-") +
                   f" | {f(floor and 100 * r['tokens_per_s'] / floor)}% | {f(floor, '.0f')} | "
                   f"{r['flops_per_token'] / 1e9:.2f} | {r['trainable_params'] / 1e6:.1f}M | "
                   f"{r['loss_first']:.3f} / {r['loss_last']:.3f} |")
    a = res.get("qalora", {})
    if "tokens_per_s" in a and "tokens_per_s" in q:
        out += ["", f"- QA-LoRA / QLoRA: {a['tokens_per_s'] / q['tokens_per_s']:.2f}x tokens/s (target >= 1.3x), "
                    f"peak {a['train_peak_mib']:.0f} vs {q['train_peak_mib']:.0f} MiB (target: no more)"]
    mem = next((r["memory"] for r in res.values() if "memory" in r), "-")
    out += ["", f"- peak memory: {mem}; steps = the warm-up and timed steps, load = loading the model",
            "- floor = bf16 matmul rate / FLOPs per token (4 x frozen linear params + 6 x trainable + attention; "
            "lm_head at the labelled half only)"]
    return out


def render(args, prep: dict, results: dict, command: str, date: str) -> str:
    v = prep.get("versions", {})
    head = ["# GPU benchmark (issue \"CUDA speed\")" + (" -- SMOKE RUN, FIGURES MEANINGLESS" if args.smoke else ""), ""]
    if args.smoke:
        head += ["**Smoke run: CPU, Triton interpreter, tiny shapes. It proves the code paths run; no figure "
                 "below means anything (and bf16 dots are wrong under the interpreter, hence err and the "
                 "losses).**", ""]
    head += [f"- device: {prep.get('device', '?')}" + (f" (CUDA {prep['cuda']})" if prep.get("cuda") else "") + "; "
             + ", ".join(f"{k} {v[k]}" for k in v if v[k])
             + "; missing: " + (", ".join(k for k in v if not v[k]) or "none"),
             f"- date: {date}", f"- command: `{command}`",
             f"- memory bandwidth: {f(prep.get('bandwidth_gbs'), '.0f')} GB/s (device copy of "
             f"{prep.get('copy_bytes', 0) / 2**30:.2f} GiB, read + write / median time); bf16 matmul "
             f"{prep.get('matmul_n')}^3: {f(prep.get('matmul_tflops'))} TFLOP/s",
             f"- model: {prep.get('checkpoint', '-')} ({prep.get('layers', '-')} layers; random INT4 g32 unless "
             f"--checkpoint); decode: prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.reps}; "
             f"train: {args.micro_batch} x {args.seq_len} tokens, {args.warmup} warm-up + {args.steps} timed steps",
             *([f"- preparation failed: {status(prep)}"] if status(prep) else []), ""]
    body = []
    if "kernels" in results:
        body += (kernels_table(results["kernels"], args.dtype) if "rows" in results["kernels"]
                 else [f"## Kernels: {status(results['kernels'])}"]) + [""]
    if "decode" in results:
        r = results["decode"]
        body += (decode_table(r, results.get("kernels"), prep, args.dtype) if not status(r)
                 else [f"## Decoding: {status(r)}"]) + [""]
    if "train" in results:
        body += train_table(results["train"], prep) + [""]
    return "\n".join(head + body)


def main() -> int:
    args = parse_args()
    if args.role:
        return child(args)
    command, date = shlex.join([sys.executable, *sys.argv]), datetime.datetime.now().isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        run = Path(tmp)
        # --smoke keeps its tiny checkpoints in the temporary folder; a real run caches them.
        work = args.work or (run if args.smoke else ROOT / "out/bench")
        work.mkdir(parents=True, exist_ok=True)
        prep = spawn(args, "prepare", run, work)
        if "fatal" in prep:
            print(f"bench_gpu: {prep['fatal']}", file=sys.stderr)
            return 2
        results = {}
        if "kernels" in args.parts:
            results["kernels"] = spawn(args, "kernels", run, work)
        if "decode" in args.parts:
            results["decode"] = {v: spawn(args, f"decode:{v}", run, work) for v in args.decode_variants} \
                if "checkpoint" in prep else {"error": f"no checkpoint ({status(prep)})"}
        if "train" in args.parts:
            results["train"] = {v: spawn(args, f"train:{v}", run, work) for v in args.train_variants}
    md = render(args, prep, results, command, date)
    print(md)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    public = {k: (str(x) if isinstance(x, Path) else x) for k, x in vars(args).items() if k not in ("role", "run")}
    args.output.write_text(json.dumps({"command": command, "date": date, "smoke": args.smoke, "args": public,
                                       "prepare": prep, "results": results}, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(md + "\n")
    print(f"wrote {args.output} and {args.output.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
