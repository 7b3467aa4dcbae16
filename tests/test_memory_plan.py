"""`--dry-run` memory plans (qalora_cli/plan): they read configs only (a folder whose weights are
gone or damaged still plans), write nothing, count the weights of a 70B Llama as the arithmetic
of its config does (INT4 packed for QA-LoRA, the 16-bit model of finetune.method lora, NF4 with
double quantization for qlora, the float32 model of merge --format float), and refuse a missing
or damaged config in one line (exit 2). The plans against measured peaks on SmolLM2:
tests/test_memory_plan_slow.py."""

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from helpers import tiny_config_dict
from qalora_cli.cli.app import app

runner = CliRunner()

LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16"}


def write_config(tmp_path, model_dir, **sections) -> str:
    d = tiny_config_dict(model_dir, tmp_path / "out" / "q")
    for key, value in sections.items():
        d.setdefault(key, {}).update(value)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


def tree(root):
    """Every path under `root` with its size and modification time: what a run may not change."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def plan_json(*args) -> dict:
    r = runner.invoke(app, [*args, "--dry-run", "--output-json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def component(plan: dict, phase: str, prefix: str) -> int:
    ph = next(p for p in plan["phases"] if p["name"] == phase)
    return next(c["bytes"] for c in ph["components"] if c["name"].startswith(prefix))


def fake_checkpoint(folder, config: dict, bits=4, group_size=32):
    """A quantized checkpoint folder with its config.json only: no weight file at all."""
    folder.mkdir(parents=True)
    q = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False, "sym": False}
    (folder / "config.json").write_text(json.dumps(dict(config, quantization_config=q)))
    return folder


@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
def test_every_stage_plans_without_reading_weights_and_writes_nothing(tiny_model_dir, tmp_path, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    if damage == "deleted":
        weights.unlink()
    else:
        weights.write_bytes(b"\x00garbage, not a safetensors file" * 3)
    cfg = write_config(tmp_path, model)
    base = fake_checkpoint(tmp_path / "base", json.loads((model / "config.json").read_text()))
    before = tree(tmp_path)
    runs = [["quantize", "--config", cfg], ["finetune", "--config", cfg, "--model", str(base)],
            ["merge", "--config", cfg, "--model", str(base)],
            ["finetune", "--config", cfg],  # no checkpoint yet: planned from the model it will be made of
            ["finetune", "--config", cfg, "--method", "lora"], ["finetune", "--config", cfg, "--method", "qlora"],
            ["merge", "--config", cfg, "--format", "float", "finetune.method=qlora"]]  # no adapter yet
    for args in runs:
        r = runner.invoke(app, [*args, "--dry-run"])
        assert r.exit_code == 0, (args, r.output)
        assert f"{args[0]} needs" in r.output and "of CPU RAM" in r.output
    assert tree(tmp_path) == before  # nothing written, nothing touched
    assert not (tmp_path / "out").exists()


def test_70b_llama_quantized_weights_match_the_arithmetic_of_its_config(tmp_path):
    model = tmp_path / "llama-70b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_70B))
    cfg = write_config(tmp_path, model, quantize={"bits": 4, "group_size": 128})
    h, inter, kv, layers, vocab, g = 8192, 28672, 8 * 128, 80, 32000, 128
    # the linear layers of one block, by hand: q, o [h x h]; k, v [h x kv]; gate, up, down [h x inter]
    weights = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    assert 68e9 < weights < 69e9
    g_idx = layers * 4 * (6 * h + inter)  # int32 per input column: six layers read h, down reads inter
    packed_fp16 = weights * 4 // 8 + weights // g * (2 + 4 / 8) + g_idx  # codes, fp16 scales, 4-bit zeros
    plan = plan_json("quantize", "--config", cfg)
    got = component(plan, "saving", "packed layers")
    assert abs(got - packed_fp16) / packed_fp16 < 0.01, (got, packed_fp16)
    params = weights + 2 * vocab * h + layers * 2 * h + h  # + embeddings, head, norms
    assert component(plan, "first block", "float model") == params * 4  # float32 (the config's dtype)
    # each finished block is packed into the model: at the last block the 80 blocks' float
    # weights are gone but one, and the peak is the float model, not the float model plus codes
    last = component(plan, "last block", "float embeddings") + component(plan, "last block", "the last block's")
    assert last == (params - weights + weights // layers) * 4
    totals = {p["name"]: sum(c["bytes"] for c in p["components"] if c["device"] == "cpu") for p in plan["phases"]}
    assert totals["last block"] < 0.5 * totals["first block"]

    # finetune on the CPU holds the packed layers with float32 scales, the rest in float32
    ft = plan_json("finetune", "--config", cfg)
    packed_fp32 = weights * 4 // 8 + weights // g * (4 + 4 / 8) + g_idx
    model_bytes = packed_fp32 + (params - weights) * 4
    got = component(ft, "training step", "quantized model")
    assert abs(got - model_bytes) / model_bytes < 0.01, (got, model_bytes)
    assert ft["peak_bytes"]["cpu"] > model_bytes
    merge = plan_json("merge", "--config", cfg)
    assert merge["peak_bytes"]["cpu"] > packed_fp32  # verification holds the whole model


def test_the_plan_follows_the_settings(tiny_model_dir, tmp_path):
    model = tmp_path / "llama-70b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_70B))

    def training(**train):
        cfg = write_config(tmp_path, model, train=train, data={"max_length": 1024})
        return plan_json("finetune", "--config", cfg)

    one, two = training(micro_batch_size=1, batch_size=2), training(micro_batch_size=2, batch_size=2)
    acts = [component(p, "training step", "activations kept") for p in (one, two)]
    assert acts[1] == 2 * acts[0]
    ckpt = training(micro_batch_size=2, batch_size=2, gradient_checkpointing=True)
    kept = component(ckpt, "training step", "block inputs kept")
    assert kept == 2 * 1024 * 80 * 8192 * 4  # the residual stream at every block boundary, float32
    step = [next(ph for ph in p["phases"] if ph["name"] == "training step")["total_bytes"]["cpu"] for p in (ckpt, two)]
    assert step[0] < step[1]
    gpu = plan_json("quantize", "--config", write_config(tmp_path, model, quantize={"device": "cuda"}))
    assert set(gpu["peak_bytes"]) == {"cpu", "cuda"}  # planned for a GPU without one


@pytest.mark.parametrize("case", ["no config.json", "damaged config.json"])
def test_bad_model_folder_is_one_line_exit_2(tmp_path, case):
    model = tmp_path / "model"
    model.mkdir()
    if case == "damaged config.json":
        (model / "config.json").write_text("{not json")
    cfg = write_config(tmp_path, model)
    for args in (["quantize", "--config", cfg], ["finetune", "--config", cfg, "--model", str(model)],
                 ["merge", "--config", cfg, "--model", str(model)]):
        r = runner.invoke(app, [*args, "--dry-run"])
        assert r.exit_code == 2, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1 and r.output.startswith("error:"), r.output
        assert "config" in r.output


def llama_70b(tmp_path):
    model = tmp_path / "llama-70b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_70B))
    return model


# a Llama-2-70B by hand: hidden, MLP width, key/value width, blocks, vocabulary
H, INTER, KV, LAYERS, VOCAB = 8192, 28672, 8 * 128, 80, 32000
# (in, out) of q, k, v, o, gate, up, down
BLOCK_LINEARS = [(H, H), (H, KV), (H, KV), (H, H), (H, INTER), (H, INTER), (INTER, H)]
WEIGHTS = LAYERS * sum(i * o for i, o in BLOCK_LINEARS)
PARAMS = WEIGHTS + 2 * VOCAB * H + LAYERS * 2 * H + H  # + embeddings, head, norms
FLOAT_PARAMS = PARAMS - WEIGHTS


def lora_params(rank: int) -> int:
    """PEFT LoRA on every linear layer of the blocks: A [rank, in], B [out, rank]."""
    return LAYERS * sum(rank * i + o * rank for i, o in BLOCK_LINEARS)


def test_70b_lora_finetune_holds_the_16_bit_model_and_float32_adapters(tmp_path):
    cfg = write_config(tmp_path, llama_70b(tmp_path), lora={"rank": 16}, data={"max_length": 512},
                       train={"micro_batch_size": 2, "batch_size": 2})
    plan = plan_json("finetune", "--config", cfg, "--method", "lora")
    assert plan["settings"].startswith("LoRA rank 16 on the bfloat16 model")
    assert component(plan, "training step", "16-bit model") == PARAMS * 2
    assert component(plan, "loading the 16-bit model", "16-bit model") == PARAMS * 2
    # the adapters, their gradients and AdamW's two states: 16 bytes a float32 parameter
    assert component(plan, "training step", "adapters, gradients") == 16 * lora_params(16)
    assert 16 * lora_params(16) / 2**30 == pytest.approx(3.09, abs=0.01)
    ckpt = plan_json("finetune", "--config", cfg, "--method", "lora", "train.gradient_checkpointing=true")
    assert component(ckpt, "training step", "block inputs kept") == 2 * 512 * LAYERS * H * 2  # a 16-bit stream
    assert ckpt["peak_bytes"]["cpu"] < plan["peak_bytes"]["cpu"]


def test_70b_qlora_finetune_holds_nf4_with_double_quantization(tmp_path):
    cfg = write_config(tmp_path, llama_70b(tmp_path), lora={"rank": 16}, data={"max_length": 512},
                       train={"micro_batch_size": 2, "batch_size": 2})
    plan = plan_json("finetune", "--config", cfg, "--method", "qlora")
    assert plan["settings"].startswith("QLoRA (NF4, double quant) rank 16")
    # 4 bits a weight; an absmax a 64-weight block, in 8 bits; a float32 absmax per 256 of those
    nf4 = WEIGHTS // 2 + WEIGHTS // 64 + WEIGHTS // 64 // 256 * 4
    assert nf4 / WEIGHTS == pytest.approx(0.5159, abs=1e-4)
    model = nf4 + FLOAT_PARAMS * 2  # the output layer, embeddings and norms stay 16-bit
    got = component(plan, "training step", "NF4 linear layers")
    assert abs(got - model) / model < 0.01, (got, model)
    assert component(plan, "training step", "adapters, gradients") == 16 * lora_params(16)
    lora = plan_json("finetune", "--config", cfg, "--method", "lora")
    assert plan["peak_bytes"]["cpu"] < lora["peak_bytes"]["cpu"] - PARAMS  # NF4 saves over a byte a weight
    # qlora loads the 70B from its folder straight into NF4: no 16-bit model is ever held
    assert not any(ph["name"].startswith("loading the 16-bit") for ph in plan["phases"])


def test_70b_float_merge_holds_the_float32_model(tmp_path):
    cfg = write_config(tmp_path, llama_70b(tmp_path), lora={"rank": 16}, merge={"device": "cpu"})
    plan = plan_json("merge", "--config", cfg, "--format", "float", "finetune.method=lora")
    assert "the lora adapter (rank 16) merged into the float32 model" in plan["settings"]
    assert component(plan, "merging and saving", "float32 model") == PARAMS * 4
    assert component(plan, "merging and saving", "adapter") == 4 * lora_params(16)
    assert component(plan, "probing the float model + adapter, unmerged", "float32 model") == PARAMS * 4
    assert plan["peak_bytes"]["cpu"] > PARAMS * 4
    qlora = plan_json("merge", "--config", cfg, "--format", "float", "finetune.method=qlora")
    nf4_probe = "probing the NF4 model + adapter, as trained"  # a qlora adapter's model as trained
    assert nf4_probe in [ph["name"] for ph in qlora["phases"]]
    assert nf4_probe not in [ph["name"] for ph in plan["phases"]]


def test_float_merge_plans_the_adapter_it_finds(tiny_model_dir, tmp_path):
    """A PEFT adapter's method, rank and base come from its config files; its weights are not read."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (adapter / "adapter_model.safetensors").write_bytes(b"not read")
    base = {"method": "qlora", "base": {"name_or_path": str(tiny_model_dir)}, "dtype": "bfloat16",
            "nf4": {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}, "base_sha256": "x"}
    (adapter / "qalora_base.json").write_text(json.dumps(base))
    cfg = write_config(tmp_path, tmp_path / "elsewhere", lora={"rank": 64})
    before = tree(tmp_path)
    plan = plan_json("merge", "--config", cfg, "--format", "float", "--adapter", str(adapter))
    assert "the qlora adapter (rank 4)" in plan["settings"] and plan["model"].endswith(tiny_model_dir.name)
    assert any(ph["name"] == "probing the NF4 model + adapter, as trained" for ph in plan["phases"])
    assert tree(tmp_path) == before


@pytest.mark.parametrize("case", ["a QA-LoRA adapter", "no adapter, finetune.method qalora"])
def test_float_merge_of_no_peft_adapter_is_refused_in_one_line(tiny_model_dir, tmp_path, case):
    adapter = tmp_path / "adapter"
    if case == "a QA-LoRA adapter":
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"rank": 8, "targets": []}))
    cfg = write_config(tmp_path, tiny_model_dir)
    r = runner.invoke(app, ["merge", "--config", cfg, "--format", "float", "--adapter", str(adapter), "--dry-run"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.startswith("error:") and "qlora or lora" in r.output
