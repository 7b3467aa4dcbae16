"""Benchmark: qalora vs GPTQModel, quantizing the same model with the same calibration ids
and the same GPTQ settings, side by side in one run.

What it measures, per tool, each in its own fresh Python process:
  - quantize seconds: the quantize step alone (calibration forwards, GPTQ, packing into
    QuantLinear layers), without imports, model loading or saving;
  - total seconds: the whole worker, from before `import torch` to the checkpoint on disk;
  - peak RSS: the worker's VmHWM (/proc/self/status) at its end;
and then, in this (parent) process, the held-out perplexity of both GPTQ v1 checkpoints,
both read by qalora's `load_quantized`, and of the unquantized model.

Model: the embedded SmolLM2-135M (built-in config `smollm2-135m-int4`), saved once as a plain
Hugging Face folder so that both tools load the same float weights. Calibration: qalora's
builtin text, `--samples` windows of `--seq-len` tokens, seed 0, saved once as safetensors;
qalora draws them itself (through its config) and the script checks that they are the very
ids GPTQModel is given.

Run (from the repository root, with the project's virtual environment):

    GPTQMODEL_CPU_WORKERS=2 .venv/bin/python scripts/bench_quantize_vs_gptqmodel.py

    # smoke test, under a minute on an idle machine: 8 x 64 tokens, the first 4 decoder
    # layers only, 2048 ppl tokens (the perplexity of a cut model only checks the plumbing)
    GPTQMODEL_CPU_WORKERS=2 .venv/bin/python scripts/bench_quantize_vs_gptqmodel.py --tiny --work out/bench-tiny

    # redo only the perplexities and the report of an earlier run in the same --work
    ... --reuse-quantized

Results: a markdown table on stdout and `<work>/results.json`; worker logs in `<work>/log-*.txt`.
Timings are only meaningful on an otherwise idle machine: the report measures how much CPU
other processes took during each worker and warns when it is more than 5%. (On 2 cores, a
second busy process slows torch's threaded ops far more than 2x, unevenly between tools;
`--threads 1` limits that damage when the machine cannot be had to oneself.)

This file is the entry point (arguments, launching the workers, perplexity, the report); the
workers are scripts/bench_quantize_workers.py, the shared inputs scripts/bench_quantize_inputs.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from bench_quantize_inputs import (
    ids_digest, load_calibration, make_spec, prepare_calibration, prepare_model_folder)
from benchlib import error_line

TOOLS = ("qalora", "gptqmodel")
WORKER_SCRIPT = Path(__file__).resolve().with_name("bench_quantize_workers.py")
TINY = {"samples": 8, "seq_len": 64, "ppl_tokens": 2048, "layers": 4}
FULL = {"samples": 128, "seq_len": 256, "ppl_tokens": 16384, "layers": 0}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="out/bench", help="cache and output folder (default out/bench)")
    p.add_argument("--tiny", action="store_true",
                   help=f"smoke test: defaults become {TINY} (layers 0 = all)")
    p.add_argument("--samples", type=int, help=f"calibration samples (default {FULL['samples']})")
    p.add_argument("--seq-len", type=int, help=f"calibration tokens per sample (default {FULL['seq_len']})")
    p.add_argument("--layers", type=int, help="keep only the first N decoder layers (default 0: all 30)")
    p.add_argument("--ppl-tokens", type=int, help=f"held-out tokens scored (default {FULL['ppl_tokens']})")
    p.add_argument("--ppl-seq-len", type=int, default=512, help="perplexity window (default 512)")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward pass")
    p.add_argument("--damp", type=float, default=0.01, help="damp_percent")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the model is loaded in, i.e. of the calibration forwards")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--threads", type=int,
                   help="torch/OpenMP threads in each worker (default: torch's own, one per core); "
                        "1 keeps a shared, busy machine from slowing threaded ops out of proportion")
    p.add_argument("--gptqmodel-offload-to-disk", action="store_true",
                   help="keep GPTQModel's default offload_to_disk=True (off by default: qalora keeps "
                        "the model in memory, so both do)")
    p.add_argument("--reuse-quantized", action="store_true",
                   help="skip quantizing: reuse the checkpoints and timings of an earlier run with the "
                        "same settings in --work, and only redo the perplexities and the report")
    args = p.parse_args(argv)
    preset = TINY if args.tiny else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ---------------------------------------------------------------------------------------------
# Launching the workers (scripts/bench_quantize_workers.py), one tool per fresh process
# ---------------------------------------------------------------------------------------------

class OtherCpuLoad:
    """Share of the machine's CPU time used by processes other than our workers while they
    run: timings are only comparable when this is near 0 for both tools. From /proc/stat
    (all processes) minus the workers' own CPU time (RUSAGE_CHILDREN); Linux only."""

    def __enter__(self):
        self.stat0, self.own0 = self._stat(), self._children_cpu()
        return self

    def __exit__(self, *exc):
        stat1, own1 = self._stat(), self._children_cpu()
        self.share = None
        if self.stat0 and stat1:
            tick = os.sysconf("SC_CLK_TCK")
            busy = (stat1[0] - self.stat0[0]) / tick
            capacity = (stat1[1] - self.stat0[1]) / tick
            if capacity > 0:
                self.share = max(0.0, busy - (own1 - self.own0)) / capacity

    @staticmethod
    def _stat():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        busy = sum(v[:8]) - idle  # user nice system idle iowait irq softirq steal
        return busy, busy + idle

    @staticmethod
    def _children_cpu() -> float:
        import resource

        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime


