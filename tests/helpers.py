"""Builders the tests share: a tiny random Llama and its small trained tokenizer, the config
that quantizes it, a random adapter saved as `qalora finetune` saves one, the merge command
line, reference computations, and a progress bar that presses Ctrl-C. conftest.py turns the
slow ones into session fixtures."""

from __future__ import annotations

import signal
from contextlib import contextmanager

import torch
from typer.testing import CliRunner

runner = CliRunner()


def make_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qalora_cli.data.builtin_text import calibration_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([calibration_text()[:60000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def make_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=False)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    # Random init gives near-zero weights; widen them so quantization error is visible.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def tiny_config_dict(model_dir, out_dir, **quantize):
    q = {"method": "gptq", "bits": 4, "group_size": 32, "device": "cpu", "batch_size": 4}
    q.update(quantize)
    return {
        "model": {"name_or_path": str(model_dir)},
        "quantize": q,
        "calibration": {"source": "builtin", "num_samples": 8, "seq_len": 64, "seed": 0},
        "output": {"dir": str(out_dir)},
    }


# A chat template for the tiny tokenizer (generate/chat/eval stream tests)
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def text_ids(tok, n):
    """The first n tokens of the built-in held-out text."""
    from qalora_cli.data.builtin_text import heldout_text

    return tok(heldout_text(), add_special_tokens=False)["input_ids"][:n]


def make_adapter(base_dir, out_dir, rank=8, seed=0, b_std=0.5, targets="all-linear"):
    """A nonzero adapter (random A and B) saved as `qalora finetune` saves one."""
    from qalora_cli.config.schema import LoraSection
    from qalora_cli.lora.adapter_io import checkpoint_sha256, make_adapter_config, save_adapter
    from qalora_cli.lora.inject import inject_qalora
    from qalora_cli.models.quantized_io import load_quantized

    model, qc = load_quantized(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    lora = LoraSection(rank=rank, alpha=16, dropout=0.0, targets=targets)
    adapters = inject_qalora(model, lora)
    with torch.no_grad():
        for m in adapters.values():
            m.lora_B.normal_(0, b_std)
    cfg = make_adapter_config(lora, adapters, qc, base_dir, checkpoint_sha256(base_dir), "tiny")
    save_adapter(out_dir, adapters, cfg)
    return out_dir


# The tiny tokenizer has no chat template; a few short windows keep the refit quick.
SMALL_REFIT = ("data.template=raw", "merge.calibration_samples=16", "merge.calibration_seq_len=64",
                 "merge.heldout_samples=4")


def corrupt_one_layer(monkeypatch):
    """Make the merge write one layer's zero points half a step off, as a bug would."""
    from qalora_cli.export.layer_merge import LayerMerger

    exact = LayerMerger.zeros_before_after

    def off_by_half_a_step(self, target):
        z, z_merged = exact(self, target)
        return z, z_merged + (0.5 if target.endswith("layers.0.mlp.up_proj") else 0.0)

    monkeypatch.setattr(LayerMerger, "zeros_before_after", off_by_half_a_step)


def merge_cli(base, adapter, output, *extra):
    from qalora_cli.cli.app import app

    return runner.invoke(app, ["merge", "--config", "smollm2-135m-int4", "--model", str(base), "--adapter",
                               str(adapter), "--output", str(output), "merge.ppl_tokens=600",
                               "merge.verify_tokens=32", "merge.device=cpu", *extra])


def reference_nll(model, ids, seq_len, stride):
    """Token t is scored with the window that first covers it, context from that window."""
    total, count, scored = 0.0, 0, set()
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + seq_len, len(ids))
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids[begin:end].unsqueeze(0)).logits[0].double(), -1)
        for t in range(begin + 1, end):
            if t not in scored:
                scored.add(t)
                total -= lp[t - 1 - begin, ids[t]].item()
                count += 1
        if end == len(ids):
            break
    return total / count, count


def tiny_finetune_dict(model_dir, out_dir, adapter_dir, **train):
    """A tiny fine-tune's config (rank 8 on the built-in task, raw template, CPU, fp32): `train`
    overrides the train section's keys."""
    d = tiny_config_dict(model_dir, out_dir)
    d["lora"] = {"rank": 8, "alpha": 16, "dropout": 0.0}
    d["data"] = {"source": "builtin", "builtin_size": 160, "max_length": 192, "template": "raw",
                 "eval_max_examples": 16}
    d["train"] = {"adapter_dir": str(adapter_dir), "device": "cpu", "micro_batch_size": 4, "batch_size": 8,
                  "learning_rate": 3e-3, "max_steps": 12, "eval_every": 4, "save_every": 4,
                  "exact_match_examples": 0, "mixed_precision": "no", **train}
    return d


def dead_owner() -> str:
    """The owner tag (pid.start time) of a process that was killed with SIGKILL and reaped."""
    import subprocess

    from qalora_cli.process_owner import start_time

    p = subprocess.Popen(["sleep", "60"])
    tag = f"{p.pid}.{start_time(p.pid)}"
    p.send_signal(signal.SIGKILL)
    p.wait()
    return tag


@contextmanager
def progress_that_ctrl_cs_at(step_to_stop):
    """A stand-in for the training loop's progress bar that sends this process SIGINT, as Ctrl-C
    does, when the loop reports `step_to_stop`: to patch over the trainer's `progress`."""
    @contextmanager
    def progress(total, start, enabled=True, every=10):
        def update(step, record):
            if step == step_to_stop:
                signal.raise_signal(signal.SIGINT)
        yield update
    yield progress
