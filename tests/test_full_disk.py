"""Full disk (issue 17, item 4): quantize, finetune (checkpoints and adapter) and merge (every
format) writing to a filesystem too small for their output end in one line naming the place
and the space needed, exit code 2, with nothing half-written and no temporary folder left.

Two variants of each case:
- real: a size-limited tmpfs mounted by the test (needs root and permission to mount; skipped
  otherwise), so every writer, Python or native (safetensors' Rust writer, numpy's tofile,
  the tokenizers library), meets a real ENOSPC;
- simulated (always runs): the filesystem is a folder whose writes fail with ENOSPC once its
  files hold more than a given number of bytes. Python file writes are checked as they happen;
  writers outside Python (safetensors, shutil's copy) are checked when they return. The fill
  point is set at fractions of the output's real size, so the disk fills early and late."""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from helpers import SMALL_REFIT, tiny_config_dict
from fuzz_readers import call_cli
from qalora_cli.output_dir import folder_bytes

STAGES = ["quantize", "finetune", "merge-qalora", "merge-gptq", "merge-gguf", "merge-mlx"]


def stage_args(stage: str, bases, tiny_model_dir, out: Path, cfg_dir: Path) -> list:
    """The command that writes `out` for a stage (configs go to cfg_dir, never to the small disk)."""
    cfg_dir.mkdir(parents=True, exist_ok=True)
    if stage == "quantize":
        f = cfg_dir / "q.yaml"
        f.write_text(yaml.safe_dump(tiny_config_dict(tiny_model_dir, out)))
        return ["quantize", "--config", f]
    if stage == "finetune":
        d = tiny_config_dict(tiny_model_dir, bases["act"])
        d["lora"] = {"rank": 8, "alpha": 16, "dropout": 0.0}
        d["data"] = {"source": "builtin", "builtin_size": 40, "max_length": 128, "template": "raw",
                     "eval_max_examples": 4}
        d["train"] = {"adapter_dir": str(out), "device": "cpu", "micro_batch_size": 4, "batch_size": 4,
                      "max_steps": 2, "eval_every": 2, "save_every": 1, "exact_match_examples": 0,
                      "mixed_precision": "no"}
        f = cfg_dir / "ft.yaml"
        f.write_text(yaml.safe_dump(d))
        return ["finetune", "--config", f]
    fmt = stage.split("-")[1]
    base, adapter = (bases["act"], bases["adapter"]) if fmt in ("qalora", "gptq") else \
        (bases["g32"], bases["adapter_g32"])
    extra = list(SMALL_REFIT) if fmt == "gptq" else []
    return ["merge", "--config", "smollm2-135m-int4", "--model", base, "--adapter", adapter, "--output", out,
            "--format", fmt, "--no-verify", "merge.device=cpu", *extra]


def needs_mlx(stage):
    if stage == "merge-mlx":
        from qalora_cli.export.mlx_merge import mlx_importable

        if not mlx_importable():
            pytest.skip("mlx is not installed")


def kept_progress(out: Path) -> Path | None:
    """The blocks a quantize finished before the disk filled, kept for --resume (as finetune keeps
    its checkpoints): <out>.partial/ with its settings and whole block files, or None."""
    from safetensors.torch import load_file

    progress = out.with_name(out.name + ".partial")
    if not progress.is_dir():
        return None
    blocks = sorted(p.name for p in progress.glob("block-*.safetensors"))
    assert blocks and sorted(p.name for p in progress.iterdir()) == blocks + ["settings.json"], blocks
    for n in blocks:
        load_file(progress / n)  # whole
    return progress


def temporaries(disk: Path, out: Path) -> list[Path]:
    kept = kept_progress(out)
    return [p for p in disk.rglob("*") if (".partial" in p.name or ".old-" in p.name)
            and not (kept is not None and (p == kept or kept in p.parents))]


def assert_nothing_half_written(disk: Path, out: Path, stage: str, result: str, text: str | None = None):
    assert result == "refused", f"{stage}: the full disk was not noticed"
    leftovers = temporaries(disk, out)
    assert not leftovers, leftovers
    if stage == "finetune":
        assert not (out / "adapter_config.json").exists()  # no finished adapter claimed
        for ckpt in (out / "checkpoints").glob("step-*") if (out / "checkpoints").is_dir() else []:
            assert sorted(p.name for p in ckpt.iterdir()) == ["adapter_model.safetensors", "optimizer.safetensors",
                                                              "rng.safetensors", "trainer_state.json"]
    else:
        assert not out.exists(), sorted(out.rglob("*"))
        kept = kept_progress(out) if stage == "quantize" else None
        assert folder_bytes(disk) == (folder_bytes(kept) if kept else 0), sorted(disk.rglob("*"))


@pytest.fixture(scope="module")
def full_sizes(bases, tiny_model_dir, tmp_path_factory):
    """Each stage's output size on an ordinary disk (what the small disks are cut from)."""
    root = tmp_path_factory.mktemp("sizes")
    cache = {}

    def size(stage):
        if stage not in cache:
            out = root / stage / "out"
            assert call_cli(stage_args(stage, bases, tiny_model_dir, out, root / stage / "cfg")) == "ok"
            cache[stage] = folder_bytes(out.parent)
        return cache[stage]

    return size


# ---- the real thing: a size-limited tmpfs ------------------------------------------------------

