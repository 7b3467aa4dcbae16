"""`qalora finetune`, top to bottom: set up (model, adapters, data, optimizer), measure the
untrained model, train, measure again, save the adapter. Resumable from any checkpoint. The
same recipe trains QA-LoRA and the paper's baselines (finetune.method qlora, lora).

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
from ..errors import UserError, first_line
from ..memory import peak_memory_mib
from ..output_dir import discard, set_aside, sweep_stale
from ..train.checkpoint import checkpoint_dirs, load_checkpoint, set_rng_state, trainer_state
from ..train.loop import Run, evaluate, train_loop
from ..train.optim import build_optimizer, build_scheduler
from ..train.precision import resolve_mixed_precision
from ..train.progress_bar import training_progress

REPORT_NAME = "finetune_report.json"
METRICS_NAME = "metrics.jsonl"
BASELINE_NAME = "baseline.json"


def run_paths(cfg: RunConfig) -> tuple[Path, Path]:
    """(the quantized checkpoint QA-LoRA trains on, the adapter folder: output.dir + '-qalora',
    '-qlora' or '-lora' by default)."""
    base = Path(cfg.train.quantized_model or cfg.output.dir)
    adapter = Path(cfg.train.adapter_dir or f"{cfg.output.dir.rstrip('/')}-{cfg.finetune.method}")
    return base, adapter


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Decide, before any slow work, whether this run may use `run_dir`."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    # a killed --overwrite: a finished earlier adapter comes back (the new run goes); anything less keeps the new run
    sweep_stale(run_dir, finished=_finished, resumable=lambda d: bool(checkpoint_dirs(d)))
    finished = _finished(run_dir)
    has_ckpt = bool(checkpoint_dirs(run_dir))
    if resume:
        if not has_ckpt:  # finished: e.g. a killed --overwrite, undone by the sweep above
            held = ("a finished adapter (an interrupted --overwrite leaves the earlier one in place); pass "
                    "--overwrite to train again") if finished else "no checkpoint"
            raise UserError(f"nothing to resume: '{run_dir}' holds {held}")
        return
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        what = "a finished adapter" if finished else ("an unfinished run (continue it with --resume)"
                                                       if has_ckpt else "files")
        raise UserError(f"adapter output '{run_dir}' already holds {what}; pass --overwrite to replace it")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"adapter output '{run_dir}' exists and is not a folder")


def _finished(run_dir: Path) -> bool:
    return (run_dir / "adapter_config.json").is_file()


def _mixed_precision(choice: str, device: torch.device) -> str:
    if choice == "fp16" and device.type == "cpu":
        raise UserError("train.mixed_precision fp16 needs a GPU; use bf16 or no on the CPU")
    return resolve_mixed_precision(choice, device.type)


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
    """What a resumed run must share with the run it continues (a QA-LoRA checkpoint records
    no method: it is the one there was before qlora and lora)."""
    method = {} if cfg.finetune.method == "qalora" else {"method": cfg.finetune.method}
    return {"base_sha256": base_sha, **method, "lora": cfg.lora.model_dump(mode="json"),
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
    """Fine-tune as `cfg` says (finetune.method qalora, qlora or lora); -> the run's report."""
    return FinetuneRecipe(cfg, resume, overwrite, show_progress).run()


