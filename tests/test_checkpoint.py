"""A qalora GPTQ checkpoint: our loader reproduces the quantized model exactly, and a peer
(transformers + GPTQModel) loads the same files to the same logits."""

import json

import pytest
import torch

from helpers import tiny_config_dict
from qalora_cli.config.loader import validate
from qalora_cli.models.quantized_io import load_quantized
from qalora_cli.recipes.quantize import run


@pytest.fixture(scope="module", params=[(4, 32, False), (3, 64, True), (2, 32, False), (8, -1, False)],
                ids=["int4-g32", "int3-g64-actorder", "int2-g32", "int8-perchannel"])
def quantized(request, tiny_model_dir, tmp_path_factory):
    bits, group, act_order = request.param
    out = tmp_path_factory.mktemp("q") / "model"
    cfg = validate(tiny_config_dict(tiny_model_dir, out, bits=bits, group_size=group, act_order=act_order), "test")
    report = run(cfg, show_progress=False)
    return out, report, cfg


def test_layout_and_config(quantized):
    out, report, cfg = quantized
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and qc["sym"] is False
    assert qc["bits"] == cfg.quantize.bits and qc["group_size"] == cfg.quantize.group_size
    assert qc["desc_act"] == cfg.quantize.act_order
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        b = cfg.quantize.bits
        qweight = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
        assert qweight.dtype == torch.int32 and qweight.shape == (128 * b // 32, 64)
        assert f.get_tensor("model.layers.0.mlp.down_proj.scales").dtype == torch.float16
        assert f.get_tensor("model.layers.0.mlp.down_proj.g_idx").shape == (128,)
    assert "model.layers.0.mlp.down_proj.weight" not in keys
    assert len([k for k in keys if k.endswith(".qweight")]) == 14  # 7 linears x 2 blocks, no lm_head
    rep = json.loads((out / "quantize_report.json").read_text())
    assert len(rep["layers"]) == 14 and all(r["rel_output_error"] >= 0 for r in rep["layers"])


def test_loader_gives_the_dequantized_weights(quantized, tiny_model_dir):
    """Reference: the full-precision model with each weight replaced by s * (q - z),
    computed in float64 from the unpacked report-independent tensors."""
    out, _, cfg = quantized
    from transformers import AutoModelForCausalLM

    ours, _ = load_quantized(out, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for p in ref.parameters():  # the checkpoint keeps unquantized tensors (embeddings, norms) in fp16
        p.data = p.data.half().float()
    for name, mod in ours.named_modules():
        if hasattr(mod, "qweight"):
            qw = mod.quantized_weight()
            w = qw.scales.double()[qw.g_idx.long()].t() * (qw.codes.double() - qw.zeros.double()[qw.g_idx.long()].t())
            ref.get_submodule(name).weight.data = w.float()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_peer_transformers_gptqmodel_same_logits(quantized):
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM

    out, _, _ = quantized
    ours, _ = load_quantized(out, dtype=torch.float32)
    peer = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32).eval()
    n_layers = 0
    for name, mod in ours.named_modules():
        if hasattr(mod, "qweight"):
            theirs = peer.get_submodule(name)
            assert "gptqmodel" in type(theirs).__module__
            w_peer = theirs.dequantize_weight().float().t()  # GPTQModel returns [in, out]
            w_ours = mod.dequantize_weight(torch.float32)
            # the same codes, zeros and scales: equal up to the peer's fp16 dequantization
            assert (w_peer - w_ours).abs().max() <= 1e-3 * w_ours.abs().max(), name
            n_layers += 1
    assert n_layers == 14
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids).logits, peer(ids).logits.float()
    # the peer's CPU kernel computes in fp16, so logits agree to fp16 accuracy
    assert (a - b).abs().max() <= 3e-2 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_sharded_checkpoint_round_trip(tiny_model_dir, tmp_path):
    out = tmp_path / "sharded"
    data = tiny_config_dict(tiny_model_dir, out)
    data["output"]["max_shard_size"] = "40KB"
    run(validate(data, "test"), show_progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (out / "model.safetensors").exists()
    model, qc = load_quantized(out, dtype=torch.float32)
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_loader_refuses_what_it_cannot_read(tiny_model_dir, tmp_path):
    from qalora_cli.errors import UserError

    with pytest.raises(UserError, match="not a quantized checkpoint"):
        load_quantized(tiny_model_dir)
    with pytest.raises(UserError, match="no config.json"):
        load_quantized(tmp_path)


def test_non_finite_weights_stop_with_a_clear_error(tmp_path):
    from helpers import make_tiny_llama, make_tokenizer
    from qalora_cli.errors import UserError

    tok = make_tokenizer()
    model = make_tiny_llama(len(tok))
    model.model.layers[0].mlp.up_proj.weight.data[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = validate(tiny_config_dict(tmp_path / "m", tmp_path / "q"), "test")
    with pytest.raises(UserError, match="model.layers.0.mlp.up_proj gave non-finite weights"):
        run(cfg, show_progress=False)
    assert not (tmp_path / "q").exists()


def test_without_true_sequential_each_layer_gets_its_own_inputs_hessian(tiny_model_dir, tmp_path):
    """One pass per block: layers are matched to their inputs by tensor identity (ids of freed
    tensors are reused, which once paired down_proj with another layer's Hessian)."""
    out = tmp_path / "flat"
    report = run(validate(tiny_config_dict(tiny_model_dir, out, true_sequential=False), "t"), show_progress=False)
    widths = {r["name"].rsplit(".", 1)[-1]: r["in_features"] for r in report["layers"]}
    assert widths["down_proj"] == 128 and widths["q_proj"] == 64
    assert all(r["rel_output_error"] < 0.5 for r in report["layers"])