@contextmanager
def small_tmpfs(where: Path, size: int):
    where.mkdir(parents=True, exist_ok=True)
    size = max(4096, size // 4096 * 4096)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip() or r.returncode})")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@pytest.mark.parametrize("share", [0.05, 0.6])
@pytest.mark.parametrize("stage", STAGES)
def test_a_small_tmpfs_is_refused_in_one_line(bases, tiny_model_dir, full_sizes, tmp_path, stage, share):
    needs_mlx(stage)
    with small_tmpfs(tmp_path / "disk", int(full_sizes(stage) * share)) as disk:
        out = disk / "out"
        args = stage_args(stage, bases, tiny_model_dir, out, tmp_path / "cfg")
        result, text = call_cli(args, output=True)
        assert_nothing_half_written(disk, out, stage, result)
        last = text.strip().splitlines()[-1]
        print(f"{stage} tmpfs {share}: {last}")
        assert "no space left on the device" in last and str(disk) in last, last
        assert ("--resume" in last) == (kept_progress(out) is not None), last


# ---- simulated: ENOSPC past a byte budget ------------------------------------------------------

class _LimitedWriter:
    """A file opened for writing on the simulated disk: each write checks the disk's fill."""

    def __init__(self, f, check):
        self._f, self._check = f, check

    def write(self, data):
        n = self._f.write(data)
        self._f.flush()
        self._check()
        return n

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def close(self):
        if not self._f.closed:
            self._f.close()
            self._check()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextmanager
def simulated_full_disk(monkeypatch, disk: Path, limit: int):
    """Writes under `disk` fail with ENOSPC once its files hold more than `limit` bytes."""
    disk = disk.resolve()
    real_open = builtins.open

    def check(path=disk):
        if folder_bytes(disk) > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def on_disk(file) -> bool:
        try:
            return isinstance(file, (str, os.PathLike)) and Path(file).resolve().is_relative_to(disk)
        except (OSError, ValueError):
            return False

    def limited_open(file, mode="r", *args, **kw):
        f = real_open(file, mode, *args, **kw)
        return _LimitedWriter(f, lambda: check(file)) if any(c in mode for c in "wax+") and on_disk(file) else f

    def checked(fn):
        def wrapper(*args, **kw):
            result = fn(*args, **kw)
            check()
            return result
        return wrapper

    import safetensors.torch
    import transformers.modeling_utils

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", limited_open)
        m.setattr(io, "open", limited_open)
        m.setattr(safetensors.torch, "save_file", checked(safetensors.torch.save_file))
        m.setattr(transformers.modeling_utils, "safe_save_file", checked(transformers.modeling_utils.safe_save_file))
        m.setattr(shutil, "copyfile", checked(shutil.copyfile))
        yield disk


def simulated_case(bases, tiny_model_dir, full_sizes, tmp_path, monkeypatch, stage, share):
    needs_mlx(stage)
    disk = tmp_path / f"disk-{share}"
    disk.mkdir()
    out = disk / "out"
    args = stage_args(stage, bases, tiny_model_dir, out, tmp_path / "cfg")
    limit = int(full_sizes(stage) * share)
    with simulated_full_disk(monkeypatch, disk, limit):
        result, text = call_cli(args, output=True)
    assert_nothing_half_written(disk, out, stage, result)
    last = text.strip().splitlines()[-1]
    assert "no space left on the device" in last and str(disk) in last, last
    assert ("--resume" in last) == (kept_progress(out) is not None), last
    return last


@pytest.mark.parametrize("share", [0.05, 0.9])
@pytest.mark.parametrize("stage", STAGES)
def test_a_simulated_full_disk_is_refused_in_one_line(bases, tiny_model_dir, full_sizes, tmp_path, monkeypatch,
                                                      stage, share):
    simulated_case(bases, tiny_model_dir, full_sizes, tmp_path, monkeypatch, stage, share)


@pytest.mark.parametrize("stage", ["quantize", "merge-qalora", "merge-gguf"])
def test_a_full_disk_never_damages_the_finished_output_it_would_replace(bases, tiny_model_dir, full_sizes, tmp_path,
                                                                      stage):
    """--overwrite on a disk with room for one output only: the new one fails in one line and the
    finished one stays as it was, byte for byte."""
    # quantize also needs room for its progress (the finished blocks, kept until the output is whole)
    with small_tmpfs(tmp_path / "disk", int(full_sizes(stage) * (2.0 if stage == "quantize" else 1.5))) as disk:
        out = disk / "out"
        args = stage_args(stage, bases, tiny_model_dir, out, tmp_path / "cfg")
        assert call_cli(args) == "ok"
        before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        overwrite = ["output.overwrite=true"] if stage == "quantize" else ["--overwrite"]
        result, text = call_cli(args + overwrite, output=True)
        assert result == "refused" and "no space left on the device" in text, text
        assert {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
        assert not temporaries(disk, out)


# ---- the slow step: the disk filling at every 5% of the output ----------------------------------

SLOW_SHARES = [i / 20 for i in range(20)]


@pytest.mark.slow
@pytest.mark.parametrize("share", SLOW_SHARES)
@pytest.mark.parametrize("stage", STAGES)
def test_a_simulated_full_disk_at_every_point(bases, tiny_model_dir, full_sizes, tmp_path, monkeypatch, stage, share):
    simulated_case(bases, tiny_model_dir, full_sizes, tmp_path, monkeypatch, stage, share)


@pytest.mark.slow
@pytest.mark.parametrize("share", SLOW_SHARES[1:])
@pytest.mark.parametrize("stage", STAGES)
def test_a_small_tmpfs_at_every_point(bases, tiny_model_dir, full_sizes, tmp_path, stage, share):
    test_a_small_tmpfs_is_refused_in_one_line(bases, tiny_model_dir, full_sizes, tmp_path, stage, share)
