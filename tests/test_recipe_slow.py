"""`qalora recipe` killed with SIGKILL in the middle of a stage, then run again: the finished
stages are reused (not redone), the interrupted one resumes or re-runs, and the results equal an
uninterrupted run's. And the paper's baselines (LoRA, QLoRA, QLoRA w/ GPTQ) beside QA-LoRA, on
a tiny Llama, through one recipe."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from test_recipe import recipe_dict, write_config

pytestmark = pytest.mark.slow


def start(path):
    return subprocess.Popen([sys.executable, "-m", "qalora_cli", "recipe", "run", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def results(out):
    rows = list(csv.DictReader((out / "results.csv").open()))
    return [{k: v for k, v in r.items() if k not in ("size_mb",)} for r in rows]


def test_a_recipe_killed_mid_stage_resumes_without_redoing_finished_stages(tiny_model_dir, tmp_path):
    config = write_config(tiny_model_dir, tmp_path)
    recipe = recipe_dict(config, tmp_path / "whole", **{"sweep.bits": [4]})  # one width: CI time (2: the next test)
    recipe["stages"]["tune"]["set"] = {"train.max_steps": 12, "train.save_every": 2, "train.eval_every": 6}
    whole = tmp_path / "whole.yaml"
    whole.write_text(yaml.safe_dump(recipe))
    assert start(whole).wait() == 0

    recipe["output"] = str(tmp_path / "killed")
    killed = tmp_path / "killed.yaml"
    killed.write_text(yaml.safe_dump(recipe))
    proc = start(killed)
    checkpoints = tmp_path / "killed/tune-bits4/checkpoints"
    deadline = time.time() + 300
    while not (checkpoints.is_dir() and len(list(checkpoints.iterdir())) >= 2) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and the fine-tune it started, mid-training
    proc.wait()
    state = tmp_path / "killed/.recipe"
    assert (state / "quantize-bits4.json").is_file() and not (state / "tune-bits4.json").exists()
    quantized = (tmp_path / "killed/quantize-bits4/model.safetensors").stat().st_mtime_ns

    again = subprocess.run([sys.executable, "-m", "qalora_cli", "recipe", "run", str(killed)],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "[reuse] quantize-bits4" in again.stderr and "[resume] tune-bits4" in again.stderr
    assert (tmp_path / "killed/quantize-bits4/model.safetensors").stat().st_mtime_ns == quantized
    assert results(tmp_path / "killed") == results(tmp_path / "whole")
    assert not list(tmp_path.glob("killed/**/*.tmp*"))


def test_the_paper_baselines_run_beside_qalora_in_one_recipe(tiny_model_dir, tmp_path):
    config = write_config(tiny_model_dir, tmp_path)
    recipe = recipe_dict(config, tmp_path / "out", **{"sweep.bits": [4, 2]})
    s = recipe["stages"]
    s["lora"] = {"run": "finetune", "config": str(config), "set": {"finetune.method": "lora"}}
    s["qlora"] = {"run": "finetune", "config": str(config), "set": {"finetune.method": "qlora"}}
    s["qlora-float"] = {"run": "merge", "config": str(config), "adapter": "qlora", "format": "float"}
    s["qlora-gptq"] = {"run": "quantize", "config": str(config), "model": "qlora-float",
                       "set": {"quantize.bits": "{bits}"}}
    score = s["score"]
    s["score-lora"] = {**score, "model": None, "adapter": "lora", "label": "lora", "columns": {"bits": 16}}
    s["score-qlora-gptq"] = {**score, "model": "qlora-gptq", "label": "qlora-gptq"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = subprocess.run([sys.executable, "-m", "qalora_cli", "recipe", "run", str(path)], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {(r["label"], r["bits"]): r for r in csv.DictReader((tmp_path / "out/results.csv").open())}
    assert set(rows) == {("merged", "4"), ("merged", "2"), ("lora", "16"), ("qlora-gptq", "4"), ("qlora-gptq", "2")}
    assert all(r["answer_loss"] and r["ppl"] for r in rows.values())
    # the lora and qlora fine-tunes ran once, not once per bit width; QLoRA w/ GPTQ quantized per width
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(("lora", "qlora"))) == \
        ["lora", "qlora", "qlora-float", "qlora-gptq-bits2", "qlora-gptq-bits4"]
    # the size column is of what each row loaded: INT2 codes take less room than INT4's
    assert float(rows[("qlora-gptq", "2")]["size_mb"]) < float(rows[("qlora-gptq", "4")]["size_mb"])
