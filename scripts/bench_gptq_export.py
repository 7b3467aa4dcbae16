"""What each merged export keeps of a fine-tune, side by side (issue 13's table).

For one config whose base and adapter exist (`qalora quantize` and `qalora finetune` with it),
each variant is merged (`qalora merge --format F overrides...`, in its own process) and scored
on the fine-tune's own held-out task, greedy, float32:
  - exact match on `--examples` held-out records, and answers equal to the unmerged model's;
  - the held-out answer loss (response tokens of `--loss-examples` records) and the share of
    the adapter's gain it keeps: (loss_base - loss_export) / (loss_base - loss_unmerged);
  - perplexity on the built-in held-out text; the merge's own logit comparison; size; time.
Results are saved per variant in the output JSON; a re-run skips the variants already there.

    .venv/bin/python scripts/bench_gptq_export.py --config smollm2-135m-int4-gguf \\
        --variant exact:qalora --variant nearest:gptq:merge.rounding=nearest --variant scales:gptq --variant codes:gptq:merge.rounding=codes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

from qalora_cli.config.loader import load_config
from qalora_cli.data.instruct import load_records, tokenize_records
from qalora_cli.eval.exact_match import exact_match
from qalora_cli.eval.task import score_task, task_pairs
from qalora_cli.export.verify import unmerged_model
from qalora_cli.kernels.torch_quant_linear import cache_inference_weights
from qalora_cli.library_logs import quiet_library_logs
from qalora_cli.models.quantized_io import load_quantized
from qalora_cli.recipes.merge import merge_paths

ROOT = Path(__file__).resolve().parent.parent

QALORA = str(ROOT / ".venv/bin/qalora")


def load(folder: Path):
    if (folder / "model.gguf").is_file():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32).eval()
    return load_quantized(folder, "cpu", torch.float32)[0]


def load_peer(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32).eval()


def perplexity_of(model, tok, tokens: int) -> float:
    from qalora_cli.data.builtin_text import heldout_text
    from qalora_cli.eval.perplexity import perplexity

    ids = torch.tensor(tok(heldout_text(), add_special_tokens=False)["input_ids"][:tokens + 1])
    return perplexity(model, ids, seq_len=512, batch_size=4)["ppl"]


def score(model, tok, pairs, examples, ppl_tokens: int) -> dict:
    cache_inference_weights(model, torch.float32)
    return {**score_task(model, tok, pairs, examples, 48), "ppl": perplexity_of(model, tok, ppl_tokens)}


def score_mlx(folder: Path, tok, pairs, examples, dtype: str) -> dict:
    """The MLX folder as mlx-lm runs it (mlx_lm.load, `dtype` compute): greedy answers token by
    token until a stop token, and the held-out answer loss from its logits. No perplexity: mlx's
    Linux CPU build is 20-35x slower than torch."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load as mlx_load

    from benchlib import mlx_greedy_answer
    from qalora_cli.data.instruct import adds_bos
    from qalora_cli.eval.exact_match import stop_token_ids

    model, _ = mlx_load(str(folder))
    model.set_dtype(getattr(mx, dtype))
    stops, adds = set(stop_token_ids(None, tok)), adds_bos(tok)
    preds = [mlx_greedy_answer(model, tok, prompt, stops, adds, 48) for prompt, _ in pairs]
    total, n = 0.0, 0
    for ex in examples:
        logits = torch.from_numpy(np.array(model(mx.array([ex.input_ids]))[0].astype(mx.float32)))
        labels = torch.tensor(ex.labels[1:])
        total += float(torch.nn.functional.cross_entropy(logits[:-1], labels, ignore_index=-100, reduction="sum"))
        n += int((labels != -100).sum())
    return {"exact_match": exact_match(preds, [r for _, r in pairs]), "answers": preds, "answer_loss": total / n,
            "ppl": float("nan")}


def run_qalora(args: list[str], what: str) -> float:
    """One `qalora` command in its own process, as a user runs it. -> its wall seconds."""
    t0 = time.perf_counter()
    r = subprocess.run([QALORA, *args], capture_output=True, text=True)
    if r.returncode:
        last = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        raise SystemExit(f"{what} failed: {last}")
    return round(time.perf_counter() - t0, 1)


def merge(config: str, name: str, fmt: str, overrides: list[str], out: Path) -> dict:
    wall = run_qalora(["merge", "--config", config, "--format", fmt, "--output", str(out), "--overwrite",
                       "merge.device=cpu", *overrides], f"merge {name}")
    report = json.loads((out / "merge_report.json").read_text())
    size = sum(p.stat().st_size for p in out.iterdir() if p.suffix in (".safetensors", ".gguf"))
    return {"wall_s": wall, "size_mb": round(size / 1e6, 1),
            "verification": report.get("verification"), "zero_rounding": report.get("zero_rounding"),
            "refit": (report.get("refit") or {}).get("summary"), "seconds": report.get("seconds")}


QUANTIZE_TIMING = "quantize the base again (timing only)"


