"""kill -9 anywhere (issue 17, item 2), the slow step: `qalora quantize`, `finetune` and `merge`
killed with SIGKILL at seeded random moments, again and again, each time resumed (`--resume`)
or re-run (`--overwrite` once a finished output exists, so kills also land while a finished
output is being replaced). After every kill: no partial output where a finished one is
expected (an output that exists is the uninterrupted run's, bit for bit), an earlier finished
output is never damaged (if a kill took it away mid-replacement, it waits whole beside it and
the next run puts it back), every checkpoint or saved block is whole. At the end: the outputs
equal an uninterrupted run's and no temporary folder remains. And under torchrun with 2
processes, one rank killed: the other stops within 60 s and --resume completes.

    QALORA_SOAK_KILLS=10 (kills per stage), QALORA_SOAK_SEED=17, QALORA_SOAK_LOG=FILE (figures)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import kill_soak
from helpers import make_tiny_llama, tiny_config_dict

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("QALORA_SOAK_KILLS", "10"))
SEED = int(os.environ.get("QALORA_SOAK_SEED", "17"))
FT_KEEP = {"adapter_config.json", "adapter_model.safetensors", "finetune_report.json", "metrics.jsonl",
           "baseline.json", "checkpoints"}


def log(line: str) -> None:
    print(line)
    if os.environ.get("QALORA_SOAK_LOG"):
        with open(os.environ["QALORA_SOAK_LOG"], "a") as f:
            f.write(line + "\n")


@pytest.fixture(scope="module")
def work(tiny_model_dir, tmp_path_factory):
    """A 4-block tiny Llama (so kills fall between blocks) and the configs of the three stages."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("soak")
    model = root / "model"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    make_tiny_llama(len(tok), num_hidden_layers=4).save_pretrained(model)
    tok.save_pretrained(model)
    return root, model


def write_yaml(path: Path, d: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(d))
    return path


def quantize_config(root: Path, model: Path, out: Path) -> Path:
    d = tiny_config_dict(model, out, act_order=True)
    d["output"]["init_stats"] = True
    d["calibration"].update(num_samples=32, seq_len=128)  # blocks that take long enough to be killed in
    return write_yaml(root / "cfg" / f"q-{out.parent.name}.yaml", d)


def finetune_dict(model: Path, base: Path, adapter: Path, dropout: float = 0.1, **train) -> dict:
    d = tiny_config_dict(model, base)
    d["lora"] = {"rank": 8, "alpha": 16, "dropout": dropout}  # dropout: the RNG state must resume too
    d["data"] = {"source": "builtin", "builtin_size": 80, "max_length": 128, "template": "raw",
                 "eval_max_examples": 8}
    t = {"adapter_dir": str(adapter), "device": "cpu", "micro_batch_size": 4, "batch_size": 8,
         "learning_rate": 3e-3, "max_steps": 8, "eval_every": 4, "save_every": 2, "exact_match_examples": 0,
         "mixed_precision": "no", "schedule": "cosine", "warmup_steps": 2}
    t.update(train)
    d["train"] = t
    return d


def merge_args(base: Path, adapter: Path, out: Path) -> list:
    return ["merge", "--config", "smollm2-135m-int4", "--model", base, "--adapter", adapter, "--output", out,
            "--no-verify", "merge.device=cpu"]


