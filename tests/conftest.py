"""Shared fixtures, built once per session: a tiny random Llama with a real (small, trained
here) BPE tokenizer, saved as a Hugging Face folder, so every stage runs end to end in
seconds; its GPTQ quantizations and random adapters (`bases`). The builders are in helpers.py;
their names stay importable from here."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
# Under pytest-xdist (-n N), the cores are shared out: each worker, and every process it starts, runs
# torch on cores/N threads. More threads than cores make each OpenMP region wait on the others (a
# tiny model's forward ~100x slower: one_torch_thread below).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS > 1:
    _PER_WORKER = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
    os.environ["OMP_NUM_THREADS"] = os.environ["GPTQMODEL_CPU_WORKERS"] = _PER_WORKER
    torch.set_num_threads(int(_PER_WORKER))
# Without a GPU, Triton kernels run on the CPU through its interpreter: set before any module
# imports triton, since the flag is read when a kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import (CHAT_TEMPLATE, make_adapter, make_tiny_llama, make_tokenizer, text_ids,  # noqa: E402
                     tiny_config_dict)

__all__ = ["CHAT_TEMPLATE", "make_tiny_llama", "make_tokenizer", "text_ids", "tiny_config_dict"]


@pytest.fixture(autouse=True)
def ctrl_c_handler_unchanged():
    """A test (or the code it runs in-process) that leaves another SIGINT handler behind makes
    Ctrl-C do nothing in every later test and for a user's later call: fail the test that did."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        signal.signal(signal.SIGINT, before)
        pytest.fail(f"the SIGINT handler was left changed: {before!r} -> {after!r}")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module. Tiny models gain nothing from threads (on a shared 2-core
    machine contention makes each forward ~100x slower), and float sums are reduced in the same
    order as in a subprocess run with OMP_NUM_THREADS=1, which tests compare bit for bit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama folder (config, safetensors weights, tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    model = make_tiny_llama(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-chat")
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    make_tiny_llama(len(tok), max_position_embeddings=512).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bases(tiny_model_dir, tmp_path_factory):
    """Tiny GPTQ bases (act-order g32, g64, g32) and random adapters on two of them."""
    from qalora_cli.config.loader import validate
    from qalora_cli.recipes.quantize import run as quantize

    root = tmp_path_factory.mktemp("merge")
    out = {}
    for name, kw in {"act": dict(act_order=True), "g64": dict(group_size=64), "g32": {}}.items():
        quantize(validate(tiny_config_dict(tiny_model_dir, root / name, **kw), "t"), show_progress=False)
        out[name] = root / name
    out["adapter"] = make_adapter(out["act"], root / "adapter")
    out["adapter_g32"] = make_adapter(out["g32"], root / "adapter_g32", seed=1, b_std=0.2)
    return out


@pytest.fixture(scope="session")
def world(bases, tiny_model_dir, tmp_path_factory):
    """The good folders the fuzz tests plant bad files in (fuzz_world.py)."""
    from fuzz_world import World

    return World(bases, tiny_model_dir, tmp_path_factory.mktemp("fuzz"))


# pytest-xdist with --dist loadfile hands out whole files in collection order: the longest first (on
# 2 cores, one torch thread each: minutes), so that no worker is left with a long file at the end.
# Run with --no-loadscope-reorder, or xdist puts the files with the most tests first instead. The
# order is by measured time; xdist hands a worker its next file as soon as it has 2 tests or fewer
# left to run, so the last files are committed early (on 2026-12-01 one worker ended 10 minutes
# before the other). --dist loadgroup with xdist_group marks did not keep a group on one worker
# with pytest-xdist 3.8.0 here, so a module's fixtures would be built twice: not used.
LONGEST_FILES_FIRST = ("test_memory_plan_slow.py", "test_smollm2_slow.py", "test_smollm2_finetune_slow.py",
                       "test_recipe_slow.py", "test_kill_soak_slow.py", "test_fuzz_readers_slow.py",
                       "test_stream_slow.py")


def pytest_collection_modifyitems(config, items):
    if _WORKERS > 1:
        rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
