"""Resumable checkpoints: everything needed to continue a run as if it had never stopped.

    checkpoints/step-000050/
      adapter_model.safetensors   the adapters' A and B
      optimizer.safetensors       every tensor of the optimizer state (moments, steps)
      rng.safetensors             each process's torch RNG states (dropout masks)
      trainer_state.json          step, schedule, optimizer hyper-parameters, data position,
                                  the base's SHA-256 and the settings that must not change

Only safetensors and JSON: no pickle is ever written or loaded. A checkpoint is written to a
temporary folder and renamed into place, and an old one is renamed away before it is deleted,
so a process killed at any moment (kill -9 included) leaves every step-* folder whole; the
next save removes what the killed process left half-done.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import UserError, first_line
from ..output_dir import discard, disk_full_error, folder_bytes, is_disk_full, sweep_stale_in, temp_sibling

STATE = "trainer_state.json"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors, JSON-able rest). Works for torch and bitsandbytes
    optimizers alike: every tensor goes to safetensors, every other value to JSON."""
    tensors, per_param = {}, {}
    for pid, slots in state["state"].items():
        per_param[str(pid)] = {}
        for k, v in slots.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                per_param[str(pid)][k] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": per_param}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {int(pid): dict(vals) for pid, vals in meta["scalars"].items()}
    for key, v in tensors.items():
        pid, _, k = key.partition(".")
        state.setdefault(int(pid), {})[k] = v
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> torch.Tensor:
    """This process's CPU (and current CUDA device's) RNG state as one uint8 tensor."""
    parts = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        parts.append(torch.cuda.get_rng_state())
    return torch.cat(parts)


def set_rng_state(state: torch.Tensor) -> None:
    cpu_len = torch.get_rng_state().numel()
    torch.set_rng_state(state[:cpu_len].clone())
    if state.numel() > cpu_len and torch.cuda.is_available():
        torch.cuda.set_rng_state(state[cpu_len:].clone())


def save_checkpoint(run_dir: Path, step: int, adapter_tensors: dict[str, torch.Tensor], optimizer,
                    scheduler, rng_states: torch.Tensor, info: dict, keep: int) -> Path:
    """Written by the main process. `rng_states` is [processes, n] uint8."""
    from safetensors.torch import save_file

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    sweep_stale_in(root)  # what a killed run left: checkpoints half-written or half-deleted
    final = root / f"step-{step:06d}"
    opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
    tmp = temp_sibling(final)
    try:
        save_file(adapter_tensors, tmp / "adapter_model.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file({"rng": rng_states.contiguous()}, tmp / "rng.safetensors")
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        state = dict(info, step=step, optimizer=opt_meta, scheduler=sched)
        (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n")
    except Exception as e:
        written = folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            needs = sum(t.numel() * t.element_size() for d in (adapter_tensors, opt_tensors) for t in d.values())
            raise disk_full_error(final, written, needs + rng_states.numel() * rng_states.element_size()) from e
        raise
    discard(final)  # whole until it is renamed away: never a half-deleted step-* folder
    os.replace(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        discard(old)
    return final


def trainer_state(path: Path) -> dict:
    """A checkpoint's trainer state (its JSON; raises OSError / ValueError when unreadable)."""
    return json.loads((path / STATE).read_text())


def load_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict, torch.Tensor]:
    """-> (trainer state, adapter tensors, optimizer state_dict, rng states [processes, n])."""
    from safetensors.torch import load_file

    try:
        state = trainer_state(path)
        adapter = load_file(path / "adapter_model.safetensors")
        optimizer = unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer"])
        rng = load_file(path / "rng.safetensors")["rng"]
        if not isinstance(state.get("step"), int) or isinstance(state["step"], bool) or state["step"] < 0:
            raise ValueError(f"{STATE}: 'step' is {state.get('step')!r}, not a step number")
        if rng.dim() != 2 or rng.dtype != torch.uint8:
            raise ValueError(f"rng.safetensors: 'rng' is {rng.dtype} {tuple(rng.shape)}, not uint8 [processes, n]")
    except Exception as e:
        raise UserError(f"checkpoint '{path}' is damaged ({first_line(e)}); "
                        "delete it to resume from the one before") from e
    return state, adapter, optimizer, rng
