"""Adapters to and from PEFT's QA-LoRA, checked against PEFT itself: PEFT (on transformers +
GPTQModel) loads our exported adapter and adds, layer by layer, the update ours adds; a
PEFT-trained-looking adapter imported into qalora adds PEFT's update."""

import json

import pytest
import torch

from helpers import tiny_config_dict
from qalora_cli.config.loader import validate
from qalora_cli.config.schema import LoraSection
from qalora_cli.errors import UserError
from qalora_cli.lora.adapter_io import (attach_adapter, checkpoint_sha256, make_adapter_config,
                                        read_adapter, save_adapter)
from qalora_cli.lora.inject import adapter_layers, inject_qalora
from qalora_cli.lora.peft_format import export_peft, import_peft
from qalora_cli.models.quantized_io import load_quantized
from qalora_cli.recipes.quantize import run as quantize

peft = pytest.importorskip("peft")
pytest.importorskip("gptqmodel")
pytest.importorskip("optimum")


@pytest.fixture(scope="module")
def base(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int4"
    quantize(validate(tiny_config_dict(tiny_model_dir, out, bits=4, group_size=32), "t"), show_progress=False)
    return out


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    model, qc = load_quantized(base, dtype=torch.float32)
    lora = LoraSection(rank=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(0)
    adapters = inject_qalora(model, lora)
    with torch.no_grad():
        for m in adapters.values():
            m.lora_B.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("a") / "adapter"
    save_adapter(out, adapters, make_adapter_config(lora, adapters, qc, base, checkpoint_sha256(base), "tiny"))
    return out


def _peft_model(base, peft_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, device_map="cpu", dtype=torch.float32)
    return PeftModel.from_pretrained(model, peft_dir).eval()


def _peft_delta(layer, x):
    """What PEFT's layer adds to its quantized base's output."""
    with torch.no_grad():
        return layer(x) - layer.quant_linear_module(x)


def _ours(base, adapter_dir):
    model, _ = load_quantized(base, dtype=torch.float32)
    config, tensors = read_adapter(adapter_dir)
    attach_adapter(model, config, tensors)
    return adapter_layers(model)


def test_export_is_what_peft_computes(base, adapter, tmp_path):
    pc = export_peft(adapter, base, tmp_path / "peft")
    assert pc["use_qalora"] and pc["qalora_group_size"] == 32
    peft_model = _peft_model(base, tmp_path / "peft")
    ours = _ours(base, adapter)
    assert len(ours) == 6
    x = torch.randn(3, 128)  # wide enough for down_proj; q/v take the first 64 columns
    for name, layer in ours.items():
        theirs = peft_model.base_model.model.get_submodule(name)
        assert type(theirs).__name__ == "GPTQLoraLinear" and theirs.lora_variant, name
        xi = x[:, :layer.in_features]
        mine = layer.adapter_output(xi)
        assert mine.abs().max() > 1e-3  # a real, non-zero update
        torch.testing.assert_close(_peft_delta(theirs, xi), mine, rtol=1e-4, atol=1e-5)


def test_import_adds_what_peft_adds(base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, device_map="cpu", dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "up_proj"], use_qalora=True,
                     qalora_group_size=32, lora_dropout=0.0)
    pm = get_peft_model(model, cfg).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "peft")
    config = import_peft(tmp_path / "peft", base, tmp_path / "ours")
    assert config["targets"] == sorted(config["targets"]) and len(config["targets"]) == 4
    ours = _ours(base, tmp_path / "ours")
    x = torch.randn(3, 64)
    for name, layer in ours.items():
        torch.testing.assert_close(layer.adapter_output(x), _peft_delta(pm.base_model.model.get_submodule(name), x),
                                   rtol=1e-4, atol=1e-5)


def test_round_trip_keeps_the_tensors(base, adapter, tmp_path):
    export_peft(adapter, base, tmp_path / "peft")
    import_peft(tmp_path / "peft", base, tmp_path / "back")
    (c1, t1), (c2, t2) = read_adapter(adapter), read_adapter(tmp_path / "back")
    assert c1["targets"] == sorted(c2["targets"]) or set(c1["targets"]) == set(c2["targets"])
    for k in t1:
        torch.testing.assert_close(t1[k], t2[k])


def test_refusals(base, adapter, tiny_model_dir, tmp_path):
    export_peft(adapter, base, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    cfg["qalora_group_size"] = 16
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="qalora_group_size 16 disagrees"):
        import_peft(tmp_path / "peft", base, tmp_path / "x")
    cfg["use_qalora"] = False
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="not a QA-LoRA adapter"):
        import_peft(tmp_path / "peft", base, tmp_path / "x")
    act = tmp_path / "act"
    quantize(validate(tiny_config_dict(tiny_model_dir, act, bits=4, group_size=32, act_order=True), "t"),
             show_progress=False)
    with pytest.raises(UserError, match="act-order"):
        export_peft(adapter, act, tmp_path / "y")
