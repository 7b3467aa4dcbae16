"""The worker process of scripts/bench_quantize_vs_gptqmodel.py: quantizes with one tool, in a
fresh interpreter started by the parent, and writes its measures as JSON:

    bench_quantize_workers.py {qalora,gptqmodel} SPEC_JSON RESULT_JSON
"""

from __future__ import annotations

import time

T_PROCESS = time.perf_counter()  # a worker's "total" starts here, before the heavy imports

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from bench_quantize_inputs import ids_digest, load_calibration, qalora_config  # noqa: E402


def peak_rss_mib() -> float:
    """High-water resident memory of this process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class Stopwatch:
    """Accumulated seconds of one or more calls, wrapped around a function."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


def worker_qalora(spec: dict) -> dict:
    """qalora's real `recipes.quantize.run`, with three of its module-level helpers wrapped
    (not replaced) to time the quantize step and to capture the calibration ids it draws."""
    import torch

    import qalora_cli.recipes.quantize as recipe

    expected = load_calibration(spec["calib_file"])
    out_dir = Path(spec["work"]) / "q-qalora"
    cfg = qalora_config(spec, out_dir)
    captured = {}

    def capture_calibration(c, tokenizer, _orig=recipe.calibration_batches):
        captured["ids"] = _orig(c, tokenizer)
        return captured["ids"]

    # The quantize step = calibration forwards + GPTQ (quantize_model) + packing into
    # QuantLinear layers (install_quant_linears): what GPTQModel's `quantize()` also does.
    gptq_time, pack_time = Stopwatch(), Stopwatch()
    recipe.calibration_batches = capture_calibration
    recipe.quantize_model = gptq_time.wrap(recipe.quantize_model)
    recipe.install_quant_linears = pack_time.wrap(recipe.install_quant_linears)

    t0 = time.perf_counter()
    report = recipe.run(cfg, show_progress=False)
    t_end = time.perf_counter()
    ids = captured["ids"]
    return {
        "quantize_s": gptq_time.seconds + pack_time.seconds,
        "phases_s": {"gptq": gptq_time.seconds, "pack": pack_time.seconds, "run_total": t_end - t0,
                     "imports": t0 - T_PROCESS, "qalora_report": report["seconds"]},
        "total_s": t_end - T_PROCESS,
        "calib_digest": ids_digest(ids),
        "calib_equal": bool(ids.shape == expected.shape and torch.equal(ids, expected)),
        "calib_batches": [len(b) for b in ids.split(spec["batch_size"])],
        "settings": {"quantize": cfg.quantize.model_dump(), "model_dtype": cfg.model.dtype,
                     "output_dtype": cfg.output.dtype},
        "out_dir": str(out_dir),
    }


def gptqmodel_quantize_config(spec: dict):
    from gptqmodel import QuantizeConfig

    return QuantizeConfig(
        method="gptq", format="gptq",  # GPTQ v1 checkpoint: qzeros stored as z - 1
        bits=spec["bits"], group_size=spec["group_size"], sym=spec["sym"],
        desc_act=spec["act_order"],
        # GPTQModel 7.6 turns on group-aware activation reordering (GAR) for GPTQ by default;
        # qalora has no such step, so it is switched off to run the same algorithm.
        act_group_aware=False,
        static_groups=False, damp_percent=spec["damp_percent"], true_sequential=spec["true_sequential"],
        mse=0.0,  # plain min/max grid, as qalora
        # Default: RTN for modules that see < 0.5% of the calibration tokens (MoE); a dense
        # model never triggers it, but None makes "GPTQ everywhere" explicit.
        fallback=None,
        lm_head=False, device="cpu",
        # Default True: finished layers are written to a temp dir to save RAM. qalora keeps
        # the model in memory, so by default GPTQModel does too.
        offload_to_disk=spec["gptqmodel_offload_to_disk"],
    )


def worker_gptqmodel(spec: dict) -> dict:
    import torch
    from gptqmodel import GPTQModel

    ids = load_calibration(spec["calib_file"])
    out_dir = Path(spec["work"]) / "q-gptqmodel"
    qcfg = gptqmodel_quantize_config(spec)
    t0 = time.perf_counter()
    # No device= here: GPTQModel refuses it when QuantizeConfig.device is set (it always loads
    # the float model on CPU). dtype must be given: "auto" may pick bfloat16 on CPU.
    model = GPTQModel.load(spec["hf_dir"], qcfg, dtype=getattr(torch, spec["dtype"]))
    t_loaded = time.perf_counter()

    # Capture what GPTQModel actually batches, to check that it quantizes exactly our ids.
    seen = {}
    orig_prepare = model.prepare_dataset

    def capture_prepare(*a, **kw):
        seen["batches"] = orig_prepare(*a, **kw)
        return seen["batches"]

    model.prepare_dataset = capture_prepare
    calibration = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    t_q0 = time.perf_counter()
    # calibration_sort=None keeps our order (the default "desc" sorts by length; all are equal).
    model.quantize(calibration, batch_size=spec["batch_size"], calibration_sort=None)
    t_q1 = time.perf_counter()
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save(str(out_dir))
    t_end = time.perf_counter()

    batches = seen.get("batches") or []
    fed = torch.cat([b["input_ids"] for b in batches]) if batches else torch.empty(0, dtype=torch.long)
    masks_all_one = all(bool(b["attention_mask"].all()) for b in batches if "attention_mask" in b)
    return {
        "quantize_s": t_q1 - t_q0,
        "phases_s": {"imports": t0 - T_PROCESS, "load": t_loaded - t0, "save": t_end - t_q1},
        "total_s": t_end - T_PROCESS,
        "calib_digest": ids_digest(fed) if fed.numel() else None,
        "calib_equal": bool(fed.shape == ids.shape and torch.equal(fed, ids) and masks_all_one),
        "calib_batches": [len(b["input_ids"]) for b in batches],
        "settings": {"quantize_config": json.loads(json.dumps(qcfg.to_dict(), default=str)),
                     "model_dtype": str(model.model.dtype),
                     "support_batch_quantize": bool(getattr(model, "support_batch_quantize", True))},
        "out_dir": str(out_dir),
    }


def checkpoint_facts(folder: Path) -> dict:
    """Size and tensor dtypes of a saved checkpoint: the tools need not store the unquantized
    tensors (embeddings, norms) alike, which shows in size and slightly in perplexity."""
    from safetensors import safe_open

    dtypes: dict[str, set] = {"scales": set(), "unquantized": set()}
    files = sorted(folder.glob("model*.safetensors"))
    for f in files:
        with safe_open(f, "pt") as sf:
            for key in sf.keys():
                kind = key.rsplit(".", 1)[-1]
                if kind == "scales":
                    dtypes["scales"].add(sf.get_slice(key).get_dtype())
                elif kind not in ("qweight", "qzeros", "g_idx"):
                    dtypes["unquantized"].add(sf.get_slice(key).get_dtype())
    return {"size_mib": sum(f.stat().st_size for f in files) / 2**20,
            **{k: sorted(v) for k, v in dtypes.items()}}


WORKERS = {"qalora": worker_qalora, "gptqmodel": worker_gptqmodel}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tool", choices=WORKERS)
    p.add_argument("spec")
    p.add_argument("result")
    args = p.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])

    result = WORKERS[args.tool](spec)
    result.update(tool=args.tool, peak_rss_mib=peak_rss_mib(), torch_threads=torch.get_num_threads(),
                  checkpoint=checkpoint_facts(Path(result["out_dir"])))
    Path(args.result).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
