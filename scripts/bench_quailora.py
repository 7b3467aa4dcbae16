"""QuAILoRA initialization for QA-LoRA on SmolLM2-135M (issue 15): where `lora.init` starts, and
what it does to a fine-tune. Resumable: every finished row is saved at once to the JSON
(--out), and a re-run skips it.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_quailora.py --part step0            # INT4/3/2
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_quailora.py --part sweep --bits 3
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_quailora.py --part finetune         # hours on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_quailora.py --checkpoints out/q --out out/bench/q.json  # afresh
    .venv/bin/python scripts/bench_quailora.py --table                                   # markdown from the JSON
    .venv/bin/python scripts/bench_quailora.py --table --out a.json --with b.json        # ... from several

Parts:
- step0: held-out perplexity (built-in held-out text, windows of 512) of the float model and of each
  built-in config's checkpoint with its adapters at step 0: zero (the quantized model), svd
  (weight-only), quailora (the config's rank) and the full-rank limit (quailora at rank = the most
  groups of any layer: the best group-constant correction); the share of the gap to the float model
  closed, (ppl_q - ppl_init) / (ppl_q - ppl_float); the init's wall time and its share of the measured
  60-step fine-tune's (finetune rows when present, else the README's 595 s); the mean per-layer output
  error left on the calibration inputs.
- sweep: the same for quailora at ranks 4..64 (a layer's update rank is capped by its number of groups).
- local / corrected: quailora from statistics recomputed from the original model (the stored ones, whatever
  their inputs, are the step0 rows): local, the layer's own weight on the quantized model's inputs,
  |(W - W~ - Delta) X|^2; corrected, the float model's output from the inputs of the model as corrected
  so far, |W X_float - (W~ + Delta) X_c|^2, solved layer after layer (lora/init_stats.StatsCollector).
- finetune: `qalora finetune --config <cfg>` (60 steps) with lora.init zero and quailora, seeds 0, 1, 2:
  held-out loss and exact match before (step 0) and after, and wall times.

A checkpoint missing under the config's output.dir is made first (`qalora quantize --config <cfg>`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README_FINETUNE_S = 595.0  # README: `qalora finetune --config smollm2-135m-int4`, 60 steps, 2 CPU cores


class Results:
    """rows by key, saved after every row (written to a temporary file, then renamed)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = json.loads(path.read_text())["rows"] if path.is_file() else {}

    def __contains__(self, key):
        return key in self.rows

    def put(self, key: str, row: dict) -> None:
        self.rows[key] = dict(row, date=datetime.date.today().isoformat())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rows": self.rows}, indent=1) + "\n")
        os.replace(tmp, self.path)
        print(f"{key}: {json.dumps({k: v for k, v in row.items() if k != 'layers'})}", flush=True)


def config_for(bits: int) -> str:
    return f"smollm2-135m-int{bits}"


# --checkpoints: where the checkpoints are found (and made when missing); None: each config's output.dir
CHECKPOINTS: Path | None = None


def ensure_checkpoint(name: str) -> Path:
    from qalora_cli.config.loader import load_config

    out = CHECKPOINTS / name if CHECKPOINTS else ROOT / load_config(name).output.dir
    if not (out / "config.json").is_file():
        print(f"quantizing {name} -> {out}", flush=True)
        subprocess.run([sys.executable, "-m", "qalora_cli", "quantize", "--config", name, f"output.dir={out}"],
                       cwd=ROOT, check=True)
    return out


def heldout_ids(tokenizer, tokens: int):
    import torch

    from qalora_cli.eval.ppl_text import load_text

    body, _ = load_text("builtin")
    return torch.tensor(tokenizer(body, add_special_tokens=False)["input_ids"][: tokens + 1])


def float_ppl(res: Results, name: str, tokens: int) -> float:
    key = f"float/{tokens}"
    if key not in res:
        from qalora_cli.config.loader import load_config
        from qalora_cli.eval.perplexity import perplexity
        from qalora_cli.models.loading import load_model

        model, tok, _ = load_model(load_config(name).model, "cpu")
        t = time.perf_counter()
        r = perplexity(model, heldout_ids(tok, tokens), 512)
        res.put(key, {"ppl": r["ppl"], "tokens": r["tokens"], "seconds": round(time.perf_counter() - t, 1)})
    return res.rows[key]["ppl"]