class FinetuneRecipe:
    """setup (checks, accelerator, model and adapters, data, optimizer, resumed state), the
    untrained model's measure, train, the trained model's measure, save. One loop and one
    evaluation for every method; only the Trainee (train/trainees.py) differs."""

    def __init__(self, cfg: RunConfig, resume: bool = False, overwrite: bool = False, show_progress: bool = True):
        self.cfg, self.resume, self.overwrite, self.show_progress = cfg, resume, overwrite, show_progress
        self.t0 = time.perf_counter()

    def run(self) -> dict:
        self.setup()
        baseline = self.measure_baseline()
        t_setup = time.perf_counter()
        outcome = self.train()
        report = self.report(outcome, baseline, t_setup)
        if outcome["interrupted"]:  # Ctrl-C: the new run is kept to --resume, the one it replaces goes
            self.drop_replaced()
            return report
        report["after"] = self.evaluate(outcome["step"], baseline)
        report["seconds"]["total"] = round(time.perf_counter() - self.t0, 2)
        self.save(report)
        return report

    def setup(self) -> None:
        """Every refusal first (nothing written), then the slow part."""
        from ..device import resolve_device
        from ..train.trainees import build_trainee, check_method_inputs

        t = self.cfg.train
        self.base_dir, self.run_dir = run_paths(self.cfg)
        check_run_dir(self.run_dir, self.resume, self.overwrite)
        device = resolve_device(t.device)
        check_method_inputs(self.cfg, self.base_dir)
        self.acc = acc = _accelerator(device, _mixed_precision(t.mixed_precision, device))
        if (t.batch_size // t.micro_batch_size) % acc.num_processes:
            raise UserError(f"train.batch_size {t.batch_size} / micro_batch_size {t.micro_batch_size} micro-batches "
                            f"cannot be shared by {acc.num_processes} processes; make it a multiple of "
                            f"{acc.num_processes}")
        self.choose_init()
        self.trainee = build_trainee(self.cfg, acc, self.base_dir, self.resume)
        if self.auto_init and acc.is_main_process:
            # said once the setup's refusals are past, so that each of them stays one line
            print(f"lora.init auto -> {self.cfg.lora.init}: {self.auto_init}", file=sys.stderr, flush=True)
        self.model = self.trainee.model
        _set_checkpointing(self.model, t.gradient_checkpointing)
        self.model.config.use_cache = False
        self.setup_data()
        self.setup_optimizer()

    def choose_init(self) -> None:
        """lora.init auto: the concrete init it stands for here, in the config from now on (the
        checkpoints' fingerprint, the report)."""
        self.auto_init = None
        if self.cfg.lora.init != "auto":
            return
        from ..lora.init_choice import auto_init

        latest = checkpoint_dirs(self.run_dir)[-1:] if self.resume else []
        init, why = auto_init(self.cfg.finetune.method, self.base_dir, _state_or_none(latest))
        self.cfg = self.cfg.model_copy(update={"lora": self.cfg.lora.model_copy(update={"init": init})})
        self.auto_init = why

    def setup_data(self) -> None:
        tok = self.trainee.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.train_set, self.held, self.eval_records, self.data_stats, self.described = _prepare_data(self.cfg, tok)
        if not self.held:
            raise UserError("the held-out split has no usable example (all too long?); adjust data.eval_fraction "
                            "or data.max_length")

    def setup_optimizer(self) -> None:
        """Optimizer, schedule and the loss module (DDP-wrapped when distributed); then the
        checkpoint's state on --resume, or a fresh run folder."""
        from ..train.loss import ResponseLoss

        acc, t, trainee = self.acc, self.cfg.train, self.trainee
        optimizer, self.opt_name = build_optimizer(trainee.params, t, acc.device)
        scheduler = build_scheduler(optimizer, t)
        loss_model, optimizer = acc.prepare(ResponseLoss(self.model), optimizer)
        fingerprint = _fingerprint(self.cfg, trainee.base_sha256)
        self.start_step, self.replaced = 0, None
        if self.resume:
            self.start_step = _restore(self.run_dir, fingerprint, trainee, optimizer, scheduler, acc)
        elif acc.is_main_process:
            if self.run_dir.exists():  # --overwrite, checked above: the earlier run is kept aside until
                self.replaced = set_aside(self.run_dir)  # this one is saved (a kill -9 gives it back)
            self.run_dir.mkdir(parents=True)
        acc.wait_for_everyone()
        self.loop = Run(acc, loss_model, trainee.adapter_tensors, trainee.params, optimizer, scheduler,
                        self.train_set, self.held, t, self.run_dir, self.pad_id, fingerprint, self.start_step)

    def measure_baseline(self) -> dict:
        """The untrained model (B = 0: the base itself, or where lora.init put it), measured once per
        run and kept in the run folder, so a resumed run reports the same 'before'."""
        path = self.run_dir / BASELINE_NAME
        if not self.resume:
            baseline = {"eval_loss": evaluate(self.loop), "generation": self.exact_match()}
            if self.acc.is_main_process:
                path.write_text(json.dumps(baseline, indent=1) + "\n")
        self.acc.wait_for_everyone()
        return json.loads(path.read_text())

    def exact_match(self) -> dict | None:
        return _exact_match(self.model, self.trainee.tokenizer, self.eval_records, self.cfg, self.acc)

    def train(self) -> dict:
        enabled = self.show_progress and self.acc.is_main_process
        with training_progress(self.cfg.train.max_steps, self.start_step, enabled=enabled) as progress:
            return train_loop(self.loop, progress)

    def evaluate(self, steps: int, baseline: dict) -> dict:
        """The trained model. A resumed run whose checkpoint was its last step trains nothing
        more: its loss is measured here; --max-steps 0 keeps the initialized adapter, measured."""
        if steps == 0:
            return baseline
        last_eval = self.loop.metrics[-1].get("eval_loss") if self.loop.metrics else None
        return {"eval_loss": last_eval if last_eval is not None else evaluate(self.loop),
                "generation": self.exact_match()}

    def report(self, outcome: dict, baseline: dict, t_setup: float) -> dict:
        acc, trainee, metrics = self.acc, self.trainee, self.loop.metrics
        return {
            "method": self.cfg.finetune.method, "base": trainee.base, "adapter": str(self.run_dir),
            "data": self.described, "data_stats": self.data_stats, "train_examples": len(self.train_set),
            "eval_examples": len(self.held), "processes": acc.num_processes, "device": str(acc.device),
            "mixed_precision": acc.mixed_precision, "optimizer": self.opt_name,
            "gradient_checkpointing": _checkpointing_on(self.model), **trainee.report(),
            "steps": outcome["step"], "resumed_from": self.start_step or None, "interrupted": outcome["interrupted"],
            "init": dict(trainee.init_report, step0_eval_loss=baseline["eval_loss"],
                         **({"auto": self.auto_init} if self.auto_init else {})), "before": baseline,
            "seconds": {"setup": round(t_setup - self.t0, 2), "train": round(time.perf_counter() - t_setup, 2)},
            "tokens_per_s": metrics[-1]["tokens_per_s"] if metrics else None,
            "peak_memory_mib": peak_memory_mib(acc.device),
        }

    def save(self, report: dict) -> None:
        """The adapter and the report, written so that a crash never leaves half of them."""
        if self.acc.is_main_process:
            _write_final(self.run_dir, self.trainee, self.cfg.data.model_dump(mode="json"), report)
            self.drop_replaced()
        self.acc.wait_for_everyone()

    def drop_replaced(self) -> None:
        if self.replaced is not None:
            discard(self.replaced, of=self.run_dir)
            self.replaced = None


def _restore(run_dir: Path, fingerprint: dict, trainee, optimizer, scheduler, acc) -> int:
    """The last checkpoint's adapters, optimizer, schedule and RNG; -> its step."""
    latest = checkpoint_dirs(run_dir)[-1]
    state, tensors, opt_state, rng = load_checkpoint(latest)
    _check_fingerprint(latest, state, fingerprint)
    if rng.shape[0] != acc.num_processes:
        raise UserError(f"cannot resume: the checkpoint was made by {rng.shape[0]} process(es), this run has "
                        f"{acc.num_processes}")
    try:  # what the checkpoint's files hold must fit this run's adapters, optimizer and schedule
        trainee.load_adapter_tensors(tensors)
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(dict(state["scheduler"], lr_lambdas=[None] * len(scheduler.lr_lambdas)))
        set_rng_state(rng[acc.process_index])
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        raise UserError(f"checkpoint '{latest}' is damaged or does not fit this run "
                        f"({type(e).__name__}: {first_line(e)}); delete it to resume from the one "
                        "before") from e
    step = state["step"]
    if acc.is_main_process:  # the metrics log continues from the checkpoint, as one curve
        _truncate_metrics(run_dir / METRICS_NAME, step)
    return step


def _check_fingerprint(latest: Path, state: dict, fingerprint: dict) -> None:
    if state.get("method", "qalora") != fingerprint.get("method", "qalora"):
        raise UserError(f"cannot resume: the checkpoint '{latest}' is of finetune.method "
                        f"{state.get('method', 'qalora')}, this run's is {fingerprint.get('method', 'qalora')}")
    if state.get("base_sha256") != fingerprint["base_sha256"]:
        raise UserError(f"cannot resume: the checkpoint '{latest}' was trained on another model "
                        f"(sha256 {str(state.get('base_sha256'))[:12]}..., now {fingerprint['base_sha256'][:12]}...)")
    for key in ("lora", "data", "batch"):
        if state.get(key) != fingerprint[key]:
            had = state.get(key) if isinstance(state.get(key), dict) else {}
            changed = sorted(k for k in fingerprint[key] if had.get(k) != fingerprint[key][k])
            raise UserError(f"cannot resume: {key} settings differ from the checkpoint's ({', '.join(changed)}); "
                            "resume with the same config")


def _state_or_none(latest: list[Path]) -> dict | None:
    """The trainer state of the checkpoint in `latest` (none: None); unreadable: None, as
    _restore then says what is wrong with it."""
    try:
        return trainer_state(latest[0]) if latest else None
    except (OSError, ValueError):
        return None


def _truncate_metrics(log: Path, step: int) -> None:
    if log.is_file():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if _logged_step(ln) <= step]
        log.write_text("".join(ln + "\n" for ln in lines))


def _logged_step(line: str) -> float:
    """A metrics.jsonl line's step; a damaged line (a write cut short) is dropped as if after the end."""
    try:
        step = json.loads(line)["step"]
        return step if isinstance(step, int) else float("inf")
    except (ValueError, TypeError, KeyError):
        return float("inf")


def _set_checkpointing(model, on: bool) -> None:
    if not on:
        return
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed it; 4.x has only the old name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _checkpointing_on(model) -> bool:
    if hasattr(model, "is_activation_checkpointing"):  # transformers 5
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def _write_final(run_dir: Path, trainee, data: dict, report: dict) -> None:
    """Weights first, config last: a folder with adapter_config.json holds a whole adapter."""
    tmp = run_dir / ".final.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        trainee.write_adapter(tmp, data)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
    except Exception as e:
        from ..output_dir import disk_full_error, folder_bytes, is_disk_full

        written = folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            needs = sum(p.numel() * 4 for p in trainee.params)
            raise disk_full_error(run_dir / "adapter_model.safetensors", written, needs) from e
        raise
    names = sorted(p.name for p in tmp.iterdir() if p.name != "adapter_config.json") + ["adapter_config.json"]
    for name in names:
        os.replace(tmp / name, run_dir / name)
    tmp.rmdir()
