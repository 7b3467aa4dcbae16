"""A model's shape, from its config alone: config.json (a folder or a hub id) or a GGUF file's
metadata, built into a model on the meta device, which allocates no memory and reads no weight.
The plans count bytes from these shapes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError, first_line


@dataclass(frozen=True)
class LinearShape:
    name: str              # inside its block, e.g. "self_attn.q_proj"
    in_features: int
    out_features: int
    bias: bool

    @property
    def weights(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelShape:
    source: str                         # what the shape was read from
    blocks: tuple[tuple[LinearShape, ...], ...]   # the linear layers of each decoder block
    block_other_params: int             # norms and the like inside the blocks, all blocks together
    outside_params: int                 # embeddings, final norm, output layer (tied weights once)
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool                          # output layer shares the embedding
    quantization: dict | None = None    # bits, group_size, ... of a quantized checkpoint
    weight_file_bytes: int = 0          # size of the stored weights (stat, never read); 0: unknown
    largest_file_bytes: int = 0         # the largest weight file (shard) among them
    gguf: bool = False                  # the weights come from a GGUF file (dequantized at load)
    stored_dtype_bytes: int = 0         # bytes a weight of the stored files (config's dtype); 0: unknown

    @property
    def layers(self) -> int:
        return len(self.blocks)

    def linears(self) -> list[LinearShape]:
        return [lin for block in self.blocks for lin in block]

    @property
    def linear_weights(self) -> int:
        return sum(lin.weights for lin in self.linears())

    @property
    def linear_bias_params(self) -> int:
        return sum(lin.out_features for lin in self.linears() if lin.bias)

    @property
    def float_params(self) -> int:
        """Every parameter that is not a quantized linear weight (embeddings, norms, biases, head)."""
        return self.outside_params + self.block_other_params + self.linear_bias_params

    @property
    def total_params(self) -> int:
        return self.float_params + self.linear_weights

    def largest(self, key) -> LinearShape:
        return max(self.linears(), key=key)


def read_config(location: str, gguf_file: str | None = None, revision: str | None = None,
                trust_remote_code: bool = False):
    """The transformers config of a folder, hub id or GGUF file (metadata only)."""
    from transformers import AutoConfig

    from ..models.loading import quiet_transformers

    quiet_transformers()
    try:
        return AutoConfig.from_pretrained(location, gguf_file=gguf_file, revision=revision,
                                          trust_remote_code=trust_remote_code)
    except Exception as e:  # the loading boundary: missing, damaged or unreachable config
        what = f"{location}/{gguf_file}" if gguf_file else location
        first = first_line(e)
        raise UserError(f"could not read the model config of '{what}': {first}") from e


def shape_of(config, source: str, file_bytes: tuple[int, int] = (0, 0), gguf: bool = False) -> ModelShape:
    """Build the model of `config` on the meta device and measure its layers."""
    from transformers import AutoModelForCausalLM

    from ..models.blocks import decoder_blocks, linear_layers

    quantization = getattr(config, "quantization_config", None)
    quantization = quantization.to_dict() if hasattr(quantization, "to_dict") else quantization
    if quantization is not None:  # a quantizer must not act on an empty model
        del config.quantization_config
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:
        first = first_line(e)
        raise UserError(f"the config of '{source}' describes no model transformers can build: {first}") from e
    _, blocks = decoder_blocks(model)
    block_shapes = tuple(tuple(LinearShape(n, m.in_features, m.out_features, m.bias is not None)
                               for n, m in linear_layers(b).items()) for b in blocks)
    in_blocks = {id(p) for p in blocks.parameters()}
    linear_params = {id(m.weight) for b in blocks for m in linear_layers(b).values()} | \
        {id(m.bias) for b in blocks for m in linear_layers(b).values() if m.bias is not None}
    params = list(model.parameters())  # shared (tied) parameters appear once
    heads = getattr(config, "num_attention_heads", 1)
    return ModelShape(
        source=source, blocks=block_shapes,
        block_other_params=sum(p.numel() for p in params if id(p) in in_blocks and id(p) not in linear_params),
        outside_params=sum(p.numel() for p in params if id(p) not in in_blocks),
        hidden=config.hidden_size, vocab=config.vocab_size, heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        tied=_is_tied(model), quantization=quantization, weight_file_bytes=file_bytes[0],
        largest_file_bytes=file_bytes[1], gguf=gguf, stored_dtype_bytes=_stored_dtype_bytes(config))


def _stored_dtype_bytes(config) -> int:
    """The dtype config.json says the weights are stored in (`dtype`, `torch_dtype` before
    transformers 5), in bytes; 0 when it says none."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 0


def _is_tied(model: nn.Module) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is embed.weight


def stored_bytes(folder: Path) -> tuple[int, int]:
    """(all, the largest) of a folder's safetensors files' sizes, from the file system: nothing is read."""
    sizes = [f.stat().st_size for f in folder.glob("*.safetensors")] if folder.is_dir() else []
    return sum(sizes), max(sizes, default=0)


def source_shape(m) -> ModelShape:
    """The shape of the model a config's `model` section names (folder, GGUF file or hub id)."""
    from ..models.source import resolve_source

    src = resolve_source(m)
    config = read_config(src.location, src.gguf_file, src.revision, m.trust_remote_code)
    if src.gguf_file:
        size = (Path(src.location) / src.gguf_file).stat().st_size
        return shape_of(config, src.describe(), (size, size), gguf=True)
    return shape_of(config, src.describe(), stored_bytes(Path(src.location)) if src.is_local else (0, 0))


def checkpoint_shape(folder: Path) -> ModelShape:
    """The shape of a quantized checkpoint folder (its config.json)."""
    if not (folder / "config.json").is_file():
        raise UserError(f"'{folder}' is not a model folder (no config.json)")
    shape = shape_of(read_config(str(folder)), str(folder), stored_bytes(folder))
    if not isinstance(shape.quantization, dict) or "bits" not in shape.quantization:
        raise UserError(f"'{folder}' is not a quantized checkpoint (no quantization_config with bits)")
    return shape
