"""`qalora merge`: the formula against a float64 dense reference, the streamed qalora and gptq
outputs against the unmerged model, the peer loading the gptq export, and every refusal."""

import json

import pytest
import torch

from helpers import SMALL_REFIT, make_adapter, merge_cli, tiny_config_dict
from qalora_cli.config.loader import validate
from qalora_cli.kernels.torch_quant_linear import TorchQuantLinear
from qalora_cli.lora.merge import merge_weight, round_zeros
from qalora_cli.lora.qalora_linear import QALoraLinear
from qalora_cli.models.quantized_io import load_quantized
from qalora_cli.quant.result import QuantizedWeight
from qalora_cli.recipes.quantize import run as quantize


def random_qweight(out_f, in_f, bits, group, act_order, seed):
    g = torch.Generator().manual_seed(seed)
    groups = in_f // group
    g_idx = torch.arange(in_f, dtype=torch.int32) // group
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    top = 2 ** bits - 1
    return QuantizedWeight(codes=torch.randint(0, top + 1, (out_f, in_f), generator=g, dtype=torch.int32),
                           scales=(torch.rand(groups, out_f, generator=g) * 0.05 + 0.01).half().float(),
                           zeros=torch.randint(0, top + 1, (groups, out_f), generator=g).float(),
                           g_idx=g_idx, bits=bits, group_size=group)


@pytest.mark.parametrize("act_order", [False, True], ids=["contiguous", "act-order"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_merged_weight_equals_the_dense_float64_sum(bits, act_order):
    """W~(z') == W~(z) + (alpha/r) B A P, with P the explicit [groups, in] mean-pooling matrix."""
    out_f, in_f, group, rank, scaling = 24, 128, 32, 4, 16 / 4
    qw = random_qweight(out_f, in_f, bits, group, act_order, seed=bits)
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(rank, in_f // group, generator=g), torch.randn(out_f, rank, generator=g) * 0.01
    pool = torch.zeros(in_f // group, in_f, dtype=torch.float64)
    for k in range(in_f):
        pool[qw.g_idx[k], k] = 1.0 / group
    reference = (qw.scales.double()[qw.g_idx.long()].t() * (qw.codes.double() - qw.zeros.double()[qw.g_idx.long()].t())
                 + scaling * b.double() @ a.double() @ pool)
    merged = merge_weight(qw, a, b, scaling)
    assert torch.equal(merged.codes, qw.codes) and torch.equal(merged.scales, qw.scales)
    dense = merged.scales.double()[qw.g_idx.long()].t() * (merged.codes.double()
                                                            - merged.zeros.double()[qw.g_idx.long()].t())
    torch.testing.assert_close(dense, reference, rtol=0, atol=1e-12)


def test_merged_layer_computes_what_the_adapter_layer_computes():
    qw = random_qweight(64, 96, 4, 32, True, seed=3)
    base = TorchQuantLinear.from_quantized(qw, None, "int", torch.float32)
    layer = QALoraLinear(base, rank=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    merged = merge_weight(qw, layer.lora_A, layer.lora_B, layer.scaling)
    fused = TorchQuantLinear.from_quantized(merged, None, "float", torch.float32)
    x = torch.randn(5, 96)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), layer(x), rtol=1e-5, atol=1e-5)
    # float zero points survive a cast of the module to half precision
    assert fused.half().zeros.dtype == torch.float32


def test_rounding_report_against_an_explicit_count():
    z = torch.tensor([[-1.2, 0.4, 1.3, 7.5], [14.6, 15.49, 15.51, 16.2]], dtype=torch.float64)
    z_int, loss = round_zeros(z, 4)
    assert z_int.tolist() == [[1, 1, 1, 8], [15, 15, 15, 15]]  # GPTQ v1 cannot store z = 0
    shifts = [2.2, 0.6, 0.3, 0.5, 0.4, 0.49, 0.51, 1.2]
    assert loss.max_shift == pytest.approx(2.2) and loss.mean_shift == pytest.approx(sum(shifts) / 8)
    assert loss.clamped_share == pytest.approx(4 / 8)  # -1.2, 0.4, 15.51 and 16.2 round outside [1, 15]


def test_qalora_format_is_exact_and_names_itself(bases, tmp_path):
    out = tmp_path / "merged"
    r = merge_cli(bases["act"], bases["adapter"], out)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "merge_report.json").read_text())
    v = report["verification"]
    assert v["verdict"] == "pass" and v["relative"] < 1e-5 and v["greedy_identical"]
    assert v["ppl_merged"] == pytest.approx(v["ppl_unmerged"], rel=1e-5)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qalora" and not (out / "quantize_config.json").exists()
    # The adapter really moved the zero points, by several quantization steps.
    assert max(row["max_zero_move"] for row in report["layer_report"]) > 1
    # Independent check: the unmerged model built here, against the merged one loaded back.
    from qalora_cli.lora.adapter_io import attach_adapter, read_adapter

    ref, _ = load_quantized(bases["act"], dtype=torch.float32)
    attach_adapter(ref, *read_adapter(bases["adapter"]))
    merged, _ = load_quantized(out, dtype=torch.float32)
    assert all(m.zeros.dtype == torch.float32 for m in merged.modules() if getattr(m, "zero_kind", "") == "float")
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged(ids).logits, ref(ids).logits
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()  # float32 rounding, as the verification found
    # No GPTQ reader takes these files for its own: transformers skips the unknown quant_method,
    # applies no quantizer and reports every quantized weight missing (loudly), rather than
    # decoding float zeros as packed GPTQ integers.
    from transformers import AutoModelForCausalLM

    peer, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert getattr(peer, "hf_quantizer", None) is None
    assert "model.layers.0.self_attn.q_proj.weight" in info["missing_keys"]


def test_gptq_format_reports_its_rounding_and_the_peer_loads_it(bases, tmp_path):
    out = tmp_path / "gptq"
    r = merge_cli(bases["act"], bases["adapter"], out, "--format", "gptq", *SMALL_REFIT)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "merge_report.json").read_text())
    # The report equals an independent rounding of the exact merge's zero points.
    exact = tmp_path / "exact"
    assert merge_cli(bases["act"], bases["adapter"], exact, "--no-verify").exit_code == 0
    ours, _ = load_quantized(out, dtype=torch.float32)
    ex, _ = load_quantized(exact, dtype=torch.float32)
    rows = {row["layer"]: row for row in report["layer_report"]}
    for name, mod in ex.named_modules():
        if getattr(mod, "zero_kind", "") == "float":
            z = mod.zeros.double()
            z_int = ours.get_submodule(name).quantized_weight().zeros.double()
            assert torch.equal(z_int, torch.round(z).clamp(1, 15))
            assert rows[name]["max_zero_shift"] == pytest.approx(float((z_int - z).abs().max()), abs=1e-6)
    v = report["verification"]
    assert v["verdict"].startswith("integer zero points, scales refitted") and "ppl_change" in v and report["zero_rounding"]["clamped_share"] > 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["sym"] is False
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM

    peer = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32).eval()
    for name, mod in ours.named_modules():
        if hasattr(mod, "qweight"):
            w_peer = peer.get_submodule(name).dequantize_weight().float().t()
            w_ours = mod.dequantize_weight(torch.float32)
            assert (w_peer - w_ours).abs().max() <= 1e-3 * w_ours.abs().max(), name


