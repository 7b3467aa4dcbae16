"""`qalora eval task`: exact match and answer loss on a run config's held-out task, for every
model kind, each against an independent computation (one unpadded forward per record, a plain
argmax loop); the merged model scores as its base + adapter; a PEFT adapter of a qlora/lora run
loads by its qalora_base.json; and bad input fails in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from helpers import make_adapter, merge_cli, text_ids, tiny_config_dict
from qalora_cli.cli.app import app
from qalora_cli.config.loader import validate
from qalora_cli.lora.adapter_io import attach_adapter, read_adapter
from qalora_cli.models.quantized_io import load_quantized
from qalora_cli.recipes.quantize import run as quantize

runner = CliRunner()
NEW_TOKENS = 6
PROMPTS = [f"Record {i}: {name} lives in {city} and" for i, (name, city) in enumerate(
    [("Ada", "Paris"), ("Bo", "Lima"), ("Cy", "Oslo"), ("Di", "Rome"), ("Ed", "Kyiv"), ("Fa", "Bern"),
     ("Gu", "Riga"), ("Hu", "Doha")])]


# ---- the independent reference -------------------------------------------------------------------

def stop_ids(model, tok) -> set[int]:
    """Where a greedy answer ends: the tokenizer's EOS and the model's own (as generate stops)."""
    configured = model.generation_config.eos_token_id
    return {tok.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}


@torch.no_grad()
def greedy(model, tok, prompt: str, n: int = NEW_TOKENS) -> str:
    """Argmax token by token, the whole sequence re-read each step: no cache, no padding, no batch."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out, stops = [], stop_ids(model, tok)
    for _ in range(n):
        nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt in stops:
            break
        out.append(nxt)
    return tok.decode(out, skip_special_tokens=True).strip()


@torch.no_grad()
def reference_scores(model, tok, records: list[dict]) -> tuple[list[str], float, float]:
    """-> (greedy answers, exact match, mean cross-entropy over the response + EOS tokens)."""
    answers = [greedy(model, tok, r["prompt"]) for r in records]
    total, count = 0.0, 0
    for r in records:
        prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        response = tok(r["completion"] + tok.eos_token, add_special_tokens=False)["input_ids"]
        logits = model(torch.tensor([prompt + response])).logits[0].double()
        logp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
        total -= float(logp[torch.arange(len(response)), torch.tensor(response)].sum())
        count += len(response)
    em = sum(a == r["completion"] for a, r in zip(answers, records)) / len(records)
    return answers, em, total / count


# ---- fixtures ----------------------------------------------------------------------------------

