"""The paper's baselines as `finetune.method`: lora (PEFT LoRA on the 16-bit float model) and
qlora (bitsandbytes NF4 with double quantization + PEFT LoRA), trained by the same loop as
QA-LoRA, on a tiny Llama. Checked against plain transformers/PEFT: the saved adapter reloaded
on a freshly loaded base gives the trained model's held-out loss, the NF4 layers are what QLoRA
uses, Ctrl-C then --resume gives the uninterrupted curve, and `merge --format float` gives a
plain HF folder whose logits are the unmerged model's."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from helpers import progress_that_ctrl_cs_at, tiny_finetune_dict
from qalora_cli.cli.app import app
from qalora_cli.config.loader import validate
from qalora_cli.recipes import finetune as finetune_recipe

pytest.importorskip("peft")
runner = CliRunner()


def method_dict(model_dir, root, adapter_dir, method, **train):
    d = tiny_finetune_dict(model_dir, root / "int4-unused", adapter_dir,
                           **{"learning_rate": 2e-2, "max_steps": 16, "eval_every": 8, "save_every": 8, **train})
    d["finetune"] = {"method": method}
    return d


def losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """{method: (run folder, report)}: one short run of each baseline."""
    root = tmp_path_factory.mktemp("methods")
    out = {}
    for method in ("lora", "qlora"):
        cfg = validate(method_dict(tiny_model_dir, root, root / method, method), "t")
        out[method] = (root / method, finetune_recipe.run(cfg, show_progress=False))
    return out


def plain_base(model_dir, method, dtype=torch.bfloat16):
    """The base as a QLoRA/LoRA user loads it, with transformers alone."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if method == "lora":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=nf4, dtype=dtype,
                                                device_map={"": "cpu"})


def held_out_batch(model_dir, root):
    from transformers import AutoTokenizer

    from qalora_cli.data.instruct import collate, load_records, tokenize_records

    cfg = validate(method_dict(model_dir, root, root / "x", "lora"), "t")
    tok = AutoTokenizer.from_pretrained(model_dir)
    _, eval_rec, _ = load_records(cfg.data)
    held, _ = tokenize_records(eval_rec, tok, cfg.data)
    return collate(held, tok.pad_token_id)


def response_loss(model, batch) -> float:
    """Token-mean cross-entropy over the response tokens, in float64."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(),
                                                   batch["labels"][:, 1:].flatten(), ignore_index=-100))


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_the_loss_falls_and_plain_peft_reproduces_the_trained_model(runs, method, tiny_model_dir, tmp_path):
    from peft import PeftModel

    run_dir, report = runs[method]
    assert report["method"] == method and not report["interrupted"] and report["steps"] == 16
    assert report["after"]["eval_loss"] < 0.8 * report["before"]["eval_loss"]
    assert [r["step"] for r in losses(run_dir)] == list(range(1, 17))
    peft_cfg = json.loads((run_dir / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 8 and peft_cfg["lora_alpha"] == 16
    assert len(peft_cfg["target_modules"]) == 14  # 2 blocks x q,k,v,o,gate,up,down, as QA-LoRA's all-linear
    assert (run_dir / "adapter_model.safetensors").is_file() and not (run_dir / "adapter_model.bin").exists()
    base = json.loads((run_dir / "qalora_base.json").read_text())
    assert base["method"] == method and base["base"]["name_or_path"] == str(tiny_model_dir)
    assert len(base["base_sha256"]) == 64 and base["dtype"] == "bfloat16"
    assert base["nf4"] == ({"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
                           if method == "qlora" else None)
    assert json.loads((run_dir / "finetune_report.json").read_text())["after"] == report["after"]
    # the saved adapter on a freshly loaded base (transformers + PEFT alone) gives the trained
    # model's held-out loss, computed here on one batch rather than the loop's micro-batches
    model = PeftModel.from_pretrained(plain_base(tiny_model_dir, method), run_dir).eval()
    assert response_loss(model, held_out_batch(tiny_model_dir, tmp_path)) == \
        pytest.approx(report["after"]["eval_loss"], rel=5e-3)


def test_qlora_trains_as_well_as_lora_on_the_tiny_model(runs):
    """NF4 costs the tiny model little: the QLoRA curve follows LoRA's (a gradient lost in the
    frozen NF4 layers, as bitsandbytes' CPU inference kernel would lose it, leaves it far behind)."""
    lora, qlora = runs["lora"][1]["after"]["eval_loss"], runs["qlora"][1]["after"]["eval_loss"]
    assert qlora < 1.15 * lora


def test_qlora_base_is_bitsandbytes_nf4_with_double_quantization(runs):
    import bitsandbytes as bnb

    from qalora_cli.lora.peft_models import load_peft_adapter_model

    model, tok = load_peft_adapter_model(runs["qlora"][0], "cpu")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 14 and not any("lm_head" in n for n in layers)
    for m in layers.values():
        assert m.weight.quant_type == "nf4" and m.weight.quant_state.nested  # nested: the double quantization
        assert m.compute_dtype == torch.bfloat16
    lora = [n for n, p in model.named_parameters() if "lora_" in n]
    assert len(lora) == 28 and tok.pad_token is not None


