"""Corrupt and hostile files, a small seeded set per reader (issue 17, item 3): every bad file
is read or refused in one line with exit code 2, never a traceback, never a hang. The long run
(250+ cases per reader in CI, 500 in docs/RELIABILITY.md) is test_fuzz_readers_slow.py; the
mutations are in fuzz_readers.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fuzz_readers import (HOSTILE_CHAT_TEMPLATES, HOSTILE_YAML, PWNED, Tally, call_cli, call_reader, copy_with,
                          corrupted_bytes, dump_json, fuzz_settings, json_file, mutated_document, safetensors_file)
from fuzz_world import merge_args
from qalora_cli.config.loader import validate
from qalora_cli.errors import UserError
from qalora_cli.lora.adapter_io import checkpoint_sha256

DEFAULT_CASES = 6  # per reader in the default suite; the slow step runs 500


# ---- what each reader reads, and the command (or the function it calls) that reads it --------

def eval_load(model, adapter=None):
    from qalora_cli.eval.model_loading import load_eval_model

    load_eval_model(str(model), str(adapter) if adapter else None, "cpu", "float32")


def _file(folder: Path, name: str) -> bytes:
    return (folder / name).read_bytes()


def _restore(world, name: str, data: bytes):
    from qalora_cli.recipes import finetune as ft
    from qalora_cli.train.checkpoint import checkpoint_dirs

    run, fp, adapters, opt, sched = world.ckpt
    case = world.scratch("run")
    if case.exists():
        shutil.rmtree(case)
    shutil.copytree(run, case)
    (checkpoint_dirs(case)[-1] / name).write_bytes(data)

    class OneProcess:
        num_processes, process_index, is_main_process = 1, 0, True

    ft._restore(case, fp, adapters, opt, sched, OneProcess())


def _data_case(world, suffix: str, data: bytes, use: str):
    f = world.scratch("data") / f"train{suffix}"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data)
    if use == "finetune":
        from qalora_cli.recipes.finetune import _prepare_data

        cfg = validate(dict(world.ft_dict(world.scratch("unused")),
                            data={"source": str(f), "max_length": 64, "template": "raw"}), "t")
        _prepare_data(cfg, _tokenizer(world))
    elif use == "ppl":
        from qalora_cli.eval.ppl_text import load_text

        load_text(str(f))
    else:
        from qalora_cli.config.schema import CalibrationSection
        from qalora_cli.data.calibration import _texts

        _texts(CalibrationSection(source="files", paths=[str(f)]), 1000)


_TOK = {}


def _tokenizer(world):
    if "tok" not in _TOK:
        from transformers import AutoTokenizer

        _TOK["tok"] = AutoTokenizer.from_pretrained(world.bases["act"])
    return _TOK["tok"]


def _adapter_with_sha(world, base: Path) -> Path:
    """The test adapter re-signed for `base`, so that the merge reads the base instead of
    refusing it as another model's."""
    adapter = world.scratch("adapter-signed")
    if adapter.exists():
        shutil.rmtree(adapter)
    shutil.copytree(world.bases["adapter"], adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    try:
        cfg["base"]["sha256"] = checkpoint_sha256(base)
    except (UserError, OSError):
        pass
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    return adapter


def _merge(world, base, adapter, *extra):
    out = world.scratch("merged")
    if out.exists():
        shutil.rmtree(out)
    outcome = call_cli(merge_args(base, adapter, out) + list(extra))
    assert outcome == "ok" or not out.exists()  # a refusal writes nothing
    assert not list(out.parent.glob(f".{out.name}.partial-*"))
    return outcome


# name -> (the good file, a strategy of bad versions of it, what reads the bad file)
def readers(world) -> dict:
    b = world.bases
    q, fp, ad = b["act"], world.fp, b["adapter"]

    def in_copy(src, name, then):
        def drive(data):
            return then(copy_with(src, world.scratch(src.name), name, data))
        return drive

    def model_merge(d):
        return _merge(world, d, _adapter_with_sha(world, d))

    def tok_generate(d):
        return call_cli(["generate", "--model", d, "--prompt", "Hi", "--max-new-tokens", "2", "--device", "cpu",
                         "--dtype", "float32", "--raw"])  # the tiny tokenizer has no chat template

    def gguf_drive(data):
        f = world.scratch("gguf") / "model.gguf"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
        return call_reader(eval_load, f)

    table = {
        "quantized model.safetensors (eval/generate load)":
            (lambda: _file(q, "model.safetensors"), safetensors_file,
             in_copy(q, "model.safetensors", lambda d: call_reader(eval_load, d))),
        "quantized model.safetensors (merge)":
            (lambda: _file(q, "model.safetensors"), safetensors_file, in_copy(q, "model.safetensors", model_merge)),
        "quantized config.json (eval/generate load)":
            (lambda: _file(q, "config.json"), json_file,
             in_copy(q, "config.json", lambda d: call_reader(eval_load, d))),
        "quantized config.json (merge)":
            (lambda: _file(q, "config.json"), json_file,
             in_copy(q, "config.json", lambda d: _merge(world, d, ad))),
        "float model config.json (eval load)":
            (lambda: _file(fp, "config.json"), json_file,
             in_copy(fp, "config.json", lambda d: call_reader(eval_load, d))),
        "float model.safetensors (eval load)":
            (lambda: _file(fp, "model.safetensors"), safetensors_file,
             in_copy(fp, "model.safetensors", lambda d: call_reader(eval_load, d))),
        "tokenizer.json (generate)":
            (lambda: _file(q, "tokenizer.json"), json_file, in_copy(q, "tokenizer.json", tok_generate)),
        "tokenizer_config.json (generate)":
            (lambda: _file(q, "tokenizer_config.json"), json_file, in_copy(q, "tokenizer_config.json", tok_generate)),
        "adapter_model.safetensors (eval load)":
            (lambda: _file(ad, "adapter_model.safetensors"), safetensors_file,
             in_copy(ad, "adapter_model.safetensors", lambda d: call_reader(eval_load, q, d))),
        "adapter_model.safetensors (merge)":
            (lambda: _file(ad, "adapter_model.safetensors"), safetensors_file,
             in_copy(ad, "adapter_model.safetensors", lambda d: _merge(world, q, d))),
        "adapter_config.json (eval load)":
            (lambda: _file(ad, "adapter_config.json"), json_file,
             in_copy(ad, "adapter_config.json", lambda d: call_reader(eval_load, q, d))),
        "adapter_config.json (merge)":
            (lambda: _file(ad, "adapter_config.json"), json_file,
             in_copy(ad, "adapter_config.json", lambda d: _merge(world, q, d))),
        "model.gguf (eval/generate load)":
            (lambda: world.gguf.read_bytes(), lambda data: corrupted_bytes(data, hot=4096), gguf_drive),
        "YAML config (config show)": (None, None, None),  # its own test below
    }
    for name in ("adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"):
        from qalora_cli.train.checkpoint import checkpoint_dirs

        strat = json_file if name.endswith(".json") else safetensors_file
        table[f"checkpoint {name} (finetune --resume)"] = (
            lambda name=name: (checkpoint_dirs(world.ckpt[0])[-1] / name).read_bytes(), strat,
            lambda data, name=name: call_reader(_restore, world, name, data))
    for suffix in (".json", ".jsonl", ".csv", ".parquet"):
        for use in ("finetune", "ppl", "calibration"):
            if suffix == ".json":
                strat = json_file
            elif suffix == ".parquet":
                strat = lambda data: corrupted_bytes(data, hot=256)  # noqa: E731
            else:
                strat = corrupted_bytes
            table[f"data {suffix} ({use})"] = (
                lambda suffix=suffix: world.data[suffix], strat,
                lambda data, suffix=suffix, use=use: call_reader(_data_case, world, suffix, data, use))
    del table["YAML config (config show)"]
    return table


READERS = ["quantized model.safetensors (eval/generate load)", "quantized model.safetensors (merge)",
           "quantized config.json (eval/generate load)", "quantized config.json (merge)",
           "float model config.json (eval load)", "float model.safetensors (eval load)",
           "tokenizer.json (generate)", "tokenizer_config.json (generate)",
           "adapter_model.safetensors (eval load)", "adapter_model.safetensors (merge)",
           "adapter_config.json (eval load)", "adapter_config.json (merge)", "model.gguf (eval/generate load)",
           *[f"checkpoint {n} (finetune --resume)" for n in ("adapter_model.safetensors", "optimizer.safetensors",
                                                          "rng.safetensors", "trainer_state.json")],
           *[f"data {s} ({u})" for s in (".json", ".jsonl", ".csv", ".parquet")
             for u in ("finetune", "ppl", "calibration")]]


def fuzz_reader(world, name: str, cases: int) -> Tally:
    good, strategy, drive = readers(world)[name]
    original = good()
    tally = Tally(name)

    @fuzz_settings(cases)
    @given(st.data())
    def one(data):
        tally.add(drive(data.draw(strategy(original))))

    one()
    tally.record()
    assert tally.total >= cases, tally.counts
    return tally


# qalora_cli/lora/adapter_io.py does not yet check its config's fields (KeyError, TypeError,
# pydantic's ValidationError escape); the fix is in docs/RELIABILITY.md ("Pending fixes"). Until
# it is applied these readers are expected to fail; afterwards they must pass.
def _adapter_fix_pending() -> bool:
    from qalora_cli.lora import adapter_io

    return not hasattr(adapter_io, "check_adapter_config")


def reader_param(name: str):
    if name.startswith("adapter_config.json"):
        return pytest.param(name, marks=pytest.mark.xfail(_adapter_fix_pending(), strict=True,
                                                          reason="adapter_io.py fix pending (RELIABILITY.md)"))
    return name


@pytest.mark.parametrize("name", [reader_param(n) for n in READERS])
def test_bad_files_are_refused_in_one_line(world, name):
    fuzz_reader(world, name, DEFAULT_CASES)


def fuzz_yaml(tmp_path, cases: int) -> Tally:
    from qalora_cli.config.loader import builtin_dir

    good = (builtin_dir() / "smollm2-135m-int4.yaml").read_bytes()
    doc = yaml.safe_load(good)
    f = tmp_path / "bad.yaml"
    tally = Tally("YAML config (config show)")

    @fuzz_settings(cases)
    @given(st.one_of(corrupted_bytes(good), mutated_document(doc).map(lambda d: yaml.safe_dump(d).encode()),
                     st.sampled_from(HOSTILE_YAML).map(str.encode)))
    def one(data):
        f.write_bytes(data)
        tally.add(call_cli(["config", "show", "--config", f]))

    one()
    for text in HOSTILE_YAML:  # each hostile document at least once, whatever was drawn
        f.write_text(text)
        tally.add(call_cli(["config", "show", "--config", f]))
    tally.record()
    return tally


def test_bad_yaml_configs_are_refused_in_one_line(tmp_path):
    fuzz_yaml(tmp_path, DEFAULT_CASES * 3)


def test_hostile_chat_templates_never_run_code(world):
    """A tokenizer whose chat template reaches for Python internals or loops forever is stopped
    by transformers' sandbox: one line, exit 2."""
    q = world.bases["act"]
    cfg = json.loads((q / "tokenizer_config.json").read_text())
    PWNED.unlink(missing_ok=True)
    for template in HOSTILE_CHAT_TEMPLATES:
        d = copy_with(q, world.scratch("tmpl"), "tokenizer_config.json", dump_json(dict(cfg, chat_template=template)))
        call_cli(["generate", "--model", d, "--prompt", "Hi", "--max-new-tokens", "2", "--device", "cpu"])
        assert not PWNED.exists(), template


def test_a_damaged_checkpoint_refuses_to_resume_through_the_cli(world, tmp_path):
    """`qalora finetune --resume` itself, on a truncated optimizer file and a bad trainer state."""
    from qalora_cli.train.checkpoint import checkpoint_dirs

    run = world.ckpt[0]
    for name, data in (("optimizer.safetensors", b"\x10\x00\x00"), ("trainer_state.json", b'{"step": "x"}'),
                       ("rng.safetensors", (checkpoint_dirs(run)[-1] / "adapter_model.safetensors").read_bytes())):
        case = tmp_path / name
        shutil.copytree(run, case)
        (checkpoint_dirs(case)[-1] / name).write_bytes(data)
        cfg_file = tmp_path / "ft.yaml"
        cfg_file.write_text(yaml.safe_dump(world.ft_dict(case, max_steps=3)))
        assert call_cli(["finetune", "--config", cfg_file, "--resume"]) == "refused", name


def test_the_cli_reads_a_bad_model_file_in_one_line(world, tmp_path):
    """The commands themselves, once per file kind: eval ppl, generate, merge."""
    q = world.bases["act"]
    st_bytes = (q / "model.safetensors").read_bytes()
    bad = copy_with(q, tmp_path / "trunc", "model.safetensors", st_bytes[:len(st_bytes) // 2])
    assert call_cli(["eval", "ppl", "--model", bad, "--device", "cpu", "--seq-len", "48"]) == "refused"
    assert call_cli(["generate", "--model", bad, "--prompt", "Hi", "--device", "cpu"]) == "refused"
    bad_cfg = copy_with(q, tmp_path / "cfg", "config.json", b'{"quantization_config": 3')
    assert call_cli(["eval", "ppl", "--model", bad_cfg, "--device", "cpu"]) == "refused"
    bad_gguf = tmp_path / "x.gguf"
    bad_gguf.write_bytes(world.gguf.read_bytes()[:3000])
    assert call_cli(["eval", "ppl", "--model", bad_gguf, "--device", "cpu"]) == "refused"