def time_quantize(config: str, overrides: list[str]) -> dict:
    """`qalora quantize` of the base as it was made, into a scratch folder: its wall time."""
    out = ROOT / f"out/bench/quantize-timing-{Path(config).stem}"
    wall = run_qalora(["quantize", "--config", config, "--output", str(out), "--overwrite", "quantize.device=cpu",
                       *overrides], "quantize")
    report = json.loads((out / "quantize_report.json").read_text())
    return {"wall_s": wall, "seconds": report.get("seconds"), "overrides": overrides}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--variant", action="append", default=[], help="name:format[:override,override...]")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--loss-examples", type=int, default=100)
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--output", type=Path)
    p.add_argument("--mlx-compute", default="float32", help="the dtype mlx-lm computes an mlx variant in")
    p.add_argument("--peer", action="append", default=[], help="a gptq variant to score again as transformers + "
                                                              "GPTQModel load it")
    p.add_argument("--time-quantize", metavar="OVERRIDES", help="first quantize the base again with the config "
                   "and these comma-separated overrides (its recorded settings), timed in the same run as the merges: "
                   "the cost they are compared with")
    args = p.parse_args()
    quiet_library_logs()
    cfg = load_config(args.config, [])
    base, adapter, merged_default = merge_paths(cfg)
    out_json = args.output or ROOT / f"out/bench/gptq_export_{Path(args.config).stem}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    _, eval_records, _ = load_records(cfg.data)
    pairs = task_pairs(eval_records[:args.examples], cfg.data, tok)
    examples, _ = tokenize_records(eval_records[:args.loss_examples], tok, cfg.data)

    def save():
        out_json.write_text(json.dumps(results, indent=1) + "\n")

    if args.time_quantize is not None and QUANTIZE_TIMING not in results:
        results[QUANTIZE_TIMING] = time_quantize(args.config, [o for o in args.time_quantize.split(",") if o])
        save()
    for name, make in (("base (no adapter)", lambda: load_quantized(base, "cpu", torch.float32)[0]),
                       ("unmerged", lambda: unmerged_model(base, adapter, "cpu"))):
        if name not in results:
            results[name] = score(make(), tok, pairs, examples, args.ppl_tokens)
            save()
    for spec in args.variant:
        name, fmt, *rest = spec.split(":", 2)
        if name in results:
            continue
        overrides = rest[0].split(",") if rest and rest[0] else []
        out = ROOT / f"out/bench/export-{Path(args.config).stem}-{name}"
        row = merge(args.config, name, fmt, overrides, out)
        if fmt == "mlx":
            row.update(score_mlx(out, tok, pairs, examples, args.mlx_compute))
        else:
            row.update(score(load(out), tok, pairs, examples, args.ppl_tokens))
        row.update({"format": fmt, "overrides": overrides})
        results[name] = row
        save()
    for name in args.peer:
        row = f"{name} (transformers + GPTQModel)"
        if row not in results and name in results:
            results[row] = {**score(load_peer(ROOT / f"out/bench/export-{Path(args.config).stem}-{name}"), tok, pairs,
                                    examples, args.ppl_tokens), "format": "gptq (peer)"}
            save()
    print_table(results, base)


def print_table(results: dict, base: Path) -> None:
    b, u = results["base (no adapter)"], results["unmerged"]
    gain = b["answer_loss"] - u["answer_loss"]
    quant_s = json.loads((base / "quantize_report.json").read_text())["seconds"]["total"]
    print(f"quantization of the base, as it was made: {quant_s:.0f} s")
    if QUANTIZE_TIMING in results:
        print(f"quantization of the base again, in this run: {results[QUANTIZE_TIMING]['wall_s']:.0f} s")
    print("| model | exact match | = unmerged | answer loss | gain kept | ppl | logit diff / max | "
          "codes / scales changed | held-out KL (refit -> distilled) | merge s (refit s, distill s) | size MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        if name == QUANTIZE_TIMING:
            continue
        same = sum(a == c for a, c in zip(r["answers"], u["answers"]))
        kept = (b["answer_loss"] - r["answer_loss"]) / gain if gain else float("nan")
        v = r.get("verification") or {}
        rr = r.get("refit") or {}
        d = rr.get("distill") or {}
        changed = f"{100 * rr['codes_changed_share']:.2f}% / {100 * rr['scales_changed_share']:.0f}%" if rr else "-"
        kl = f"{d['heldout_kl_before']:.4f} -> {d['heldout_kl_after']:.4f}" if d.get("heldout_kl_before") else "-"
        print(f"| {name} | {100 * r['exact_match']:.1f}% | {same}/{len(u['answers'])} | {r['answer_loss']:.4f} | "
              f"{100 * kept:.1f}% | {r['ppl']:.3f} | {v.get('relative', float('nan')):.2e} | {changed} | {kl} | "
              f"{r.get('wall_s', '-')} ({rr.get('seconds', '-')}, {d.get('seconds', '-')}) | {r.get('size_mb', '-')} |")


if __name__ == "__main__":
    main()
