"""Check a merged model against what it must equal: the quantized base with the adapter
attached (unmerged), on a few held-out prompts, in float32.

The two models are loaded one after the other, never together, so verification needs one
model in memory, like the merge itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# The exact formats must agree to float32 rounding; the target (and the threshold) is 1e-3
# of the largest |logit|. Measured on SmolLM2-135M: about 1e-6 (docs/BENCHMARKS.md).
EXACT_RELATIVE_TOLERANCE = 1e-3


@dataclass
class Probe:
    """What is compared: the logits of every prompt position, greedy continuations, perplexity."""
    prompts: list[torch.Tensor]      # 1-D token ids each
    generate_tokens: int
    ppl_ids: torch.Tensor | None     # held-out token stream, or None to skip perplexity
    ppl_seq_len: int = 256


def make_probe(tokenizer, prompts: int, prompt_tokens: int, generate_tokens: int, ppl_tokens: int) -> Probe:
    """Prompts cut from the held-out text (never calibration text); the perplexity text follows them."""
    from ..data.builtin_text import heldout_text

    ids = torch.tensor(tokenizer(heldout_text(), add_special_tokens=False)["input_ids"][: prompts * prompt_tokens
                                                                                      + ppl_tokens + 1])
    cut = [ids[i * prompt_tokens:(i + 1) * prompt_tokens] for i in range(prompts)]
    rest = ids[prompts * prompt_tokens:]
    enough = ppl_tokens and rest.numel() > Probe.ppl_seq_len + 1
    return Probe(cut, generate_tokens, rest if enough else None)


@torch.no_grad()
def run_probe(model, probe: Probe) -> dict:
    """-> {"logits": [T, vocab] per prompt (float32, cpu), "greedy": token lists, "ppl": float|None}."""
    from transformers import GenerationConfig

    from ..eval.perplexity import perplexity

    from ..kernels.torch_quant_linear import cache_inference_weights

    device = next(model.parameters()).device
    cache_inference_weights(model, torch.float32)  # generation would rebuild every weight per token
    logits = [model(input_ids=p[None].to(device)).logits[0].float().cpu() for p in probe.prompts]
    greedy = []
    if probe.generate_tokens:
        config = GenerationConfig(do_sample=False, max_new_tokens=probe.generate_tokens,
                                  min_new_tokens=probe.generate_tokens, use_cache=True)
        for p in probe.prompts[:2]:
            out = model.generate(input_ids=p[None].to(device), attention_mask=torch.ones_like(p[None]).to(device),
                                 generation_config=config)
            greedy.append(out[0, p.numel():].tolist())
    ppl = None
    if probe.ppl_ids is not None:
        seq = min(probe.ppl_seq_len, probe.ppl_ids.numel() - 1)
        ppl = perplexity(model, probe.ppl_ids, seq_len=seq, batch_size=4)["ppl"]
    return {"logits": logits, "greedy": greedy, "ppl": ppl}


def compare(reference: dict, merged: dict) -> dict:
    diff = max(float((a - b).abs().max()) for a, b in zip(reference["logits"], merged["logits"]))
    scale = max(float(a.abs().max()) for a in reference["logits"])
    agree = [float((a.argmax(-1) == b.argmax(-1)).double().mean()) for a, b in zip(reference["logits"],
                                                                                  merged["logits"])]
    out = {"max_abs_logit_diff": diff, "max_abs_logit": scale, "relative": diff / scale,
           "top1_agreement": sum(agree) / len(agree),
           "greedy_identical": reference["greedy"] == merged["greedy"] if reference["greedy"] else None}
    if reference["ppl"] is not None and merged["ppl"] is not None:
        out.update({"ppl_unmerged": reference["ppl"], "ppl_merged": merged["ppl"],
                    "ppl_change": merged["ppl"] / reference["ppl"] - 1})
    return out


def unmerged_model(base_dir: Path, adapter_dir: Path, device):
    """The quantized base with the adapter attached, float32, dropout off: the model a merge
    must reproduce."""
    from ..lora.adapter_io import attach_adapter, read_adapter
    from ..models.quantized_io import load_quantized

    config, tensors = read_adapter(adapter_dir)
    model, _ = load_quantized(base_dir, device, torch.float32)
    attach_adapter(model, config, tensors)
    return model.eval()
