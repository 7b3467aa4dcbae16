"""Merge time and peak memory: SmolLM2-135M (a real trained adapter) and a Llama-2-7B-shaped
GPTQ INT4 g32 checkpoint with random weights and a random rank-64 adapter on every linear
layer (speed and memory do not depend on the values). Each merge runs in its own process
(`qalora merge --no-verify`), so its peak memory is its own.

    .venv/bin/python scripts/bench_merge.py [--smollm2 out/smollm2-135m-int4] [--llama7b out/bench/llama2-7b]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from qalora_cli.lora.adapter_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FORMAT, checkpoint_sha256
from qalora_cli.models.safetensors_stream import StreamWriter
from qalora_cli.quant.gptq_format import encode_qzeros

ROOT = Path(__file__).resolve().parent.parent

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
LINEARS = {"self_attn.q_proj": ("h", "h"), "self_attn.k_proj": ("h", "h"), "self_attn.v_proj": ("h", "h"),
           "self_attn.o_proj": ("h", "h"), "mlp.gate_proj": ("h", "f"), "mlp.up_proj": ("h", "f"),
           "mlp.down_proj": ("f", "h")}


def make_random_checkpoint(path: Path, shape: dict, bits: int = 4, group: int = 32, rank: int = 64) -> Path:
    """A GPTQ v1 checkpoint of `shape` with random codes, zeros and scales, one shard per 4
    blocks, and a random adapter beside it (`<path>-adapter`)."""
    from transformers import LlamaConfig

    h, f, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    dims = {"h": h, "f": f}
    g = torch.Generator().manual_seed(0)
    path.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0

    def layer_tensors(prefix, in_f, out_f):
        groups = in_f // group
        yield f"{prefix}.qweight", torch.randint(-2**31, 2**31 - 1, (in_f * bits // 32, out_f), generator=g,
                                                 dtype=torch.int32)
        yield f"{prefix}.qzeros", encode_qzeros(torch.randint(1, 2 ** bits, (groups, out_f), generator=g), bits)
        yield f"{prefix}.scales", (torch.rand(groups, out_f, generator=g) * 0.009 + 0.001).half()
        yield f"{prefix}.g_idx", torch.arange(in_f, dtype=torch.int32) // group

    def shard_entries(blocks, first, last):
        out = []
        if first:
            out.append(("model.embed_tokens.weight", lambda: torch.randn(shape["vocab_size"], h, generator=g).half()))
        for i in blocks:
            for name, (a, b) in LINEARS.items():
                prefix = f"model.layers.{i}.{name}"
                out.append((prefix, lambda p=prefix, a=a, b=b: layer_tensors(p, dims[a], dims[b])))
            for norm in ("input_layernorm", "post_attention_layernorm"):
                out.append((f"model.layers.{i}.{norm}.weight", lambda: torch.ones(h, dtype=torch.float16)))
        if last:
            out.append(("model.norm.weight", lambda: torch.ones(h, dtype=torch.float16)))
            out.append(("lm_head.weight", lambda: torch.randn(shape["vocab_size"], h, generator=g).half()))
        return out

    chunks = [list(range(i, min(i + 4, n))) for i in range(0, n, 4)]
    for c, blocks in enumerate(chunks):
        name = f"model-{c + 1:05d}-of-{len(chunks):05d}.safetensors"
        tensors = {}
        for key, make in shard_entries(blocks, c == 0, c == len(chunks) - 1):
            made = make()
            tensors.update(dict(made) if not isinstance(made, torch.Tensor) else {key: made})
        tensors = dict(sorted(tensors.items()))
        with StreamWriter(path / name, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
                          {"format": "pt"}) as w:
            for k, v in tensors.items():
                w.write(k, v)
        weight_map.update({k: name for k in tensors})
        total += w.data_bytes
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    qc = {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits, "group_size": group,
          "desc_act": False, "sym": False, "lm_head": False, "pack_dtype": "int32"}
    config = LlamaConfig(**shape).to_dict()
    config.update({"quantization_config": qc, "architectures": ["LlamaForCausalLM"], "dtype": "float16"})
    (path / "config.json").write_text(json.dumps(config, indent=2))

    adapter = path.with_name(path.name + "-adapter")
    adapter.mkdir(exist_ok=True)
    targets = [f"model.layers.{i}.{name}" for i in range(n) for name in LINEARS]
    plan, makers = [], []
    for t in targets:
        a, b = LINEARS[t.split(".", 3)[3]]
        plan += [(f"{t}.lora_A", torch.float32, (rank, dims[a] // group)), (f"{t}.lora_B", torch.float32, (dims[b], rank))]
    with StreamWriter(adapter / ADAPTER_WEIGHTS, sorted(plan), {"format": FORMAT}) as w:
        for key, _, shp in sorted(plan):
            w.write(key, torch.randn(*shp, generator=g) * (0.1 if key.endswith("A") else 0.01))
    cfg = {"format": FORMAT, "version": 1, "rank": rank, "alpha": 16, "scaling": 16 / rank, "dropout": 0.0,
           "group_size": group, "pooling": "mean over the columns of each quantization group, by g_idx",
           "targets": targets,
           "base": {"path": str(path), "model": "random Llama-2-7B shape", "sha256": checkpoint_sha256(path),
                    "bits": bits, "group_size": group, "desc_act": False, "sym": False}}
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2))
    return adapter


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def merge_once(base: Path, adapter: Path, fmt: str) -> dict:
    out = base.with_name(f"{base.name}-bench-merged-{fmt}")
    cmd = [str(ROOT / ".venv/bin/qalora"), "merge", "--model", str(base), "--adapter", str(adapter), "--output",
           str(out), "--format", fmt, "--no-verify", "--overwrite"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    r = json.loads((out / "merge_report.json").read_text())
    row = {"format": fmt, "wall_s": round(wall, 1), "check_s": r["seconds"]["check"], "write_s": r["seconds"]["write"],
           "peak_rss_mib": r["peak_rss_mib_merge"], "base_gb": folder_bytes(base) / 1e9,
           "output_gb": folder_bytes(out) / 1e9}
    shutil.rmtree(out)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smollm2", type=Path, default=ROOT / "out/smollm2-135m-int4")
    p.add_argument("--smollm2-adapter", type=Path, default=None)
    p.add_argument("--llama7b", type=Path, default=ROOT / "out/bench/llama2-7b-int4-random")
    p.add_argument("--skip-7b", action="store_true")
    args = p.parse_args()
    rows = []
    if args.smollm2.is_dir():
        adapter = args.smollm2_adapter or args.smollm2.with_name(args.smollm2.name + "-qalora")
        rows += [{"model": "SmolLM2-135M", **merge_once(args.smollm2, adapter, f)} for f in ("qalora", "gptq", "gguf")]
    if not args.skip_7b:
        adapter = args.llama7b.with_name(args.llama7b.name + "-adapter")
        if not (adapter / ADAPTER_CONFIG).is_file():
            t = time.perf_counter()
            make_random_checkpoint(args.llama7b, LLAMA2_7B)
            print(f"made the random 7B checkpoint in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        rows += [{"model": "Llama-2-7B shape (random)", **merge_once(args.llama7b, adapter, f)}
                 for f in ("qalora", "gptq")]
    print("| model | format | wall s | check s (incl. SHA-256) | merge+write s | peak RSS MiB | base GB | output GB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['format']} | {r['wall_s']} | {r['check_s']} | {r['write_s']} | "
              f"{r['peak_rss_mib']:.0f} | {r['base_gb']:.2f} | {r['output_gb']:.2f} |")


if __name__ == "__main__":
    main()