def test_a_sharded_base_merges_shard_by_shard(tiny_model_dir, tmp_path):
    base = tmp_path / "sharded"
    data = tiny_config_dict(tiny_model_dir, base)
    data["output"]["max_shard_size"] = "40KB"
    quantize(validate(data, "t"), show_progress=False)
    adapter = make_adapter(base, tmp_path / "adapter", targets=["q_proj", "down_proj"])
    out = tmp_path / "merged"
    assert merge_cli(base, adapter, out).exit_code == 0
    index_in = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    index_out = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index_in.values()) == set(index_out.values())
    renamed = {k.replace(".qzeros", ".zeros") if ("q_proj" in k or "down_proj" in k) else k: v
               for k, v in index_in.items()}
    assert renamed == index_out  # only the targets' zero points changed, each in its own shard


def test_gguf_format_reads_back_as_the_exact_merge(bases, tmp_path):
    out = tmp_path / "gguf"
    r = merge_cli(bases["g32"], bases["adapter_g32"], out, "--format", "gguf")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "merge_report.json").read_text())
    # The gguf package's own dequantization: every weight within the fp16 rounding of m = -s z'.
    g = report["gguf_weights"]
    assert g["tensors"] == 14 + 7 and g["max_ratio_to_bound"] <= 1.0
    # transformers' GGUF loader: the logits of the unmerged model, to fp16 rounding of m.
    v = report["verification"]
    assert v["verdict"] == "pass" and v["relative"] < 1e-2 and v["top1_agreement"] >= 0.97  # near-ties flip
    assert (out / "model.gguf").is_file() and (out / "Modelfile").read_text() == "FROM ./model.gguf\n"


def test_gguf_refuses_act_order_groups_in_one_line(bases, tmp_path):
    out = tmp_path / "gguf"
    r = merge_cli(bases["act"], bases["adapter"], out, "--format", "gguf")
    assert r.exit_code == 2 and not out.exists()
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error:") and "contiguous groups" in line and "act-order" in line
