"""The fine-tuning loop, top to bottom: for each step, run the step's micro-batches (this
process's share), all-reduce, clip, step, schedule; evaluate, log and checkpoint every N steps.
Interrupts (Ctrl-C) finish the current step, save, and return; a non-finite loss stops the run
before the optimizer can apply it, keeping the last good checkpoint.
"""

from __future__ import annotations

import json
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..config.schema import TrainSection
from ..data.instruct import Example, collate
from ..errors import UserError
from .batches import epoch_of, micro_batches_for
from .checkpoint import rng_state, save_checkpoint


@dataclass
class Run:
    """Everything the loop touches, set up by recipes/finetune."""
    accelerator: object
    loss_model: torch.nn.Module          # ResponseLoss, wrapped by accelerate (DDP when distributed)
    adapter_tensors: callable            # -> {name.lora_A|B: tensor} for checkpoints
    params: list[torch.nn.Parameter]
    optimizer: object
    scheduler: object
    train: list[Example]
    eval: list[Example]
    t: TrainSection
    run_dir: Path
    pad_id: int
    info: dict                           # what a checkpoint must record to be resumed safely
    start_step: int = 0
    metrics: list[dict] = field(default_factory=list)


class _Interrupt:
    """Ctrl-C sets a flag; the loop saves after the current step. A second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)


def _all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def evaluate(run: Run) -> float:
    """Token-weighted loss on the held-out examples, shared across processes."""
    acc = run.accelerator
    model = run.loss_model
    model.eval()
    total, tokens = 0.0, 0
    mine = run.eval[acc.process_index::acc.num_processes]
    size = 2 * run.t.micro_batch_size
    with torch.no_grad():
        for i in range(0, len(mine), size):
            batch = collate(mine[i:i + size], run.pad_id)
            n = int((batch["labels"][:, 1:] != -100).sum())
            with acc.autocast():
                total += float(model(**{k: v.to(acc.device) for k, v in batch.items()}, denominator=1.0))
            tokens += n
    total, tokens = _all_sum([total, tokens], acc.device)
    model.train()
    return total / max(tokens, 1)


@dataclass
class _Tally:
    """What the loop carries from step to step besides the step number."""
    last_saved: int
    train_seconds: float = 0.0  # training throughput: evaluation and saving not counted
    tokens_seen: int = 0


def train_loop(run: Run, progress) -> dict:
    """Steps from run.start_step to t.max_steps; -> {"interrupted", "step"}."""
    t = run.t
    lengths = [len(e.input_ids) for e in run.train]
    tally = _Tally(last_saved=run.start_step)
    run.loss_model.train()
    step = run.start_step
    with _Interrupt() as interrupt:
        while step < t.max_steps:
            started = time.perf_counter()
            micro, step_tokens = _micro_batches(run, step, lengths)
            step_loss = _forward_backward(run, micro, step_tokens, tally)
            _refuse_non_finite(run, step_loss, step, tally.last_saved)
            grad_norm, lr = _update(run)
            step += 1
            tally.train_seconds += time.perf_counter() - started
            _log(run, progress, _record(run, step, step_loss, lr, grad_norm, tally))
            stop = _agreed_stop(run, interrupt.requested)
            if step % t.save_every == 0 or step == t.max_steps or stop:
                save(run, step)
                tally.last_saved = step
            if stop:
                return {"interrupted": True, "step": step}
    return {"interrupted": False, "step": step}


def _micro_batches(run: Run, step: int, lengths: list[int]) -> tuple[list[dict], float]:
    """This process's micro-batches of the step, and the step's response-token count over all processes."""
    acc, t = run.accelerator, run.t
    micro = [collate([run.train[i] for i in mb], run.pad_id)
             for mb in micro_batches_for(step, lengths, t.batch_size, t.micro_batch_size, t.seed,
                                         acc.process_index, acc.num_processes)]
    local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    (step_tokens,) = _all_sum([local_tokens], acc.device)
    return micro, step_tokens


def _forward_backward(run: Run, micro: list[dict], step_tokens: float, tally: _Tally) -> float:
    """Gradients of the step's per-token mean loss (synchronized only on the last micro-batch);
    -> that loss over all processes."""
    acc = run.accelerator
    # DDP averages gradients over processes; scale so the result is the per-token mean.
    denominator = max(step_tokens, 1.0) / acc.num_processes
    loss_sum = 0.0
    for i, batch in enumerate(micro):
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        sync = i == len(micro) - 1
        with (nullcontext() if sync else acc.no_sync(run.loss_model)), acc.autocast():
            loss = run.loss_model(**batch, denominator=denominator)
            acc.backward(loss)
        loss_sum += float(loss.detach()) * denominator
        tally.tokens_seen += int(batch["attention_mask"].sum())
    (global_loss_sum,) = _all_sum([loss_sum], acc.device)
    return global_loss_sum / max(step_tokens, 1.0)


def _refuse_non_finite(run: Run, step_loss: float, step: int, last_saved: int) -> None:
    """Before the optimizer could apply it: the last checkpoint stays the last good one."""
    if torch.isfinite(torch.tensor(step_loss)):
        return
    run.accelerator.wait_for_everyone()
    kept = f"the last good checkpoint is step {last_saved}" if last_saved else "no checkpoint was saved"
    raise UserError(f"the loss became {step_loss} at step {step + 1}; the update was not applied and "
                    f"{kept} in '{run.run_dir}'; lower train.learning_rate or train.max_grad_norm")


def _update(run: Run) -> tuple[float, float]:
    """Clip, step, schedule; -> (gradient norm before clipping, the learning rate applied)."""
    grad_norm = float(run.accelerator.clip_grad_norm_(run.params, run.t.max_grad_norm))
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def _record(run: Run, step: int, loss: float, lr: float, grad_norm: float, tally: _Tally) -> dict:
    """The step's metrics line; the held-out loss every eval_every steps and at the end."""
    (all_tokens,) = _all_sum([tally.tokens_seen], run.accelerator.device)
    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
              "epoch": round(epoch_of(step, len(run.train), run.t.batch_size), 4),
              "tokens_per_s": all_tokens / tally.train_seconds}
    if step % run.t.eval_every == 0 or step == run.t.max_steps:
        record["eval_loss"] = evaluate(run)
    return record


def _log(run: Run, progress, record: dict) -> None:
    run.metrics.append(record)
    if run.accelerator.is_main_process:
        with open(run.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        progress(record["step"], record)


def _agreed_stop(run: Run, requested: bool) -> bool:
    """Every process must agree to stop at the same step."""
    if run.accelerator.num_processes == 1:
        return requested
    (stop,) = _all_sum([float(requested)], run.accelerator.device)
    return stop > 0


def save(run: Run, step: int) -> None:
    acc = run.accelerator
    rng = acc.gather(rng_state().to(acc.device).unsqueeze(0)).cpu() if acc.num_processes > 1 \
        else rng_state().unsqueeze(0)
    if acc.is_main_process:
        save_checkpoint(run.run_dir, step, run.adapter_tensors(), run.optimizer, run.scheduler, rng,
                        run.info, run.t.keep_checkpoints)
    acc.wait_for_everyone()
