"""The real model: SmolLM2-135M (embedded GGUF) quantized end to end, read back by qalora
and by transformers + GPTQModel. Marked slow: CI runs it as its second step. Its fine-tune and
merges: test_smollm2_finetune_slow.py."""

import json

import pytest
import torch

from qalora_cli.config.loader import load_config
from qalora_cli.data.builtin_text import heldout_text
from qalora_cli.eval.perplexity import perplexity
from qalora_cli.models.loading import load_model
from qalora_cli.models.quantized_io import load_quantized
from qalora_cli.recipes.quantize import REPORT_NAME, run

pytestmark = pytest.mark.slow

SMALL_CALIBRATION = ["calibration.num_samples=32", "calibration.seq_len=128", "quantize.device=cpu"]


@pytest.fixture(scope="module")
def base():
    cfg = load_config("smollm2-135m-int4")
    model, tok, _ = load_model(cfg.model)
    ids = tok(heldout_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    return model, tok, ids


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    outs = {}
    # On the built-in text alone, no samples to generate first (CI time; memory_plan_slow's quantize runs
    # the config's default mix). rtn and gptq-local, compared with each other only, without the statistics
    # lora.init needs; gptq (the config's settings otherwise) with them
    plain = ["calibration.generated_fraction=0", "output.init_stats=false"]
    runs = {"rtn": ["quantize.method=rtn", "quantize.target=local", *plain], "gptq": plain[:1],
            "gptq-local": ["quantize.target=local", *plain]}
    for name, overrides in runs.items():
        out = tmp_path_factory.mktemp(name) / "m"
        run(load_config("smollm2-135m-int4", SMALL_CALIBRATION + overrides + [f"output.dir={out}"]),
            show_progress=False)
        outs[name] = out
    return outs


def test_gptq_beats_rtn_layer_by_layer(quantized):
    """The report's layer error is the local objective |(W - W~) X|^2 that plain GPTQ minimizes, so both
    runs aim at their own float weight here (quantize.target local); the default (float) is scored by the
    perplexity tests."""
    rtn = json.loads((quantized["rtn"] / REPORT_NAME).read_text())["layers"]
    gptq = json.loads((quantized["gptq-local"] / REPORT_NAME).read_text())["layers"]
    assert len(gptq) == 30 * 7
    better = sum(g["rel_output_error"] < r["rel_output_error"] for g, r in zip(gptq, rtn))
    assert better >= 0.95 * len(gptq)


def test_gptq_int4_perplexity_close_to_unquantized(base, quantized):
    model, _, ids = base
    with torch.no_grad():
        ppl_base = perplexity(model, ids, 512, max_tokens=8192)["ppl"]
        q, _ = load_quantized(quantized["gptq"], dtype=torch.float32)
        ppl_q = perplexity(q, ids, 512, max_tokens=8192)["ppl"]
        r, _ = load_quantized(quantized["rtn"], dtype=torch.float32)
        ppl_r = perplexity(r, ids, 512, max_tokens=8192)["ppl"]
    # 32 x 128 calibration tokens here; the full default (128 x 256) is within 5%: docs/BENCHMARKS.md
    assert ppl_q < ppl_base * 1.10
    assert ppl_q < ppl_r


def test_peer_loads_the_smollm2_checkpoint(base, quantized):
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM

    _, _, ids = base
    window = ids[:128].unsqueeze(0)
    ours, _ = load_quantized(quantized["gptq"], dtype=torch.float32)
    peer = AutoModelForCausalLM.from_pretrained(quantized["gptq"], device_map="cpu", dtype=torch.float32).eval()
    # The format, strictly: every weight the peer decodes is ours (fp16 scales, so up to fp16 rounding).
    for name, mod in ours.named_modules():
        if hasattr(mod, "qweight"):
            w_peer = peer.get_submodule(name).dequantize_weight().float().t()
            w_ours = mod.dequantize_weight(torch.float32)
            assert (w_peer - w_ours).abs().max() <= 1e-3 * w_ours.abs().max(), name
    # The whole model: the peer's kernel reaches the logits by its own arithmetic; over 30 blocks the
    # largest logit moves by a few percent (3.1e-2 measured on this checkpoint's quantization).
    with torch.no_grad():
        a, b = ours(window).logits, peer(window).logits.float()
    assert (a - b).abs().max() <= 5e-2 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95


def test_quailora_init_lowers_int4_perplexity_at_step_0(base, quantized):
    """lora.init quailora on the real INT4 model, from the statistics `quantize` stored: below the zero init's
    held-out perplexity before any training, cancelling part of every layer's output error (INT4/3/2 with the
    default calibration: docs/BENCHMARKS.md, "QuAILoRA initialization")."""
    from qalora_cli.lora.init_stats import initialize_adapters
    from qalora_cli.lora.inject import inject_qalora

    _, _, ids = base
    ppl = {}
    for init in ("zero", "quailora"):
        cfg = load_config("smollm2-135m-int4", [f"lora.init={init}", f"output.dir={quantized['gptq']}"])
        q, _ = load_quantized(quantized["gptq"], dtype=torch.float32)
        torch.manual_seed(0)
        report = initialize_adapters(cfg, quantized["gptq"], inject_qalora(q, cfg.lora))
        if init == "quailora":
            assert report["seconds"] < 30 and report["mean_remaining_error"] < 0.99
        with torch.no_grad():
            ppl[init] = perplexity(q.eval(), ids, 512, max_tokens=8192)["ppl"]
    assert ppl["quailora"] < ppl["zero"]
