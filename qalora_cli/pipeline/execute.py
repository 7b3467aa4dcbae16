"""Running one stage instance: its config written out with the runner's paths wired in, the
stage command in a child process (its own memory peak, its output streamed to a log and the
console), then the metrics read from the reports the stage writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from .expand import Instance

STATE_DIR = ".recipe"  # under the recipe's output: each instance's config, log and record


def wired_config(inst: Instance, overwrite: bool) -> dict:
    """The instance's config with its inputs and output set (deep copy)."""
    data = json.loads(json.dumps(inst.config))
    model = inst.inputs.get("model")
    model_path = str(model.out) if model else inst.spec.model
    adapter = inst.inputs.get("adapter")
    adapter_path = str(adapter.out) if adapter else inst.spec.adapter
    method = (data.get("finetune") or {}).get("method", "qalora")
    sets: dict[str, Any] = {}
    if inst.spec.run == "quantize" or (inst.spec.run == "finetune" and method != "qalora"):
        if model_path:  # the float model this stage reads
            sets.update({"model.name_or_path": model_path, "model.package": None, "model.gguf_file": None})
    if inst.spec.run == "quantize":
        sets.update({"output.dir": str(inst.out), "output.overwrite": overwrite})
    elif inst.spec.run == "finetune":
        sets["train.adapter_dir"] = str(inst.out)
        if model_path and method == "qalora":
            sets.update({"train.quantized_model": model_path, "output.dir": model_path})
    elif inst.spec.run == "merge":
        sets.update({"merge.dir": str(inst.out), "merge.format": inst.spec.format or "qalora",
                     "merge.adapter_dir": adapter_path})
        if model_path:
            sets.update({"merge.quantized_model": model_path, "output.dir": model_path})
    for key, value in sets.items():
        section, _, name = key.partition(".")
        data.setdefault(section, {})[name] = value
    return data


def stage_commands(inst: Instance, state: Path, overwrite: bool, resume: bool) -> list[list[str]]:
    """The `qalora` command lines that run the instance (an eval runs one per kind of metric)."""
    cli = [sys.executable, "-m", "qalora_cli"]
    cfg_file = state / f"{inst.name}.yaml"
    if inst.config is not None:
        data = wired_config(inst, overwrite) if inst.spec.run != "eval" else inst.config
        cfg_file.write_text(yaml.safe_dump(data, sort_keys=False))
    if inst.spec.run == "quantize":
        return [cli + ["quantize", "--config", str(cfg_file)] + (["--resume"] if resume else [])]
    if inst.spec.run == "finetune":
        flag = ["--resume"] if resume else ["--overwrite"] if overwrite else []
        return [cli + ["finetune", "--config", str(cfg_file)] + flag]
    if inst.spec.run == "merge":
        return [cli + ["merge", "--config", str(cfg_file)] + (["--overwrite"] if overwrite else [])]
    return _eval_commands(inst, cli, cfg_file)


def _eval_commands(inst: Instance, cli: list[str], cfg_file: Path) -> list[list[str]]:
    o, metrics = inst.spec.eval, set(inst.spec.metrics)
    model = inst.inputs.get("model")
    adapter = inst.inputs.get("adapter")
    target = ((["--model", str(model.out if model else inst.spec.model)] if (model or inst.spec.model) else [])
              + (["--adapter", str(adapter.out if adapter else inst.spec.adapter)]
                 if (adapter or inst.spec.adapter) else []))
    common = target + ["--device", o.device, "--dtype", o.dtype]
    out = inst.out
    cmds = []
    if metrics & {"exact_match", "answer_loss"}:
        cmds.append(cli + ["eval", "task", "--config", str(cfg_file), "--output-json", str(out / "task.json")]
                    + common + (["--examples", str(o.examples)] if o.examples else [])
                    + (["--loss-examples", str(o.loss_examples)] if o.loss_examples else []))
    if "ppl" in metrics:
        cmds.append(cli + ["eval", "ppl", "--output-json", str(out / "ppl.json"), "--seq-len", str(o.ppl_seq_len)]
                    + common + (["--max-tokens", str(o.ppl_tokens)] if o.ppl_tokens else []))
    if "mmlu" in metrics:
        cmds.append(cli + ["eval", "mmlu", "--output-json", str(out / "mmlu.json"), "--shots", str(o.mmlu_shots)]
                    + common + (["--limit", str(o.mmlu_limit)] if o.mmlu_limit else []))
    return cmds


def run_command(cmd: list[str], log: Path, name: str, echo) -> None:
    """One child process; its output goes to the log and, line by line, to `echo`."""
    with log.open("a", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        last = ""
        for line in proc.stdout:
            f.write(line)
            echo(line.rstrip("\n"))
            last = line.strip() or last
        code = proc.wait()
    if code:
        raise UserError(f"stage '{name}' failed (exit {code}): {last}; its log: {log}")
