"""`qalora finetune`, top to bottom: set up (model, adapters, data, optimizer), measure the
untrained model, train, measure again, save the adapter. Resumable from any checkpoint.

Call `run(cfg, resume=...)` from code; the CLI is a thin layer over it. Multi-process data
parallelism comes from `accelerate launch` / `torchrun`: each process runs this same function.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from ..config.schema import RunConfig
from ..errors import UserError
from ..lora.adapter_io import (adapter_state, checkpoint_sha256, make_adapter_config, save_adapter)
from ..lora.inject import inject_qalora
from ..train.checkpoint import checkpoint_dirs, load_checkpoint, set_rng_state
from ..train.loop import Run, evaluate, train_loop
from ..train.optim import build_optimizer, build_scheduler, optimizer_name
from ..train.progress_bar import training_progress

REPORT_NAME = "finetune_report.json"
METRICS_NAME = "metrics.jsonl"
BASELINE_NAME = "baseline.json"


def run_paths(cfg: RunConfig) -> tuple[Path, Path]:
    """(the quantized checkpoint to train on, the adapter folder)."""
    base = Path(cfg.train.quantized_model or cfg.output.dir)
    adapter = Path(cfg.train.adapter_dir or f"{cfg.output.dir.rstrip('/')}-qalora")
    return base, adapter


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Decide, before any slow work, whether this run may use `run_dir`."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    finished = (run_dir / "adapter_config.json").is_file()
    has_ckpt = bool(checkpoint_dirs(run_dir))
    if resume:
        if not has_ckpt:
            raise UserError(f"nothing to resume: '{run_dir}' holds no checkpoint")
        return
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        what = "a finished adapter" if finished else ("an unfinished run (continue it with --resume)"
                                                       if has_ckpt else "files")
        raise UserError(f"adapter output '{run_dir}' already holds {what}; pass --overwrite to replace it")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"adapter output '{run_dir}' exists and is not a folder")


def _mixed_precision(choice: str, device: torch.device) -> str:
    if choice != "auto":
        if choice == "fp16" and device.type == "cpu":
            raise UserError("train.mixed_precision fp16 needs a GPU; use bf16 or no on the CPU")
        return choice
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" else "no"


def _accelerator(device: torch.device, mixed_precision: str):
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # The packed quantized weights are buffers: never re-broadcast them on every forward.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    if device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps one process-wide state and refuses a second Accelerator with another precision;
        # a recipe (or a test session) runs several fine-tunes in one process, so start each afresh.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision, kwargs_handlers=[ddp])


def _fingerprint(cfg: RunConfig, base_sha: str) -> dict:
    """What a resumed run must share with the run it continues."""
    return {"base_sha256": base_sha, "lora": cfg.lora.model_dump(mode="json"),
            "data": cfg.data.model_dump(mode="json"),
            "batch": {"batch_size": cfg.train.batch_size, "micro_batch_size": cfg.train.micro_batch_size,
                      "seed": cfg.train.seed}}


def _prepare_data(cfg: RunConfig, tokenizer):
    from ..data.instruct import load_records, pack_examples, tokenize_records

    train_rec, eval_rec, described = load_records(cfg.data)
    train, stats = tokenize_records(train_rec, tokenizer, cfg.data)
    held, _ = tokenize_records(eval_rec, tokenizer, cfg.data)
    if cfg.data.packing:
        train = pack_examples(train, cfg.data.max_length)
        stats["packed_sequences"] = len(train)
    return train, held, eval_rec, stats, described


def _exact_match(model, tokenizer, records, cfg: RunConfig, acc) -> dict | None:
    """Greedy answers to held-out prompts, compared with the references (main process only)."""
    n = min(cfg.train.exact_match_examples, len(records))
    if n == 0 or not acc.is_main_process:
        return None
    from ..data.instruct import prompt_and_reference
    from ..eval.exact_match import exact_match, generate_responses

    pairs = [prompt_and_reference(r, cfg.data.format, cfg.data.template, tokenizer) for r in records[:n]]
    model.eval()
    with acc.autocast():
        preds = generate_responses(model, tokenizer, [p for p, _ in pairs], cfg.train.max_new_tokens,
                                   device=acc.device)
    model.train()
    return {"examples": n, "exact_match": exact_match(preds, [r for _, r in pairs]),
            "samples": [{"prompt": p, "reference": r, "prediction": y} for (p, r), y in list(zip(pairs, preds))[:3]]}


def run(cfg: RunConfig, resume: bool = False, overwrite: bool = False, show_progress: bool = True) -> dict:
    from ..device import resolve_device
    from ..models.quantized_io import load_quantized

    t0 = time.perf_counter()
    t = cfg.train
    base_dir, run_dir = run_paths(cfg)
    check_run_dir(run_dir, resume, overwrite)
    device = resolve_device(t.device)
    if not (base_dir / "config.json").is_file():
        raise UserError(f"no quantized model at '{base_dir}': run `qalora quantize` first or pass --model")
    acc = _accelerator(device, _mixed_precision(t.mixed_precision, device))
    world = acc.num_processes
    if (t.batch_size // t.micro_batch_size) % world:
        raise UserError(f"train.batch_size {t.batch_size} / micro_batch_size {t.micro_batch_size} micro-batches "
                        f"cannot be shared by {world} processes; make it a multiple of {world}")

    # 1. The frozen quantized model, with adapters around its quantized layers
    model_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision, torch.float32) \
        if acc.device.type == "cuda" else torch.float32
    model, qc = load_quantized(base_dir, acc.device, model_dtype)
    from ..models.loading import load_tokenizer

    tokenizer = load_tokenizer(base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    base_sha = checkpoint_sha256(base_dir)
    torch.manual_seed(t.seed)  # the same adapter initialization on every process
    adapters = inject_qalora(model, cfg.lora)
    # Where the adapters start (lora.init); before anything is written, so a refusal leaves nothing behind.
    # A resumed run takes its adapters from the checkpoint instead.
    from ..lora.init_stats import initialize_adapters

    init_report = {"method": cfg.lora.init, "resumed": True} if resume else \
        initialize_adapters(cfg, base_dir, adapters, note=_note if acc.is_main_process else None)
    from ..kernels.registry import use_backend

    kernels = use_backend(model, t.kernel, model_dtype, need_grad=True)
    if acc.is_main_process:
        print(kernels.summary(), file=sys.stderr)
    if t.gradient_checkpointing:  # transformers 5 renamed it; 4.x has only the old name
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    params = [p for m in adapters.values() for p in (m.lora_A, m.lora_B)]

    # 2. Data
    train, held, eval_records, data_stats, described = _prepare_data(cfg, tokenizer)
    if not held:
        raise UserError("the held-out split has no usable example (all too long?); adjust data.eval_fraction "
                        "or data.max_length")

    # 3. Optimizer, schedule, the loss module (DDP-wrapped when distributed)
    from ..train.loss import ResponseLoss

    optimizer, opt_name = build_optimizer(params, t, acc.device)
    scheduler = build_scheduler(optimizer, t)
    loss_model, optimizer = acc.prepare(ResponseLoss(model), optimizer)
    fingerprint = _fingerprint(cfg, base_sha)
    start_step = 0
    if resume:
        start_step = _restore(run_dir, fingerprint, adapters, optimizer, scheduler, acc)
    elif acc.is_main_process:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # --overwrite, checked above
        run_dir.mkdir(parents=True)
    acc.wait_for_everyone()

    # 4. The untrained model (lora.init zero: B = 0, exactly the quantized base), measured once per run
    baseline_path = run_dir / BASELINE_NAME
    run_obj = Run(acc, loss_model, lambda: adapter_state(adapters), params, optimizer, scheduler, train, held,
                  t, run_dir, pad_id, fingerprint, start_step)
    if not resume:
        baseline = {"eval_loss": evaluate(run_obj), "generation": _exact_match(model, tokenizer, eval_records,
                                                                               cfg, acc)}
        if acc.is_main_process:
            baseline_path.write_text(json.dumps(baseline, indent=1) + "\n")
    acc.wait_for_everyone()
    baseline = json.loads(baseline_path.read_text())
    t_setup = time.perf_counter()

    # 5. Train
    with training_progress(t.max_steps, start_step, enabled=show_progress and acc.is_main_process) as progress:
        outcome = train_loop(run_obj, progress)
    t_train = time.perf_counter()

    report = {
        "base": str(base_dir), "adapter": str(run_dir), "data": described, "data_stats": data_stats,
        "train_examples": len(train), "eval_examples": len(held), "processes": world,
        "device": str(acc.device), "mixed_precision": acc.mixed_precision, "optimizer": opt_name,
        "gradient_checkpointing": _checkpointing_on(model),
        "steps": outcome["step"], "resumed_from": start_step or None, "interrupted": outcome["interrupted"],
        "init": dict(init_report, step0_eval_loss=baseline["eval_loss"]),
        "before": baseline,
        "seconds": {"setup": round(t_setup - t0, 2), "train": round(t_train - t_setup, 2)},
        "tokens_per_s": run_obj.metrics[-1]["tokens_per_s"] if run_obj.metrics else None,
        "peak_memory_mib": _peak_memory_mib(acc.device),
    }
    if outcome["interrupted"]:
        return report

    # 6. The trained model, then the adapter, written so that a crash never leaves half of it
    # (a resumed run whose checkpoint was its last step trains nothing more: evaluate here)
    last_eval = run_obj.metrics[-1].get("eval_loss") if run_obj.metrics else None
    if outcome["step"] == 0:  # --max-steps 0: the initialized adapter, already measured
        report["after"] = baseline
    else:
        report["after"] = {"eval_loss": last_eval if last_eval is not None else evaluate(run_obj),
                           "generation": _exact_match(model, tokenizer, eval_records, cfg, acc)}
    report["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    if acc.is_main_process:
        config = make_adapter_config(cfg.lora, adapters, qc, base_dir, base_sha, _base_model(base_dir),
                                     cfg.data.model_dump(mode="json"))
        _write_final(run_dir, adapters, config, report)
    acc.wait_for_everyone()
    return report


def _restore(run_dir: Path, fingerprint: dict, adapters, optimizer, scheduler, acc) -> int:
    latest = checkpoint_dirs(run_dir)[-1]
    state, tensors, opt_state, rng = load_checkpoint(latest)
    if state.get("base_sha256") != fingerprint["base_sha256"]:
        raise UserError(f"cannot resume: the checkpoint '{latest}' was trained on another model "
                        f"(sha256 {str(state.get('base_sha256'))[:12]}..., now {fingerprint['base_sha256'][:12]}...)")
    for key in ("lora", "data", "batch"):
        if state.get(key) != fingerprint[key]:
            had = state.get(key) if isinstance(state.get(key), dict) else {}
            changed = sorted(k for k in fingerprint[key] if had.get(k) != fingerprint[key][k])
            raise UserError(f"cannot resume: {key} settings differ from the checkpoint's ({', '.join(changed)}); "
                            "resume with the same config")
    if rng.shape[0] != acc.num_processes:
        raise UserError(f"cannot resume: the checkpoint was made by {rng.shape[0]} process(es), this run has "
                        f"{acc.num_processes}")
    try:  # what the checkpoint's files hold must fit this run's adapters, optimizer and schedule
        with torch.no_grad():
            for name, m in adapters.items():
                a, b = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
                if a.shape != m.lora_A.shape or b.shape != m.lora_B.shape or not (a.is_floating_point()
                                                                                   and b.is_floating_point()):
                    raise ValueError(f"the adapter of {name} is {a.dtype} {tuple(a.shape)} / {tuple(b.shape)}")
                m.lora_A.copy_(a)
                m.lora_B.copy_(b)
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(dict(state["scheduler"], lr_lambdas=[None] * len(scheduler.lr_lambdas)))
        set_rng_state(rng[acc.process_index])
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        raise UserError(f"checkpoint '{latest}' is damaged or does not fit this run "
                        f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); delete it to resume from the one "
                        "before") from e
    step = state["step"]
    if acc.is_main_process:  # the metrics log continues from the checkpoint, as one curve
        log = run_dir / METRICS_NAME
        if log.is_file():
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if _logged_step(ln) <= step]
            log.write_text("".join(ln + "\n" for ln in lines))
    return step


def _logged_step(line: str) -> float:
    """A metrics.jsonl line's step; a damaged line (a write cut short) is dropped as if after the end."""
    try:
        step = json.loads(line)["step"]
        return step if isinstance(step, int) else float("inf")
    except (ValueError, TypeError, KeyError):
        return float("inf")


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _checkpointing_on(model) -> bool:
    if hasattr(model, "is_activation_checkpointing"):  # transformers 5
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def _base_model(base_dir: Path) -> str:
    cfg = json.loads((base_dir / "config.json").read_text())
    return cfg.get("_name_or_path") or cfg.get("model_type", "unknown")


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_final(run_dir: Path, adapters, config: dict, report: dict) -> None:
    """Weights first, config last: a folder with adapter_config.json holds a whole adapter."""
    tmp = run_dir / ".final.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_adapter(tmp, adapters, config)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
    except Exception as e:
        from ..output_dir import disk_full_error, folder_bytes, is_disk_full

        written = folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            needs = sum(p.numel() * 4 for m in adapters.values() for p in (m.lora_A, m.lora_B))
            raise disk_full_error(run_dir / "adapter_model.safetensors", written, needs) from e
        raise
    for name in ("adapter_model.safetensors", REPORT_NAME, "adapter_config.json"):
        os.replace(tmp / name, run_dir / name)
    tmp.rmdir()