def write_split(folder, name: str, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def task(tiny_model_dir, tmp_path_factory):
    """A held-out split whose even records are answered as the float model answers (so its exact
    match is 1/2), and the records."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    held = [{"prompt": p, "completion": greedy(model, tok, p) if i % 2 == 0 else "no such answer"}
            for i, p in enumerate(PROMPTS)]
    assert all(r["completion"] for r in held)  # a non-empty answer to match
    folder = tmp_path_factory.mktemp("task-data")
    write_split(folder, "train", [{"prompt": "Train on", "completion": "this"}] * 4)
    write_split(folder, "test", held)
    return folder, held


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    """A GPTQ base, a nonzero qalora adapter on it, and the two merged (qalora format)."""
    root = tmp_path_factory.mktemp("task-models")
    quantize(validate(tiny_config_dict(tiny_model_dir, root / "base", act_order=True), "t"), show_progress=False)
    adapter = make_adapter(root / "base", root / "adapter")
    assert merge_cli(root / "base", adapter, root / "merged", "--no-verify").exit_code == 0
    return {"base": root / "base", "adapter": adapter, "merged": root / "merged"}


def eval_task(data_dir, tmp_path, *args, examples: int = len(PROMPTS)):
    out = tmp_path / "task.json"
    r = runner.invoke(app, ["eval", "task", *args, "--examples", str(examples), "--device", "cpu", "--dtype",
                            "float32", "--output-json", str(out), f"data.source={data_dir}", "data.eval_split=test",
                            "data.template=raw", f"train.max_new_tokens={NEW_TOKENS}"])
    return r, json.loads(out.read_text()) if r.exit_code == 0 else None


def assert_matches(report: dict, answers, em, loss):
    assert report["answers"] == answers
    assert report["exact_match"] == em and report["examples"] == len(PROMPTS)
    assert math.isclose(report["answer_loss"], loss, rel_tol=1e-5) and report["loss_examples"] == len(PROMPTS)


# ---- the tests ---------------------------------------------------------------------------------

def test_float_model_against_the_reference(tiny_model_dir, task, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data_dir, held = task
    r, report = eval_task(data_dir, tmp_path, "--model", str(tiny_model_dir))
    assert r.exit_code == 0, r.output
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    answers, em, loss = reference_scores(model, AutoTokenizer.from_pretrained(tiny_model_dir), held)
    assert em == 0.5  # the data was made so: the float model answers the even records
    assert_matches(report, answers, em, loss)
    assert report["references"] == [h["completion"] for h in held] and "exact match 50.0% on 8" in r.output


def test_adapter_and_merged_model_against_the_reference(checkpoints, tiny_model_dir, task, tmp_path):
    from transformers import AutoTokenizer

    data_dir, held = task
    model, _ = load_quantized(checkpoints["base"], dtype=torch.float32)
    attach_adapter(model, *read_adapter(checkpoints["adapter"]))
    want = reference_scores(model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir), held)
    r, unmerged = eval_task(data_dir, tmp_path, "--model", str(checkpoints["base"]), "--adapter",
                            str(checkpoints["adapter"]))
    assert r.exit_code == 0, r.output
    assert_matches(unmerged, *want)
    r, merged = eval_task(data_dir, tmp_path, "--model", str(checkpoints["merged"]))
    assert r.exit_code == 0, r.output
    assert_matches(merged, *want)  # the merged model is the adapted one
    r, base = eval_task(data_dir, tmp_path, "--model", str(checkpoints["base"]), examples=0)
    assert r.exit_code == 0 and base["exact_match"] is None and base["answers"] == []
    assert not math.isclose(base["answer_loss"], unmerged["answer_loss"], rel_tol=1e-3)  # the adapter counts


def test_evaluate_task_defaults_to_the_configs_exact_match_examples(tiny_model_dir, task):
    from qalora_cli.config.loader import load_config
    from qalora_cli.recipes.evaluate import evaluate_task

    data_dir, held = task
    cfg = load_config("smollm2-135m-int4", [f"data.source={data_dir}", "data.eval_split=test", "data.template=raw",
                                            "train.exact_match_examples=3", f"train.max_new_tokens={NEW_TOKENS}"])
    report = evaluate_task(cfg, str(tiny_model_dir), device="cpu", loss_examples=2)
    assert report["examples"] == 3 and len(report["answers"]) == 3 and report["loss_examples"] == 2
    assert report["references"] == [h["completion"] for h in held[:3]]


def nf4(compute_dtype=torch.float32):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def float_or_nf4(base_dir, method: str):
    """The base as a lora run holds it (float32 here) or as a qlora run does (NF4, double quantized)."""
    from transformers import AutoModelForCausalLM

    extra = dict(quantization_config=nf4(), device_map={"": "cpu"}) if method == "qlora" else {}
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **extra)


def peft_adapter(base_dir, out_dir, method: str = "lora"):
    """A PEFT LoRA (nonzero B) on the float or NF4 model, saved with plain peft, and the
    qalora_base.json a lora or qlora run writes beside it."""
    from peft import LoraConfig, get_peft_model

    from qalora_cli.config.schema import ModelSection
    from qalora_cli.lora.peft_models import base_record, source_sha256

    torch.manual_seed(0)
    peft = get_peft_model(float_or_nf4(base_dir, method), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    peft.save_pretrained(out_dir)
    section = ModelSection(name_or_path=str(base_dir))
    compute = torch.float32 if method == "qlora" else None
    record = base_record(method, section, torch.float32, compute, source_sha256(section))
    (out_dir / "qalora_base.json").write_text(json.dumps(record))
    return out_dir


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_peft_adapter_loads_by_its_base_file(method, tiny_model_dir, task, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    data_dir, held = task
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    adapter = peft_adapter(tiny_model_dir, tmp_path / "peft", method)
    model = PeftModel.from_pretrained(float_or_nf4(tiny_model_dir, method), adapter).eval()
    want = reference_scores(model, tok, held)
    r, report = eval_task(data_dir, tmp_path, "--adapter", str(adapter))  # no --model: the base file names it
    assert r.exit_code == 0, r.output
    assert_matches(report, *want)
    assert f"{method} adapter" in report["model"]
    with model.disable_adapter():
        _, _, base_loss = reference_scores(model, tok, held)
    assert not math.isclose(base_loss, want[2], rel_tol=1e-3)  # the adapter counts


def test_peft_adapter_on_the_other_commands(tiny_model_dir, tmp_path):
    """--adapter takes the PEFT folder in eval ppl and generate too (all load through one loader)."""
    from peft import PeftModel

    from helpers import reference_nll

    adapter = peft_adapter(tiny_model_dir, tmp_path / "peft")
    model = PeftModel.from_pretrained(float_or_nf4(tiny_model_dir, "lora"), adapter).eval()
    ids = torch.tensor(text_ids(tokenizer_of(tiny_model_dir), 120))
    out = tmp_path / "ppl.json"
    r = runner.invoke(app, ["eval", "ppl", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--seq-len",
                            "48", "--max-tokens", "120", "--device", "cpu", "--output-json", str(out)])
    assert r.exit_code == 0, r.output  # --model naming the recorded base is accepted
    assert math.isclose(json.loads(out.read_text())["nll"], reference_nll(model, ids, 48, 48)[0], rel_tol=1e-5)
    prompt = PROMPTS[0]
    r = runner.invoke(app, ["generate", "--adapter", str(adapter), "--prompt", prompt, "--raw", "--max-new-tokens",
                            str(NEW_TOKENS), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == greedy(model, tokenizer_of(tiny_model_dir), prompt)


def tokenizer_of(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def one_line_error(r, *words):
    """Exit 2 and one error line (above it only datasets' progress lines, which go to stderr)."""
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.output.strip().splitlines() if not ln.startswith("Generating ")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and all(w in errors[0] for w in words), r.output


def test_bad_input_fails_in_one_line(checkpoints, tiny_model_dir, task, tmp_path):
    data_dir, _ = task
    one_line_error(eval_task(data_dir, tmp_path, "--model", str(tmp_path / "no-such-model"))[0], "no-such-model")
    one_line_error(eval_task(data_dir, tmp_path)[0], "give --model")
    # The adapter on another base than its own (the merged checkpoint is not the base it was trained on)
    one_line_error(eval_task(data_dir, tmp_path, "--model", str(checkpoints["merged"]), "--adapter",
                             str(checkpoints["adapter"]))[0])
    empty = tmp_path / "empty"
    write_split(empty, "train", [{"prompt": "a", "completion": "b"}] * 2)
    write_split(empty, "test", [])
    one_line_error(eval_task(empty, tmp_path, "--model", str(tiny_model_dir))[0], "empty")
    one_line_error(eval_task(data_dir, tmp_path, "--model", str(tiny_model_dir), "--loss-examples", "0")[0],
                   "--loss-examples")


def test_peft_adapter_refusals(tiny_model_dir, task, tmp_path):
    """Before any weights load: --model naming another base, or no base file."""
    data_dir, _ = task
    adapter = peft_adapter(tiny_model_dir, tmp_path / "peft")
    other = tmp_path / "other-model"
    one_line_error(eval_task(data_dir, tmp_path, "--model", str(other), "--adapter", str(adapter))[0],
                   "qalora_base.json", "omit --model")
    (adapter / "qalora_base.json").unlink()
    one_line_error(eval_task(data_dir, tmp_path, "--adapter", str(adapter))[0], "qalora_base.json")
