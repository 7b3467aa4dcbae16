"""Two `qalora recipe run` of one recipe at once (a sweep split over two machines sharing a file
system, or a run started twice by mistake): every stage runs once, in one of them, and the other
waits for it and reuses it (pipeline/stage_lock.py). A lock left by a killed run is taken over."""

import json
import os
import subprocess
import sys
import time

import yaml

from helpers import dead_owner, tiny_config_dict
from qalora_cli.pipeline.stage_lock import stage_lock


def quantize_recipe(tiny_model_dir, folder):
    config = folder / "q.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_model_dir, folder / "unused")))
    recipe = {"description": "two quantizations", "output": str(folder / "out"), "sweep": {"bits": [4, 8]},
              "stages": {"quantize": {"run": "quantize", "config": str(config), "set": {"quantize.bits": "{bits}"}},
                         "score": {"run": "eval", "config": str(config), "model": "quantize", "label": "quantized",
                                   "metrics": ["ppl"], "eval": {"ppl_tokens": 128, "ppl_seq_len": 64,
                                                                "device": "cpu", "dtype": "float32"}}},
              "results": {"metrics": ["ppl", "size_mb"], "x": "bits"}}
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def start(recipe):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "qalora_cli", "recipe", "run", str(recipe)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_runs_at_once_run_each_stage_once(tiny_model_dir, tmp_path):
    recipe = quantize_recipe(tiny_model_dir, tmp_path)
    runs = [start(recipe), start(recipe)]
    outputs = [p.communicate(timeout=600)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs
    for stage in ("quantize-bits4", "quantize-bits8", "score-bits4", "score-bits8"):
        ran = [out.count(f"[new] {stage}:") for out in outputs]
        reused = [out.count(f"[reuse] {stage}") for out in outputs]
        assert sorted(ran) == [0, 1] and sorted(reused) == [0, 1], outputs  # once, and reused by the other
        record = json.loads((tmp_path / "out" / ".recipe" / f"{stage}.json").read_text())
        assert record["stage"] == stage.partition("-")[0] and (tmp_path / "out" / stage).is_dir()
    assert not list((tmp_path / "out" / ".recipe").glob("*.lock"))
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".") and p.name != ".recipe"] == []


def test_a_lock_of_a_killed_run_is_taken_over(tmp_path):
    (tmp_path / "s.lock").write_text(dead_owner())
    said = []
    with stage_lock(tmp_path, "s", said.append, poll_s=0.01):
        assert (tmp_path / "s.lock").read_text() != ""
    assert said == [] and not (tmp_path / "s.lock").exists()


def test_a_lock_of_a_live_run_is_waited_for(tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    from qalora_cli.process_owner import start_time

    (tmp_path / "s.lock").write_text(f"{holder.pid}.{start_time(holder.pid)}")
    said = []
    t0 = time.monotonic()

    def release_later(line):
        said.append(line)
        time.sleep(0.3)
        holder.kill()  # the holder dies with its lock in place: taken over at the next poll
        holder.wait()

    with stage_lock(tmp_path, "s", release_later, poll_s=0.05):
        waited = time.monotonic() - t0
    assert len(said) == 1 and f"process {holder.pid}" in said[0] and waited >= 0.3
