"""`qalora finetune` end to end on a tiny quantized Llama: the loss falls, the saved adapter
reproduces the trained model, Ctrl-C then --resume gives the uninterrupted loss curve step for
step, 2 processes (gloo) give the 1-process curve, and bad input ends in one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from typer.testing import CliRunner

from helpers import dead_owner, progress_that_ctrl_cs_at, tiny_config_dict, tiny_finetune_dict
from qalora_cli.cli.app import app
from qalora_cli.config.loader import validate
from qalora_cli.errors import UserError
from qalora_cli.lora.adapter_io import attach_adapter, read_adapter
from qalora_cli.models.quantized_io import load_quantized
from qalora_cli.recipes import finetune as finetune_recipe
from qalora_cli.recipes.quantize import run as quantize

runner = CliRunner()


@pytest.fixture(scope="module")
def qbase(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int4"
    quantize(validate(tiny_config_dict(tiny_model_dir, out, bits=4, group_size=32, act_order=True), "t"),
             show_progress=False)
    return out


def ft_dict(tiny_model_dir, qbase, adapter_dir, **train):
    return tiny_finetune_dict(tiny_model_dir, qbase, adapter_dir, **train)


def ft_cfg(*args, **kw):
    return validate(ft_dict(*args, **kw), "test")


def losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_the_saved_adapter_reproduces_the_model(tiny_model_dir, qbase, tmp_path):
    out = tmp_path / "adapter"
    report = finetune_recipe.run(ft_cfg(tiny_model_dir, qbase, out, max_steps=24, eval_every=8, learning_rate=2e-2),
                                 show_progress=False)
    assert report["after"]["eval_loss"] < 0.8 * report["before"]["eval_loss"]
    curve = losses(out)
    assert [r["step"] for r in curve] == list(range(1, 25))
    assert sum(r["loss"] for r in curve[-4:]) < 0.8 * sum(r["loss"] for r in curve[:4])
    config, tensors = read_adapter(out)
    assert config["rank"] == 8 and config["group_size"] == 32 and len(config["targets"]) == 14
    assert config["base"]["desc_act"] is True and len(config["base"]["sha256"]) == 64
    # the adapter, loaded on a fresh copy of the base, gives the trained model's held-out loss,
    # computed here independently with plain transformers
    model, _ = load_quantized(qbase, dtype=torch.float32)
    attach_adapter(model, config, tensors)
    from qalora_cli.data.instruct import collate, load_records, tokenize_records
    from transformers import AutoTokenizer

    cfg = ft_cfg(tiny_model_dir, qbase, out)
    tok = AutoTokenizer.from_pretrained(qbase)
    _, eval_rec, _ = load_records(cfg.data)
    held, _ = tokenize_records(eval_rec, tok, cfg.data)
    batch = collate(held, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                             ignore_index=-100)
    assert abs(float(loss) - report["after"]["eval_loss"]) < 1e-4 * max(1.0, float(loss))


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tiny_model_dir, qbase, tmp_path, monkeypatch):
    settings = dict(max_steps=10, save_every=3, schedule="cosine", warmup_steps=2)
    whole = tmp_path / "whole"
    finetune_recipe.run(ft_cfg(tiny_model_dir, qbase, whole, **settings), show_progress=False)
    cut = tmp_path / "cut"
    cfg_cut = validate(dict(ft_dict(tiny_model_dir, qbase, cut, **settings),
                            lora={"rank": 8, "alpha": 16, "dropout": 0.1}), "t")
    cfg_whole = validate(dict(ft_dict(tiny_model_dir, qbase, tmp_path / "whole-dropout", **settings),
                              lora={"rank": 8, "alpha": 16, "dropout": 0.1}), "t")
    finetune_recipe.run(cfg_whole, show_progress=False)  # dropout: the RNG state must resume too
    with monkeypatch.context() as m, progress_that_ctrl_cs_at(5) as progress:
        m.setattr(finetune_recipe, "training_progress", progress)
        report = finetune_recipe.run(cfg_cut, show_progress=False)
    assert report["interrupted"] and report["steps"] == 5
    assert not (cut / "adapter_config.json").exists()  # no finished adapter claimed
    with pytest.raises(UserError, match="unfinished run"):
        finetune_recipe.run(cfg_cut, show_progress=False)
    finetune_recipe.run(cfg_cut, resume=True, show_progress=False)
    a, b = losses(tmp_path / "whole-dropout"), losses(cut)
    assert [r["step"] for r in b] == list(range(1, 11))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-7), x["step"]
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-12)
    ta, tb = read_adapter(tmp_path / "whole-dropout")[1], read_adapter(cut)[1]
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-7)
    assert losses(whole)[3]["loss"] != a[3]["loss"]  # dropout did change the curve
    # a crash after the last checkpoint but before the adapter was written: resume just finishes
    (cut / "adapter_config.json").unlink()
    report = finetune_recipe.run(cfg_cut, resume=True, show_progress=False)
    assert report["steps"] == 10 and (cut / "adapter_config.json").is_file()


def test_two_processes_give_the_one_process_curve(tiny_model_dir, qbase, tmp_path):
    one = tmp_path / "one"
    finetune_recipe.run(ft_cfg(tiny_model_dir, qbase, one, max_steps=6), show_progress=False)
    two = tmp_path / "two"
    cfg_file = tmp_path / "ft.yaml"
    cfg_file.write_text(yaml.safe_dump(ft_dict(tiny_model_dir, qbase, two, max_steps=6)))
    env = dict(os.environ, OMP_NUM_THREADS="1", QALORA_DEBUG="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", "29533", "-m", "qalora_cli", "finetune", "--config", str(cfg_file)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((two / "finetune_report.json").read_text())
    assert report["processes"] == 2
    for x, y in zip(losses(one), losses(two), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4), x["step"]
    t1, t2 = read_adapter(one)[1], read_adapter(two)[1]
    for k in t1:
        torch.testing.assert_close(t1[k], t2[k], rtol=1e-3, atol=1e-5)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, qbase, tmp_path):
    out = tmp_path / "nan"
    cfg = ft_cfg(tiny_model_dir, qbase, out, learning_rate=1e30, max_grad_norm=1e30, save_every=1, max_steps=6)
    with pytest.raises(UserError, match="the loss became (nan|inf)") as e:
        finetune_recipe.run(cfg, show_progress=False)
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps and f"step {int(steps[-1].split('-')[1])}" in str(e.value)
    assert not (out / "adapter_config.json").exists()


def test_bad_input_is_one_line_and_exit_2(tiny_model_dir, qbase, tmp_path):
    cfg_file = tmp_path / "ft.yaml"
    out = tmp_path / "adapter"
    cfg_file.write_text(yaml.safe_dump(ft_dict(tiny_model_dir, qbase, out, max_steps=2)))

    def ft(*args):
        r = runner.invoke(app, ["finetune", "--config", str(cfg_file), *args])
        return r.exit_code, r.output.strip()

    code, text = ft("--resume")
    assert code == 2 and "nothing to resume" in text
    out.mkdir()  # a finished adapter without checkpoints (what undoing a killed --overwrite leaves)
    (out / "adapter_config.json").write_text("{}")
    code, text = ft("--resume")
    assert code == 2 and "holds a finished adapter" in text and "--overwrite" in text
    shutil.rmtree(out)
    code, text = ft("--device", "cuda:7")
    assert code == 2 and "not available" in text
    code, text = ft("lora.targets=[q_proj, nope]")
    assert code == 2 and "'nope' matches no quantized layer" in text and "v_proj" in text
    code, text = ft("lora.group_size=64")
    assert code == 2 and "disagrees with the checkpoint's group size 32" in text
    code, text = ft("--model", str(tmp_path / "missing"))
    assert code == 2 and "no quantized model" in text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n' * 5)
    code, text = ft("--data", str(bad))
    assert code == 2 and "question" in text and "answer" in text
    assert not out.exists()  # nothing written by any failure

    code, text = ft()
    assert code == 0 and "exact match" not in text and "loss" in text
    # the adapter records the data it was trained on (the gptq export refits on it)
    recorded = json.loads((out / "adapter_config.json").read_text())["data"]
    assert recorded == validate(yaml.safe_load(cfg_file.read_text()), "t").data.model_dump(mode="json")
    code, text = ft()
    assert code == 2 and "already holds a finished adapter" in text
    # a checkpoint of another model refuses to resume
    other = tmp_path / "other"
    quantize(validate(tiny_config_dict(tiny_model_dir, other, bits=3, group_size=32), "t"), show_progress=False)
    code, text = ft("--model", str(other), "--resume")
    assert code == 2 and "trained on another model" in text


def test_gradient_checkpointing_gives_the_same_curve(tiny_model_dir, qbase, tmp_path):
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    r1 = finetune_recipe.run(ft_cfg(tiny_model_dir, qbase, plain, max_steps=3), show_progress=False)
    r2 = finetune_recipe.run(ft_cfg(tiny_model_dir, qbase, ckpt, max_steps=3, gradient_checkpointing=True),
                             show_progress=False)
    assert not r1["gradient_checkpointing"] and r2["gradient_checkpointing"]
    for x, y in zip(losses(plain), losses(ckpt), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def test_overlong_examples_are_counted_in_the_report(tiny_model_dir, qbase, tmp_path):
    d = ft_dict(tiny_model_dir, qbase, tmp_path / "a", max_steps=1, eval_every=1)
    d["data"].update(max_length=160, overlong="skip")
    report = finetune_recipe.run(validate(d, "t"), show_progress=False)
    stats = report["data_stats"]
    assert stats["skipped"] > 0 and stats["examples"] + stats["skipped"] == 140
    assert report["train_examples"] == stats["examples"]


def test_two_fine_tunes_with_other_precisions_run_in_one_process(tiny_model_dir, qbase, tmp_path):
    """A recipe runs several fine-tunes in one process: the second may ask for another precision
    (accelerate's process-wide state refused that before), and it really trains in bf16."""
    first = finetune_recipe.run(ft_cfg(tiny_model_dir, qbase, tmp_path / "a", max_steps=2, eval_every=2,
                                       save_every=2, mixed_precision="no"), show_progress=False)
    second = finetune_recipe.run(ft_cfg(tiny_model_dir, qbase, tmp_path / "b", max_steps=2, eval_every=2,
                                        save_every=2, mixed_precision="bf16"), show_progress=False)
    assert first["after"]["eval_loss"] != second["after"]["eval_loss"]
    # bf16 autocast rounds the forward: the two curves start from one model and already differ at step 1
    assert losses(tmp_path / "a")[0]["loss"] != losses(tmp_path / "b")[0]["loss"]


def test_a_killed_overwrite_of_an_unfinished_run_keeps_the_new_runs_checkpoints(tmp_path):
    """--overwrite of an empty folder (or an unfinished run) asked for the new run: once killed, its
    checkpoints stay for --resume, and what it replaced goes. Only a finished adapter is put back."""
    for earlier, kept in (({}, "new"), ({"metrics.jsonl": b"{}\n"}, "new"), ({"adapter_config.json": b"{}"}, "old")):
        case = tmp_path / str(len(list(tmp_path.iterdir())))
        out = case / "adapter"
        step = out / "checkpoints" / "step-000020"
        step.mkdir(parents=True)
        (step / "trainer_state.json").write_text("{}")
        old = case / f".adapter.old-{dead_owner()}"
        old.mkdir()
        for name, data in earlier.items():
            (old / name).write_bytes(data)
        if kept == "new":
            finetune_recipe.check_run_dir(out, resume=True, overwrite=False)
            assert finetune_recipe.checkpoint_dirs(out) == [step]
        else:
            with pytest.raises(UserError, match="holds a finished adapter"):
                finetune_recipe.check_run_dir(out, resume=True, overwrite=False)
            assert sorted(p.name for p in out.iterdir()) == sorted(earlier)
        assert [p.name for p in case.iterdir()] == ["adapter"]


def test_a_kill_during_overwrite_gives_the_earlier_adapter_back(tiny_model_dir, qbase, tmp_path):
    """--overwrite keeps the finished run aside until the new one is saved: SIGKILL mid-training,
    and the next finetune on that folder finds the earlier adapter in place, byte for byte."""
    out = tmp_path / "adapter"
    finetune_recipe.run(ft_cfg(tiny_model_dir, qbase, out, max_steps=2, eval_every=2, save_every=2),
                        show_progress=False)
    earlier = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    cfg_file = tmp_path / "ft.yaml"
    cfg_file.write_text(yaml.safe_dump(ft_dict(tiny_model_dir, qbase, out, max_steps=400, save_every=1)))
    proc = subprocess.Popen([sys.executable, "-m", "qalora_cli", "finetune", "--config", str(cfg_file),
                             "--overwrite"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (list(tmp_path.glob(".adapter.old-*")) and list(out.glob("checkpoints/step-*"))):
            assert time.time() < deadline and proc.poll() is None, "the overwrite never got under way"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "adapter_config.json").exists()  # the new run, unfinished, is in its place
    with pytest.raises(UserError, match="already holds a finished adapter"):
        finetune_recipe.check_run_dir(out, resume=False, overwrite=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == earlier
    assert not list(tmp_path.glob(".adapter.*"))