def reuse_runs(spec: dict, spec_path: Path, work: Path) -> dict:
    """The worker results of an earlier run in `work`, only if it used these very settings."""
    if not spec_path.is_file() or json.loads(spec_path.read_text()) != spec:
        raise SystemExit(f"--reuse-quantized: {spec_path} is missing or was written with other settings")
    runs = {}
    for tool in TOOLS:
        path = work / f"result-{tool}.json"
        if not path.is_file():
            raise SystemExit(f"--reuse-quantized: no {path}; run without --reuse-quantized first")
        runs[tool] = json.loads(path.read_text())
    print(f"reusing the quantized checkpoints and timings in {work}", flush=True)
    return runs


def run_worker(tool: str, spec: dict, spec_path: Path, work: Path) -> dict:
    """Run one tool in a fresh interpreter; its output goes to <work>/log-<tool>.txt."""
    result_path, log_path = work / f"result-{tool}.json", work / f"log-{tool}.txt"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(WORKER_SCRIPT), tool, str(spec_path), str(result_path)]
    env = dict(os.environ)  # with GPTQMODEL_CPU_WORKERS, which main() defaults to 2
    if spec["threads"]:  # before the worker starts: OpenMP reads it once, at load
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    print(f"[{tool}] quantizing in a fresh process (log: {log_path}) ...", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log, OtherCpuLoad() as load:
        # cwd=work: GPTQModel writes per-run logs into ./logs, which must not land in the repo.
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work).returncode
    wall = time.perf_counter() - t0
    if rc != 0 or not result_path.is_file():
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-25:])
        print(f"[{tool}] FAILED (exit {rc}); last lines of {log_path}:\n{tail}", flush=True)
        return {"tool": tool, "error": f"exit {rc}, see {log_path}", "process_wall_s": wall}
    result = json.loads(result_path.read_text())
    result.update(process_wall_s=wall, other_cpu_share=load.share)
    result_path.write_text(json.dumps(result, indent=2) + "\n")  # with the parent's measures, for reuse
    print(f"[{tool}] done: quantize {result['quantize_s']:.1f} s, total {result['total_s']:.1f} s, "
          f"peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# Perplexity (parent process)
# ---------------------------------------------------------------------------------------------

def describe(e: Exception) -> str:
    """An exception's type and the first line of its message."""
    return error_line(e)


def heldout_ids(hf_dir: Path):
    from transformers import AutoTokenizer

    from qalora_cli.data.builtin_text import heldout_text
    from qalora_cli.models.loading import quiet_transformers

    quiet_transformers()  # no per-file progress bars in the report
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    return tokenizer(heldout_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]


def load_for_eval(folder: Path, unquantized: bool = False):
    """-> (model, how it was loaded, note). qalora's loader first; for a checkpoint it cannot
    read, transformers (which uses GPTQModel's kernels)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qalora_cli.models.quantized_io import load_quantized

    if unquantized:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), "transformers", ""
    try:
        model, _ = load_quantized(folder, dtype=torch.float32)
        return model, "qalora load_quantized", ""
    except Exception as e:  # noqa: BLE001 - any failure: say so, then try the peer loader
        note = f"load_quantized failed: {describe(e)}"
        print(f"  {folder.name}: {note}; trying transformers", flush=True)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32).eval()
    return model, "transformers from_pretrained", note


def eval_perplexity(folder: Path, ids, args, unquantized: bool = False) -> dict:
    from qalora_cli.eval.perplexity import perplexity

    t0 = time.perf_counter()
    try:
        model, loader, note = load_for_eval(folder, unquantized)
        ppl = perplexity(model, ids, seq_len=args.ppl_seq_len, max_tokens=args.ppl_tokens)
    except Exception as e:  # noqa: BLE001 - a failed evaluation is a table entry, not a crash
        return {"error": describe(e)}
    return {"ppl": ppl["ppl"], "tokens": ppl["tokens"], "loader": loader, "note": note,
            "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "python": platform.python_version(),
            "platform": platform.platform()}


def versions() -> dict:
    out = {}
    for pkg in ("torch", "transformers", "gptqmodel", "qalora", "optimum"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _fmt(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def markdown_table(runs: dict, ppl: dict) -> str:
    rows = ["| tool | quantize s | total s | peak RSS MiB | perplexity |",
            "|---|---:|---:|---:|---:|"]
    for tool in TOOLS:
        r, p = runs.get(tool, {}), ppl.get(tool, {})
        ppl_cell = _fmt(p.get("ppl"), ".3f") if "ppl" in p else f"failed ({p.get('error', 'not run')})"
        if p.get("note"):
            ppl_cell += f" (via {p['loader']}; {p['note']})"
        if "error" in r:
            rows.append(f"| {tool} | failed | - | - | - |")
            continue
        rows.append(f"| {tool} | {_fmt(r['quantize_s'], '.1f')} | {_fmt(r['total_s'], '.1f')} | "
                    f"{_fmt(r['peak_rss_mib'], '.0f')} | {ppl_cell} |")
    base = ppl.get("unquantized", {})
    rows.append(f"| unquantized | - | - | - | {_fmt(base.get('ppl'), '.3f')} |")
    return "\n".join(rows)


def ratios(runs: dict) -> dict:
    q, g = runs.get("qalora", {}), runs.get("gptqmodel", {})
    out = {}
    for key in ("quantize_s", "total_s", "peak_rss_mib"):
        if isinstance(q.get(key), (int, float)) and isinstance(g.get(key), (int, float)) and g[key] > 0:
            out[key] = q[key] / g[key]
    return out


def print_report(report: dict) -> None:
    s, m, v = report["settings"], report["machine"], report["versions"]
    print()
    depth = f"first {s['layers']} decoder layers" if s["layers"] else "all decoder layers"
    print(f"## qalora vs GPTQModel: GPTQ quantize of SmolLM2-135M ({depth})")
    print()
    print(report["table"])
    print()
    r = report["ratios"]
    if r:
        labels = {"quantize_s": "quantize time", "total_s": "total time", "peak_rss_mib": "peak RSS"}
        print("qalora / GPTQModel: " + ", ".join(f"{labels[k]} {v_:.2f}x" for k, v_ in r.items()))
    print(f"calibration ids identical in both tools: {report['calibration_ids_identical']} "
          f"({s['samples']} x {s['seq_len']} tokens, builtin, seed {s['seed']}, digest {report['calib_digest']})")
    print(f"settings: bits {s['bits']}, group {s['group_size']}, sym False, desc_act/act_order False, "
          f"damp {s['damp_percent']}, true_sequential True, batch {s['batch_size']}, dtype {s['dtype']}, "
          f"GPTQModel act_group_aware False, offload_to_disk {s['gptqmodel_offload_to_disk']}")
    shares = {t: report["runs"][t].get("other_cpu_share") for t in TOOLS}
    print("CPU used by other processes during each run: " + ", ".join(
        f"{t} {_fmt(100 * v, '.0f') if v is not None else '?'}%" for t, v in shares.items()))
    if any(v is None or v > 0.05 for v in shares.values()):
        print("WARNING: the machine was not idle (or could not be checked); the times are not a fair "
              "comparison. Rerun on an otherwise idle machine (or at least with --threads 1).")
    print("checkpoints: " + "; ".join(
        f"{t} {_fmt(c['size_mib'], '.0f')} MiB (scales {'/'.join(c['scales'])}, "
        f"unquantized tensors {'/'.join(c['unquantized'])})"
        for t in TOOLS if (c := report["runs"][t].get("checkpoint"))))
    print(f"perplexity: {report['ppl_tokens']} held-out tokens, window {report['ppl_seq_len']}, float32, "
          f"both checkpoints read by qalora's load_quantized unless noted"
          + (f" (a model cut to {s['layers']} layers: a plumbing check, not a quality number)"
             if s["layers"] else ""))
    print(f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable); "
          f"torch threads per worker: {report['torch_threads']} "
          f"({'--threads ' + str(s['threads']) if s['threads'] else 'torch default'}), "
          f"GPTQMODEL_CPU_WORKERS={os.environ.get('GPTQMODEL_CPU_WORKERS')}")
    print(f"date: {report['date']}; torch {v['torch']}, transformers {v['transformers']}, "
          f"gptqmodel {v['gptqmodel']}, qalora {v['qalora']}")
    print(f"command: {report['command']}")
    if report["reused_quantized_runs"]:
        print("(quantize times, memory and checkpoints reused from an earlier run in the same folder)")
    print(f"JSON: {report['json']}")


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel's own thread pool on this 2-core box
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])

    hf_dir = prepare_model_folder(work, args.layers)
    spec = make_spec(args, work, hf_dir)
    prepare_calibration(spec)
    spec_path = work / "spec.json"
    if args.reuse_quantized:
        runs = reuse_runs(spec, spec_path, work)
    else:
        spec_path.write_text(json.dumps(spec, indent=2) + "\n")
        runs = {tool: run_worker(tool, spec, spec_path, work) for tool in TOOLS}  # one after the other

    print("perplexity ...", flush=True)
    ids = heldout_ids(hf_dir)
    ppl = {"unquantized": eval_perplexity(hf_dir, ids, args, unquantized=True)}
    for tool in TOOLS:
        if "error" not in runs[tool]:
            ppl[tool] = eval_perplexity(Path(runs[tool]["out_dir"]), ids, args)

    digests = {runs[t].get("calib_digest") for t in TOOLS}
    expected_digest = ids_digest(load_calibration(spec["calib_file"]))
    report = {
        "settings": {**{k: v for k, v in spec.items() if k != "work"}, "layers": args.layers},
        "runs": runs, "perplexity": ppl, "ratios": ratios(runs),
        "calib_digest": expected_digest,
        "calibration_ids_identical": (digests == {expected_digest}
                                      and all(runs[t].get("calib_equal") for t in TOOLS)),
        "ppl_tokens": args.ppl_tokens, "ppl_seq_len": args.ppl_seq_len,
        "torch_threads": sorted({runs[t].get("torch_threads") for t in TOOLS} - {None}),
        "machine": machine_info(), "versions": versions(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "reused_quantized_runs": args.reuse_quantized,
        "command": command, "json": str(work / "results.json"),
    }
    report["table"] = markdown_table(runs, ppl)
    (work / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_report(report)
    return 0 if all("error" not in runs[t] for t in TOOLS) else 1


if __name__ == "__main__":
    sys.exit(main())