def test_the_shared_loader_gives_plain_peft_s_model(runs, tiny_model_dir):
    """load_peft_adapter_model (evaluation uses it) = transformers + PEFT by hand, logit for logit."""
    from peft import PeftModel

    from qalora_cli.lora.peft_models import load_peft_adapter_model

    ids = torch.arange(3, 40)[None]
    for method in ("lora", "qlora"):
        ours, _ = load_peft_adapter_model(runs[method][0], "cpu")
        plain = PeftModel.from_pretrained(plain_base(tiny_model_dir, method), runs[method][0]).eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)


def test_lora_ctrl_c_then_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    settings = dict(max_steps=8, save_every=3, eval_every=4, schedule="cosine", warmup_steps=2)

    def cfg(name):  # dropout on: the RNG state must resume too
        return validate(dict(method_dict(tiny_model_dir, tmp_path, tmp_path / name, "lora", **settings),
                             lora={"rank": 8, "alpha": 16, "dropout": 0.1}), "t")

    finetune_recipe.run(cfg("whole"), show_progress=False)
    with monkeypatch.context() as m, progress_that_ctrl_cs_at(4) as progress:
        m.setattr(finetune_recipe, "training_progress", progress)
        report = finetune_recipe.run(cfg("cut"), show_progress=False)
    assert report["interrupted"] and report["steps"] == 4 and not (tmp_path / "cut" / "adapter_config.json").exists()
    finetune_recipe.run(cfg("cut"), resume=True, show_progress=False)
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert [r["step"] for r in b] == list(range(1, 9))
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-7), x["step"]
    from safetensors.torch import load_file

    ta, tb = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("whole", "cut"))
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-7)


def write_config(tmp_path, d):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


def cli(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output.strip()


def test_float_merge_gives_the_unmerged_model_in_a_plain_folder(runs, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = write_config(tmp_path, method_dict(tiny_model_dir, tmp_path, tmp_path / "x", "lora"))
    ids = torch.arange(5, 60)[None]
    for method in ("lora", "qlora"):
        out = tmp_path / f"merged-{method}"
        code, text = cli("merge", "--config", config, "--adapter", runs[method][0], "--format", "float", "-o", out,
                         "merge.ppl_tokens=0", "merge.generate_tokens=0")
        assert code == 0, text
        assert "verdict: pass" in text
        report = json.loads((out / "merge_report.json").read_text())
        assert ("nf4_vs_merged" in report) == (method == "qlora")
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert not hasattr(merged.config, "quantization_config") and not list(out.glob("*.bin"))
        unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                             runs[method][0]).eval()
        with torch.no_grad():
            a, b = merged(input_ids=ids).logits, unmerged(input_ids=ids).logits
        assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max())
        with torch.no_grad(), unmerged.disable_adapter():  # and the adapter is in: the base alone is far off
            base = unmerged(input_ids=ids).logits
        assert float((base - b).abs().max()) > 1e-2 * float(b.abs().max())
    # QLoRA w/ GPTQ: the merged folder is a model `qalora quantize` takes
    code, text = cli("quantize", "--config", config, "--model", tmp_path / "merged-qlora", "--output",
                     tmp_path / "qlora-gptq", "quantize.method=rtn")
    assert code == 0, text
    assert (tmp_path / "qlora-gptq" / "config.json").is_file()


def test_bad_input_is_one_line_and_exit_2(runs, tiny_model_dir, tmp_path):
    out = tmp_path / "never"
    config = write_config(tmp_path, method_dict(tiny_model_dir, tmp_path, out, "lora", max_steps=2))

    def one_line(code, text, *needles):
        assert code == 2 and "\n" not in text and all(n in text for n in needles), text

    one_line(*cli("finetune", "--config", config, "--method", "qlora", "lora.init=svd"),
             "lora.init svd applies to finetune.method qalora only")
    one_line(*cli("finetune", "--config", config, "--method", "bogus"), "finetune.method")
    one_line(*cli("finetune", "--config", config, "--model", tmp_path), "train.quantized_model")
    one_line(*cli("finetune", "--config", config, "lora.group_size=32"), "lora.group_size")
    one_line(*cli("finetune", "--config", config, "lora.targets=[q_proj, nope]"), "'nope' matches no linear layer")
    one_line(*cli("finetune", "--config", config, "model.name_or_path=" + str(tmp_path / "missing")), "no model at")
    assert not out.exists()
    # a qlora run cannot continue a lora run's checkpoints
    code, text = cli("finetune", "--config", config, "--method", "qlora", "--resume", "-o", runs["lora"][0])
    one_line(code, text, "finetune.method lora")
    # merge: a PEFT adapter merges with --format float only, a QA-LoRA adapter never with it
    merged = tmp_path / "m"
    one_line(*cli("merge", "--config", config, "--adapter", runs["lora"][0], "--format", "gptq", "-o", merged),
             "--format float")
    qalora_like = tmp_path / "qa"
    qalora_like.mkdir()
    (qalora_like / "adapter_config.json").write_text(json.dumps({"format": "qalora-adapter"}))
    one_line(*cli("merge", "--config", config, "--adapter", qalora_like, "--format", "float", "-o", merged),
             "QA-LoRA adapter", "--format qalora")
    one_line(*cli("merge", "--config", config, "--adapter", tmp_path / "none", "--format", "float", "-o", merged),
             "not an adapter folder")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (damaged / f).write_bytes((runs["lora"][0] / f).read_bytes())
    (damaged / "qalora_base.json").write_text('{"method": "qlora"}')
    one_line(*cli("merge", "--config", config, "--adapter", damaged, "--format", "float", "-o", merged), "damaged")
    assert not merged.exists()
