"""Put QA-LoRA adapters around the quantized linear layers of the decoder blocks and freeze
everything else. The quantized layers stay in place, wrapped (PEFT's style), so the base
model's code and checkpoints are untouched."""

from __future__ import annotations

from torch import nn

from ..config.schema import LoraSection
from ..errors import UserError
from ..kernels.torch_quant_linear import TorchQuantLinear
from ..models.blocks import decoder_blocks
from ..models.modules import set_module
from .qalora_linear import QALoraLinear


def quantized_linears(model: nn.Module) -> dict[str, TorchQuantLinear]:
    """Every quantized linear layer inside the decoder blocks (lm_head is never a target)."""
    prefix, blocks = decoder_blocks(model)
    return {f"{prefix}.{i}.{name}": m for i, block in enumerate(blocks)
            for name, m in block.named_modules() if isinstance(m, TorchQuantLinear)}


def select_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    layers = quantized_linears(model)
    if not layers:
        raise UserError("the model has no quantized linear layers in its decoder blocks; "
                        "fine-tune a checkpoint made by `qalora quantize`")
    return match_targets(list(layers), targets, "quantized layer")


def match_targets(layers: list[str], targets: list[str] | str, kind: str) -> list[str]:
    """The layers `targets` names ('all-linear', or names matched in full or by their last
    parts), in order, each once; a target that matches none is refused naming the `kind` of
    layer looked for and the names there are."""
    if targets == "all-linear":
        return list(layers)
    chosen = []
    for t in targets:
        hits = [n for n in layers if n == t or n.endswith("." + t)]
        if not hits:
            short = sorted({n.rsplit(".", 1)[-1] for n in layers})
            raise UserError(f"lora target '{t}' matches no {kind}; the layers are named {', '.join(short)}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def check_group_size(model: nn.Module, names: list[str], group_size: int | None) -> None:
    """The adapter pools over the checkpoint's own groups; a different group size cannot merge."""
    if group_size is None:
        return
    for n in names:
        layer = model.get_submodule(n)
        if layer.group_size != group_size:
            have = "per-channel (-1)" if layer.group_size == -1 else str(layer.group_size)
            raise UserError(f"lora.group_size {group_size} disagrees with the checkpoint's group size {have} "
                            f"({n}); QA-LoRA pools over the checkpoint's groups: leave lora.group_size unset")



def inject_qalora(model: nn.Module, lora: LoraSection) -> dict[str, QALoraLinear]:
    """Wrap the target layers; only the adapters' A and B train afterwards."""
    names = select_targets(model, lora.targets)
    check_group_size(model, names, lora.group_size)
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = {}
    for n in names:
        wrapped = QALoraLinear(model.get_submodule(n), lora.rank, lora.alpha, lora.dropout)
        set_module(model, n, wrapped)
        adapters[n] = wrapped
    return adapters


def adapter_layers(model: nn.Module) -> dict[str, QALoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QALoraLinear)}