def step0_row(name: str, base: Path, init: str, rank: int | None, tokens: int, inputs: str = "stored") -> dict:
    """Perplexity of the checkpoint with its adapters initialized by `init` (rank None: the full-rank limit).
    `inputs`: "stored", the checkpoint's statistics; "local" / "corrected", recomputed from the original model
    (see the module's docstring)."""
    import torch
    from transformers import AutoTokenizer

    from qalora_cli.config.loader import load_config
    from qalora_cli.eval.perplexity import perplexity
    from qalora_cli.kernels.registry import use_backend
    from qalora_cli.kernels.torch_quant_linear import cache_inference_weights
    from qalora_cli.lora.init_stats import initialize_adapters
    from qalora_cli.lora.inject import inject_qalora, quantized_linears
    from qalora_cli.models.quantized_io import load_quantized

    model, _ = load_quantized(base, "cpu", torch.float32)
    if rank is None:
        rank = max(m.scales.shape[0] for m in quantized_linears(model).values())
    cfg = load_config(name, [f"lora.init={init}", f"lora.rank={rank}", f"train.quantized_model={base}"])
    torch.manual_seed(cfg.train.seed)
    adapters = inject_qalora(model, cfg.lora)
    given = None
    t = time.perf_counter()
    if inputs != "stored":
        from qalora_cli.lora.init_stats import quantized_weights, recompute_stats

        given = (recompute_stats(cfg, cfg.model, quantized_weights(adapters),
                                 rank=rank if inputs == "corrected" else None), inputs)
    stats_s = time.perf_counter() - t
    init_report = initialize_adapters(cfg, base, adapters, given=given)
    use_backend(model, "torch", torch.float32)
    cache_inference_weights(model, torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(base)
    t = time.perf_counter()
    r = perplexity(model, heldout_ids(tok, tokens), 512)
    return {"ppl": r["ppl"], "tokens": r["tokens"], "rank": rank, "init_seconds": init_report.get("seconds", 0.0),
            "init_stats": init_report.get("stats"),
            "mean_remaining_error": init_report.get("mean_remaining_error", 1.0),
            "total_remaining_error": init_report.get("total_remaining_error", 1.0),
            "mean_full_rank_remaining_error": init_report.get("mean_full_rank_remaining_error"),
            "ppl_seconds": round(time.perf_counter() - t, 1), "stats_seconds": round(stats_s, 1)}


def part_step0(res: Results, bits: list[int], tokens: int, ranks: list[int] | None, inputs: str = "stored") -> None:
    for b in bits:
        name = config_for(b)
        base = ensure_checkpoint(name)
        float_ppl(res, name, tokens)
        from qalora_cli.config.loader import load_config

        rank = load_config(name).lora.rank
        if inputs != "stored":
            variants = [(f"quailora-{inputs}", "quailora", rank)]
        elif ranks is None:  # None: the full-rank limit
            variants = [("zero", "zero", rank), ("svd", "svd", rank), ("quailora", "quailora", rank),
                        ("full-rank", "quailora", None)]
        else:
            variants = [(f"quailora-r{r}", "quailora", r) for r in ranks]
        for label, init, r in variants:
            key = f"step0/int{b}/{label}/{tokens}"
            if key not in res:
                res.put(key, step0_row(name, base, init, r, tokens, inputs=inputs))


def part_finetune(res: Results, bits: list[int], seeds: list[int], steps: int,
                  inits: tuple[str, ...] = ("zero", "quailora")) -> None:
    for b in bits:
        name = config_for(b)
        base = ensure_checkpoint(name)
        for seed in seeds:
            for init in inits:
                key = f"finetune/int{b}/{init}/seed{seed}/{steps}"
                if key in res:
                    continue
                out = ROOT / "out" / "bench" / "quailora-ft" / f"int{b}-{init}-s{seed}"
                # a run stopped part way (a session's end) goes on from its last checkpoint
                again = "--resume" if any((out / "checkpoints").glob("step-*")) else "--overwrite"
                cmd = [sys.executable, "-m", "qalora_cli", "finetune", "--config", name, "--output", str(out),
                       "--max-steps", str(steps), again, f"lora.init={init}", f"train.seed={seed}",
                       f"train.quantized_model={base}"]
                t = time.perf_counter()
                subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
                rep = json.loads((out / "finetune_report.json").read_text())
                em = lambda part: (rep[part].get("generation") or {}).get("exact_match")  # noqa: E731
                res.put(key, {"loss_before": rep["before"]["eval_loss"], "loss_after": rep["after"]["eval_loss"],
                              "exact_match_before": em("before"), "exact_match_after": em("after"),
                              "init_seconds": rep["init"].get("seconds", 0.0),
                              "mixed_precision": rep["mixed_precision"], "resumed_from": rep["resumed_from"],
                              "train_seconds": rep["seconds"]["train"],
                              "total_seconds": rep["seconds"]["total"],
                              "wall_seconds": round(time.perf_counter() - t, 1)})


def table(res: Results, tokens: int) -> str:
    rows = res.rows
    total = lambda r: f"{100 * r['total_remaining_error']:.1f}%" if "total_remaining_error" in r else "-"  # noqa: E731
    fl = rows.get(f"float/{tokens}", {}).get("ppl")
    ft = [r["total_seconds"] for k, r in rows.items() if k.startswith("finetune/") and "/zero/" in k]
    ft_s = sum(ft) / len(ft) if ft else README_FINETUNE_S
    lines = [f"float model: perplexity {fl:.3f} ({tokens} held-out tokens)\n" if fl else "",
             "| bits | init | rank | perplexity | vs float | gap closed | layer output error left, mean (total) | "
             "init s | init / fine-tune |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for b in (4, 3, 2):
        zero = rows.get(f"step0/int{b}/zero/{tokens}")
        for label in ("zero", "svd", "quailora", "full-rank", "quailora-asymmetric", "quailora-local",
                      "quailora-corrected",
                      *[f"quailora-r{r}" for r in (4, 8, 16, 32, 64)]):
            r = rows.get(f"step0/int{b}/{label}/{tokens}")
            if not r:
                continue
            gap = (zero["ppl"] - r["ppl"]) / (zero["ppl"] - fl) if zero and fl else float("nan")
            lines.append(f"| INT{b} | {label} | {r['rank']} | {r['ppl']:.3f} | {r['ppl'] / fl:.3f}x | "
                         f"{100 * gap:+.1f}% | {100 * r['mean_remaining_error']:.1f}% ({total(r)}) | "
                         f"{r['init_seconds']:.2f} | "
                         f"{100 * r['init_seconds'] / ft_s:.2f}% |")
    ft_rows = {k: r for k, r in rows.items() if k.startswith("finetune/")}
    if ft_rows:
        lines += ["", finetune_table(ft_rows)]
    return "\n".join(lines)


def finetune_table(ft_rows: dict) -> str:
    """Per bit width and init: each seed's held-out loss and exact match after the fine-tune, and their means."""
    lines = ["| bits | init | precision | held-out loss step 0 (mean) | after: seed 0 / 1 / 2 | **mean** | "
             "exact match: seed 0 / 1 / 2 | **mean** | fine-tune s (mean) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    loss = lambda r: r["loss_after"]  # noqa: E731
    em = lambda r: r["exact_match_after"] or 0  # noqa: E731
    for b in (4, 3, 2):
        for init in ("zero", "quailora"):
            by_seed = {int(k.split("/")[3].removeprefix("seed")): r for k, r in ft_rows.items()
                       if k.startswith(f"finetune/int{b}/{init}/")}
            if not by_seed:
                continue
            rs = list(by_seed.values())
            mean = lambda f: sum(f(r) for r in rs) / len(rs)  # noqa: E731
            each = lambda f, fmt: " / ".join(  # noqa: E731
                fmt(f(by_seed[s])) if s in by_seed else "-" for s in (0, 1, 2))
            precision = ", ".join(sorted({r.get("mixed_precision", "?") for r in rs}))
            lines.append(f"| INT{b} | {init} | {precision} | {mean(lambda r: r['loss_before']):.4f} | "
                         f"{each(loss, '{:.4f}'.format)} | {mean(loss):.4f} | "
                         f"{each(em, lambda v: f'{100 * v:.1f}%')} | {100 * mean(em):.1f}% | "
                         f"{mean(lambda r: r['total_seconds']):.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["step0", "sweep", "local", "corrected", "finetune", "all"], default="step0")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--ranks", default="4,8,16,32,64")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--inits", default="zero,quailora",
                    help="finetune: the inits to run (two processes can split them)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench" / "quailora.json")
    ap.add_argument("--table", action="store_true", help="print the markdown table from --out and exit")
    ap.add_argument("--with", dest="also", type=Path, action="append", default=[],
                    help="--table: rows of another results file too (e.g. each lane's of a split run)")
    ap.add_argument("--checkpoints", type=Path, help="the checkpoints' folder (made there when missing, with the "
                                                      "configs' settings); default: each config's output.dir")
    args = ap.parse_args()
    if args.also and not args.table:
        ap.error("--with joins results files for --table only")  # runs write to --out alone
    global CHECKPOINTS
    CHECKPOINTS = args.checkpoints
    res = Results(args.out)
    for extra in args.also:
        res.rows.update(Results(extra).rows)
    if not args.table:
        from qalora_cli.library_logs import quiet_library_logs

        quiet_library_logs()
        bits = [int(b) for b in args.bits.split(",")]
        if args.part in ("step0", "all"):
            part_step0(res, bits, args.ppl_tokens, None)
        if args.part in ("sweep", "all"):
            part_step0(res, bits, args.ppl_tokens, [int(r) for r in args.ranks.split(",")])
        for inputs in ("local", "corrected"):
            if args.part in (inputs, "all"):
                part_step0(res, bits, args.ppl_tokens, None, inputs=inputs)
        if args.part in ("finetune", "all"):
            part_finetune(res, bits, [int(s) for s in args.seeds.split(",")], args.steps, tuple(args.inits.split(",")))
    print(table(res, args.ppl_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
