"""train.mixed_precision auto: bf16 on the CPU only where the CPU multiplies bf16 natively, and the memory
plan resolving it the same way as the fine-tune does."""

import platform
from pathlib import Path

import pytest
import torch

from qalora_cli.config.loader import load_config
from qalora_cli.plan import finetune_plan, peft_plan
from qalora_cli.recipes.finetune import _mixed_precision
from qalora_cli.train import precision
from qalora_cli.errors import UserError


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not Path("/proc/cpuinfo").is_file(),
                    reason="the kernel's CPU flags are the reference: Linux x86_64 only")
def test_native_bf16_probe_agrees_with_the_kernels_cpu_flags():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    assert precision.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16", "amx_tile"} & flags)


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_the_cpu_follows_native_bf16_and_explicit_choices_stay(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert _mixed_precision("auto", cpu) == ("bf16" if native else "no")
    assert _mixed_precision("bf16", cpu) == "bf16" and _mixed_precision("no", cpu) == "no"
    assert precision.resolve_mixed_precision("auto", "mps") == "no"
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        _mixed_precision("fp16", cpu)


@pytest.mark.parametrize("native", [True, False])
def test_the_plan_counts_the_precision_the_run_uses(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    cfg = load_config("smollm2-135m-int4")
    assert cfg.train.mixed_precision == "auto"
    assert finetune_plan.precision(cfg, "cpu").compute == (2 if native else 4)
    assert finetune_plan.precision(cfg, "cpu").model == 4
    assert peft_plan.autocast_on(cfg, "cpu") is native
    assert finetune_plan.precision(cfg, "cuda").compute == 2 and peft_plan.autocast_on(cfg, "cuda")
