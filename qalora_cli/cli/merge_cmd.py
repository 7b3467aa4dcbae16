"""`qalora merge`: fold the adapter exactly into the quantized model, verify, export."""

from __future__ import annotations

from typing import Optional

import typer

from .common import CONFIG_HELP, build_config, overrides_arg, planned_only
from ..plan.cli_options import dry_run_option, output_json_option


def merge(
    overrides: Optional[list[str]] = overrides_arg,
    config: str = typer.Option("smollm2-135m-int4", "--config", "-c", help=CONFIG_HELP),
    model: Optional[str] = typer.Option(None, help="the quantized base (default: the config's output.dir)"),
    adapter: Optional[str] = typer.Option(None, help="the adapter (default: <output.dir>-qalora)"),
    output: Optional[str] = typer.Option(None, "--output", "-o",
                                         help="the merged model folder (default: <output.dir>-merged[-FORMAT])"),
    format: Optional[str] = typer.Option(None, "--format", "-f",
                                         help="qalora (exact, float zeros), gptq (integer zeros, rounded), "
                                              "gguf (Q4_1: bits 4, group 32, contiguous groups) or mlx (an mlx-lm "
                                              "folder: bits 2/3/4/8, group 32/64/128, contiguous groups); float "
                                              "for a qlora/lora adapter: a plain HF folder for `qalora quantize`"),
    no_verify: bool = typer.Option(False, "--no-verify", help="skip the comparison with the unmerged model"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output"),
    dry_run: bool = dry_run_option,
    output_json: bool = output_json_option,
) -> None:
    """Merge a QA-LoRA adapter into its quantized base; reload and compare with the unmerged model."""
    flags = {"merge.quantized_model": model, "merge.adapter_dir": adapter, "merge.dir": output,
             "merge.format": format, "merge.verify": False if no_verify else None}
    cfg = build_config(config, list(overrides or []), flags)
    if planned_only("merge", cfg, dry_run, output_json):
        return
    from ..recipes.merge import run

    _print_summary(run(cfg, overwrite=overwrite))


def _print_summary(r: dict) -> None:
    from rich.console import Console

    console = Console()
    if r["format"] == "float":
        _print_float_summary(console, r)
        return
    s = r["seconds"]
    console.print(f"merged {r['layers']} layers (rank {r['rank']}, INT{r['bits']} g{r['group_size']}) into "
                  f"{r['output']} as {r['format']} in {s['write']:.1f} s; peak memory {r['peak_rss_mib_merge']:.0f} MiB")
    if r.get("zero_rounding"):
        z = r["zero_rounding"]
        console.print(f"integer zeros: largest shift {z['max_zero_shift']:.3f} step, mean {z['mean_zero_shift']:.3f}, "
                      f"{100 * z['clamped_share']:.3f}% clamped to [1, {2 ** r['bits'] - 1}]")
    if r.get("gguf_weights"):
        g = r["gguf_weights"]
        console.print(f"gguf weights read back: {g['tensors']} tensors, largest difference {g['max_abs_diff']:.2e} "
                      f"({g['max_ratio_to_bound']:.2f} of the fp16 rounding bound)")
    if r.get("mlx_weights"):
        g = r["mlx_weights"]
        console.print(f"mlx weights read back: {g['tensors']} tensors, largest difference {g['max_abs_diff']:.2e} "
                      f"({g['max_ratio_to_bound']:.2f} of the {r['mlx_dtype']} bias rounding bound)")
    v = r.get("verification")
    if not v:
        console.print("not verified (--no-verify)")
        return
    line = (f"logits vs unmerged: largest difference {v['max_abs_logit_diff']:.3g} = {v['relative']:.2e} of the "
            f"largest logit; top-1 agreement {100 * v['top1_agreement']:.1f}%")
    if v.get("greedy_identical") is not None:
        line += f"; greedy tokens {'identical' if v['greedy_identical'] else 'differ'}"
    console.print(line)
    if "ppl_merged" in v:
        console.print(f"perplexity: unmerged {v['ppl_unmerged']:.4f}, merged {v['ppl_merged']:.4f} "
                      f"({100 * v['ppl_change']:+.3f}%)")
    elif v.get("ppl_skipped"):
        console.print(f"perplexity: not compared ({v['ppl_skipped']})")
    console.print(f"verdict: {v['verdict']}")


def _print_float_summary(console, r: dict) -> None:
    console.print(f"merged the {r['method']} adapter {r['adapter']} into the float model ({r['dtype']}): {r['output']} "
                  f"in {r['seconds']['write']:.1f} s")
    for key, what in (("verification", "unmerged float model + adapter"), ("nf4_vs_merged", "trained NF4 model")):
        v = r.get(key)
        if v:
            console.print(f"logits vs {what}: largest difference {v['max_abs_logit_diff']:.3g} = {v['relative']:.2e} "
                          f"of the largest logit; top-1 agreement {100 * v['top1_agreement']:.1f}%"
                          + (f"; perplexity {v['ppl_unmerged']:.4f} -> {v['ppl_merged']:.4f}" if "ppl_merged" in v
                             else ""))
    console.print(f"verdict: {r['verification']['verdict']}" if r.get("verification") else "not verified (--no-verify)")