def stale_old(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.old-*"))


def flag(args: list) -> str:
    return next((a for a in args if a in ("--resume", "--overwrite")), "(plain)")


def kill_chain(stage: str, rng: random.Random, window: tuple[float, float], next_args, after_kill) -> dict:
    """Start the command `next_args()` picks and SIGKILL it after a random delay, KILLS times;
    runs that finish before their kill are counted and the chain goes on. The delays are uniform
    over `window` widened by 10% each side: from the moment an uninterrupted run began to write
    (before it, the process only imports and loads) to the moment its output was in place."""
    kills = finished = 0
    where = []
    lo, hi = 0.9 * window[0], 1.1 * window[1]
    while kills < KILLS:
        assert kills + finished < 3 * KILLS, f"{stage}: the runs keep ending before their kill"
        args, existed = next_args()
        delay = rng.uniform(lo, hi)
        o = kill_soak.run_until(args, lambda t: t >= delay)
        if not o.killed:
            assert o.returncode == 0, o.stderr[-3000:]
            log(f"  {stage} {flag(args)}: finished in {o.seconds:.1f} s, before its kill at "
                f"{delay:.1f} s")
            finished += 1
            # the machine got faster (a shared one): aim within the time a run takes now
            hi = min(hi, o.seconds)
            lo = min(lo, 0.8 * hi)
            continue
        kills += 1
        where.append(after_kill(existed))
        log(f"  {stage} {flag(args)}: killed at {delay:.1f} s: {where[-1]}")
    log(f"{stage}: {kills} kills survived ({', '.join(where)}), {finished} run(s) finished between kills, "
        f"delays uniform in [{0.9 * window[0]:.1f}, {1.1 * window[1]:.1f}] s (at the end [{lo:.1f}, {hi:.1f}]), "
        f"seed {SEED}")
    return {"kills": kills, "finished": finished}


def check_output_or_old(ref: Path, out: Path, existed: bool, what: str, ignore: tuple[str, ...] = ()) -> str:
    """After a kill: the output is the finished one or absent; a finished one being replaced is
    never lost. `ignore`: report keys that name the output's own path."""
    if out.exists():
        assert kill_soak.differences(ref, out, ignore) == [], f"{what}: a damaged output after a kill"
        return "finished" if not existed else "kept"
    olds = stale_old(out)
    if existed:
        assert len(olds) == 1 and kill_soak.differences(ref, olds[0], ignore) == [], \
            f"{what}: the earlier output was lost"
        return "mid-replace"
    return "none"


def test_quantize_finetune_merge_survive_kill_9(work, tmp_path):
    root, model = work
    rng = random.Random(SEED)
    base = soak_quantize(root, model, tmp_path, rng)
    adapter = soak_finetune(model, base, tmp_path, rng)
    soak_merge(base, adapter, tmp_path, rng)


def soak_quantize(root: Path, model: Path, tmp_path: Path, rng: random.Random) -> Path:
    ref = tmp_path / "q-ref" / "out"
    o, window = kill_soak.run_timed(["quantize", "--config", quantize_config(root, model, ref)],
                                    lambda: ref.with_name("out.partial").exists(), ref.exists)
    assert o.returncode == 0, o.stderr[-3000:]
    out = tmp_path / "q-cut" / "out"
    cfg = quantize_config(root, model, out)
    progress = out.with_name("out.partial")

    def next_args():
        existed = (out / "config.json").is_file()
        if existed and rng.random() < 0.5:  # half the time start again from nothing: kills between blocks
            shutil.rmtree(out)
            existed = False
        return ["quantize", "--config", cfg, "--overwrite" if existed else "--resume"], existed

    def after_kill(existed):
        state = check_output_or_old(ref, out, existed, "quantize")
        blocks = sorted(progress.glob("block-*.safetensors")) if progress.is_dir() else []
        from safetensors.torch import load_file

        for b in blocks:
            load_file(b)  # whole
        return f"{state}/{len(blocks)} blocks"

    kill_chain("quantize", rng, window, next_args, after_kill)
    last = kill_soak.run(["quantize", "--config", cfg, "--resume"])
    assert last.returncode == 0, last.stderr[-3000:]
    assert kill_soak.differences(ref, out) == []
    assert kill_soak.leftovers(out.parent, {"out"}) == []
    return ref


def checkpoints_whole(run_dir: Path) -> int:
    from safetensors.torch import load_file

    steps = sorted((run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").is_dir() else []
    for s in steps:
        assert sorted(p.name for p in s.iterdir()) == ["adapter_model.safetensors", "optimizer.safetensors",
                                                       "rng.safetensors", "trainer_state.json"], s
        for f in ("adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors"):
            load_file(s / f)
        json.loads((s / "trainer_state.json").read_text())
    return int(steps[-1].name.split("-")[1]) if steps else 0


def same_training(ref: Path, run: Path) -> None:
    """The same loss curve (step, loss, learning rate, held-out loss), bit for bit, and the same
    adapter (tensors bit for bit, the same adapter_config.json)."""
    keys = ("step", "loss", "lr", "eval_loss")

    def curve(d):
        return [{k: r.get(k) for k in keys} for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]

    assert curve(run) == curve(ref)
    _adapter_same(ref, run)
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in (ref, run)]
    assert configs[0] == configs[1]


def _adapter_same(ref: Path, run: Path) -> None:
    from safetensors.torch import load_file

    a, b = load_file(ref / "adapter_model.safetensors"), load_file(run / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert [k for k in a if not kill_soak._bits(a[k]).equal(kill_soak._bits(b[k]))] == []


def soak_finetune(model: Path, base: Path, tmp_path: Path, rng: random.Random) -> Path:
    ref = tmp_path / "ft-ref" / "adapter"
    r, window = kill_soak.run_timed(["finetune", "--config", write_yaml(tmp_path / "cfg" / "ft-ref.yaml",
                                                                        finetune_dict(model, base, ref))],
                                    ref.exists, (ref / "adapter_config.json").exists)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "ft-cut" / "adapter"
    cfg = write_yaml(tmp_path / "cfg" / "ft.yaml", finetune_dict(model, base, run_dir))

    def next_args():
        # a killed --overwrite left the finished adapter aside: the next run puts it back, so there is
        # nothing to resume (the new run's checkpoints go with it)
        existed = (run_dir / "adapter_config.json").is_file() or bool(stale_old(run_dir))
        resumable = not existed and checkpoints_whole(run_dir) > 0
        return ["finetune", "--config", cfg, "--resume" if resumable else "--overwrite"], existed

    def after_kill(existed):
        step = checkpoints_whole(run_dir)
        if (run_dir / "adapter_config.json").is_file():  # a finished adapter is a whole one
            _adapter_same(ref, run_dir)
            return "finished"
        return f"step {step}"

    kill_chain("finetune", rng, window, next_args, after_kill)
    if not (run_dir / "adapter_config.json").is_file():
        resumable = checkpoints_whole(run_dir) and not stale_old(run_dir)
        last = kill_soak.run(["finetune", "--config", cfg, "--resume" if resumable else "--overwrite"])
        assert last.returncode == 0, last.stderr[-3000:]
    same_training(ref, run_dir)
    assert kill_soak.leftovers(run_dir, FT_KEEP) == []
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("step-")]
    assert kill_soak.leftovers(run_dir.parent, {"adapter"}) == []
    return ref


def soak_merge(base: Path, adapter: Path, tmp_path: Path, rng: random.Random) -> None:
    ref = tmp_path / "m-ref" / "out"
    ref.parent.mkdir(parents=True)
    r, window = kill_soak.run_timed(merge_args(base, adapter, ref),
                                    lambda: ref.exists() or any(ref.parent.glob(".out.partial-*")), ref.exists)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "m-cut" / "out"

    def next_args():
        existed = out.exists()
        return merge_args(base, adapter, out) + (["--overwrite"] if existed else []), existed

    kill_chain("merge", rng, window, next_args,
               lambda existed: check_output_or_old(ref, out, existed, "merge", ignore=("output",)))
    last = kill_soak.run(merge_args(base, adapter, out) + (["--overwrite"] if out.exists() else []))
    assert last.returncode == 0, last.stderr[-3000:]
    assert kill_soak.differences(ref, out, ignore=("output",)) == []
    assert kill_soak.leftovers(out.parent, {"out"}) == []


# ---- torchrun: one of two ranks killed ---------------------------------------------------------

def rank_pid(parent: int, rank: int, timeout: float = 300) -> int:
    """The pid of the worker with RANK=`rank` among `parent`'s children (torchrun's workers)."""
    end = time.time() + timeout
    while time.time() < end:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])
                environ = (d / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if ppid == parent and f"RANK={rank}".encode() in environ:
                return int(d.name)
        time.sleep(0.2)
    raise AssertionError(f"no worker of rank {rank} appeared")


def torchrun(cfg: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", "29547", "-m", "qalora_cli", "finetune", "--config", str(cfg), *extra],
                            env=kill_soak.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_one_rank_killed_the_other_stops_and_the_run_resumes(work, tmp_path):
    from qalora_cli.config.loader import validate
    from qalora_cli.recipes import finetune as finetune_recipe
    from qalora_cli.recipes.quantize import run as quantize

    root, model = work
    base = tmp_path / "base"
    quantize(validate(tiny_config_dict(model, base, act_order=True), "t"), show_progress=False)
    one = tmp_path / "one"
    steps = dict(dropout=0.0, max_steps=24)  # long enough for the kill to fall mid-training
    finetune_recipe.run(validate(finetune_dict(model, base, one, **steps), "t"), show_progress=False)
    run_dir = tmp_path / "two"
    cfg = write_yaml(tmp_path / "cfg" / "ft2.yaml", finetune_dict(model, base, run_dir, **steps))
    rng = random.Random(SEED)
    p = torchrun(cfg)
    victim = rank_pid(p.pid, rank=1)
    while checkpoints_whole(run_dir) < 2 and p.poll() is None:  # training, past its first checkpoint
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.5))
    assert p.poll() is None, "the run finished before the kill"
    os.kill(victim, signal.SIGKILL)
    t_kill = time.perf_counter()
    try:
        p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError("the other rank did not stop within 60 s of the kill")
    stopped = time.perf_counter() - t_kill
    assert p.returncode != 0
    step = checkpoints_whole(run_dir)
    assert step >= 2 and not (run_dir / "adapter_config.json").exists()
    r = torchrun(cfg, "--resume")
    _, err = r.communicate(timeout=600)
    assert r.returncode == 0, err[-3000:]
    for x, y in zip(map(json.loads, (one / "metrics.jsonl").read_text().splitlines()),
                    map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()), strict=True):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], rel=1e-4), x["step"]
    log(f"torchrun 2 processes: rank 1 killed after checkpoint step {step}; torchrun stopped "
        f"{stopped:.1f} s later; --resume finished the 1-process curve (rel 1e-4)")
