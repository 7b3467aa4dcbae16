"""Quantize a model block by block: each block sees the outputs of the already-quantized
blocks before it, and (true-sequential) each group of linear layers inside a block sees the
outputs of the already-quantized groups before it. Memory holds one block's activations.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from ..config.schema import QuantizeSection
from ..errors import UserError
from ..models.blocks import (BlockInputs, capture_block_inputs, decoder_blocks, linear_layers,
                             sequential_groups)
from .asymmetric import asymmetric_target
from .group_stats import Stream, group_stats
from .gptq import gptq_quantize, output_error
from .groups import check_group_size
from .pack import check_packable
from .result import QuantizedWeight
from .rtn import rtn_quantize


@dataclass
class LayerReport:
    name: str
    in_features: int
    out_features: int
    rel_output_error: float  # |(W - W~) X|^2 / |W X|^2 on the calibration inputs
    damp_percent: float | None
    seconds: float
    heldout_rel_output_error: float | None = None  # the same on held-out inputs, when given

    def as_dict(self) -> dict:
        return asdict(self)


def check_layers(model: nn.Module, q: QuantizeSection) -> None:
    """Every user-fixable shape problem, before any work is done."""
    prefix, blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        for name, lin in linear_layers(block).items():
            full = f"{prefix}.{i}.{name}"
            check_group_size(lin.in_features, q.group_size, full)
            check_packable(q.bits, lin.in_features, f"the input width of {full}")
            check_packable(q.bits, lin.out_features, f"the output width of {full}")


def _block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _quantize_layer(weight: torch.Tensor, H: torch.Tensor, q: QuantizeSection) -> tuple[QuantizedWeight, float | None]:
    if q.method == "rtn":
        return rtn_quantize(weight.to(H.device), q.bits, q.group_size, q.sym, q.clip_search), None
    qw, stats = gptq_quantize(weight, H, q.bits, q.group_size, q.sym, q.damp_percent,
                              q.block_size, q.act_order, q.static_groups, q.clip_search)
    return qw, stats.damp_percent


# (full layer name, the weight to aim at, its input Hessian, the held-out inputs' Hessian or None)
#   -> (quantized weight, damping used or None)
LayerQuantizer = Callable[[str, nn.Linear, torch.Tensor, "torch.Tensor | None"], tuple[QuantizedWeight, "float | None"]]

class LayerStatsHook(Protocol):
    """What `lora.init` needs of each layer, gathered while the weight aimed at and H are at hand
    (lora/init_stats.StatsCollector).

    `corrects` False: called with the layer's own float weight and the quantized model's H (even when
    the layer aimed at the float model's output: solved on the uncorrected model, such corrections pile
    up, docs/BENCHMARKS.md); returns None.
    `corrects` True: the statistics are taken on a third stream, the model as the init will correct
    it (every finished layer W~ + Delta): called with the target that maps those inputs to the float
    model's output (quant/asymmetric.py) and their H, it returns the layer's corrected weight, which
    the stream then runs with. Solved layer after layer on inputs the earlier corrections already
    changed, the corrections do not pile up, as they do when all are solved on the uncorrected model."""
    corrects: bool

    def __call__(self, name: str, target: torch.Tensor, qw: QuantizedWeight, H: torch.Tensor
                 ) -> torch.Tensor | None: ...

    def corrected_weight(self, name: str, qw: QuantizedWeight) -> torch.Tensor:
        """The corrected weight of a layer whose statistics were restored (a resumed run)."""


class BlockStore(Protocol):
    """Where finished blocks are kept so that a run can resume after them (quant/block_store.py)."""

    def finished(self) -> int: ...
    def load(self, index: int) -> tuple[dict[str, QuantizedWeight], list[LayerReport]]: ...
    def save(self, index: int, results: dict[str, QuantizedWeight], reports: list[LayerReport]) -> None: ...


@dataclass
class _Streams:
    """The calibration batches (and the held-out, full-precision reference and corrected ones,
    when asked) as they enter the next block."""
    inputs: BlockInputs
    held: BlockInputs | None
    ref: BlockInputs | None
    corr: BlockInputs | None = None


@dataclass
class _Copies:
    """Per block: the block before any change (the reference stream's) and the corrected one."""
    ref: nn.Module | None
    corr: nn.Module | None


@torch.no_grad()
def quantize_model(model: nn.Module, calib_ids: torch.Tensor, q: QuantizeSection, device: torch.device,
                   on_block: Callable[[int, int], None] | None = None,
                   quantize_layer: LayerQuantizer | None = None, heldout_ids: torch.Tensor | None = None,
                   asymmetric: bool = False, layer_stats: LayerStatsHook | None = None,
                   store: BlockStore | None = None,
                   hand_over: Callable[[dict[str, QuantizedWeight]], None] | None = None,
                   ) -> tuple[dict[str, QuantizedWeight], list[LayerReport]]:
    """Quantize every linear layer of the decoder blocks in place (weights become W~) and
    return the quantized weights by full module name, with a report per layer.

    `quantize_layer` replaces the method of `q` (GPTQ or RTN) by another one, given the same
    sequential inputs: the GPTQ export of a merge re-rounds codes on a fixed grid with it.
    `heldout_ids` go through the same blocks without choosing anything: each layer's output
    error is also reported on them. With `asymmetric`, each layer aims at the output the model
    as given (before any change) computes on its own inputs (quant/asymmetric.py).
    `layer_stats(name, target, quantized weight, H)` is called for every layer while the weight it aimed at
    and H are still at hand (lora/init_stats.py gathers what `lora.init` needs there; with
    `layer_stats.corrects`, on the inputs of the corrected model, LayerStatsHook).
    `store` saves each block as it finishes; the blocks it already holds are not quantized again but
    restored, and the calibration batches are passed through them as they were the first time.
    `hand_over` takes each block's quantized weights once the block is done with (passed through,
    saved); they are then not kept, and the result holds only the reports. `qalora quantize` packs
    them into the model there, so that the finished blocks' float weights go as it proceeds."""
    quantize_layer = quantize_layer or (lambda _name, w, H, _held: _quantize_layer(w, H, q))
    prefix, blocks = decoder_blocks(model)
    corrects = layer_stats is not None and layer_stats.corrects
    streams = _block_zero_inputs(model, blocks, calib_ids, heldout_ids, q.batch_size, device,
                                 asymmetric or corrects, corrects)
    done = store.finished() if store is not None else 0
    results: dict[str, QuantizedWeight] = {}
    reports: list[LayerReport] = []
    for i, block in enumerate(blocks):
        block.to(device)
        copies = _Copies(copy.deepcopy(block) if streams.ref is not None else None,  # the block before any change
                         copy.deepcopy(block) if corrects else None)
        if i < done:
            block_results, block_reports = store.load(i)
            _install_restored(block, f"{prefix}.{i}", block_results)
            if corrects:
                _install_corrected(copies.corr, f"{prefix}.{i}", block_results, layer_stats)
        else:
            block_results, block_reports = _quantize_block(block, f"{prefix}.{i}", streams, copies, asymmetric, q,
                                                           quantize_layer, layer_stats)
        reports.extend(block_reports)
        _advance(block, copies, streams)
        block.to("cpu")
        if store is not None and i >= done:
            store.save(i, block_results, block_reports)
        if hand_over is not None:
            hand_over(block_results)
        else:
            results.update(block_results)
        if on_block:
            on_block(i + 1, len(blocks))
    return results, reports


def _block_zero_inputs(model: nn.Module, blocks: nn.ModuleList, calib_ids: torch.Tensor,
                       heldout_ids: torch.Tensor | None, batch_size: int, device, reference: bool,
                       corrected: bool) -> _Streams:
    """What block 0 receives for each batch. Everything but the blocks (embeddings, final norm,
    head) visits the device for this; each block visits it only for its turn."""
    blocks.to("cpu")
    _move_non_block_parts(model, blocks, device)
    inputs = capture_block_inputs(model, blocks, [b.to(device) for b in calib_ids.split(batch_size)])
    held = None
    if heldout_ids is not None:
        held = capture_block_inputs(model, blocks, [b.to(device) for b in heldout_ids.split(batch_size)])
    _move_non_block_parts(model, blocks, "cpu")
    ref = BlockInputs(list(inputs.hidden), inputs.kwargs) if reference else None
    corr = BlockInputs(list(inputs.hidden), inputs.kwargs) if corrected else None
    return _Streams(inputs, held, ref, corr)


def _quantize_block(block: nn.Module, block_name: str, streams: _Streams, copies: _Copies, asymmetric: bool,
                    q: QuantizeSection, quantize_layer: LayerQuantizer, layer_stats: LayerStatsHook | None,
                    ) -> tuple[dict[str, QuantizedWeight], list[LayerReport]]:
    """Quantize one block's layers, group after group (true-sequential: each group sees the
    quantized outputs of the groups before it; the corrected stream, the corrected ones)."""
    inputs, held = streams.inputs, streams.held
    layers = linear_layers(block)
    if q.true_sequential:
        groups = sequential_groups(block, inputs.hidden[0], inputs.kwargs[0])
    else:
        groups = [list(layers)]
    results: dict[str, QuantizedWeight] = {}
    reports: list[LayerReport] = []
    ref = Stream(copies.ref, streams.ref) if streams.ref is not None else None
    corr = Stream(copies.corr, streams.corr) if copies.corr is not None else None
    for group in groups:
        st = group_stats(group, Stream(block, inputs), ref, corr, cross=asymmetric)
        held_H = group_stats(group, Stream(block, held)).H if held else {}
        for name in group:
            full = f"{block_name}.{name}"
            w = layers[name].weight.data.float().clone() if corr else None
            results[full], report = _quantize_one(layers[name], full, st.H[name], held_H.get(name),
                                                  st.C[name] if asymmetric else None, q, quantize_layer,
                                                  None if corr else layer_stats)
            if corr:
                _correct_one(linear_layers(copies.corr)[name], full, w, results[full], st.H_corr[name],
                             st.C_corr[name], q, layer_stats)
            reports.append(report)
        del st, held_H
    return results, reports


def _quantize_one(lin: nn.Linear, full: str, H: torch.Tensor, H_held: torch.Tensor | None, C: torch.Tensor | None,
                  q: QuantizeSection, quantize_layer: LayerQuantizer, layer_stats: LayerStatsHook | None,
                  ) -> tuple[QuantizedWeight, LayerReport]:
    """Quantize one layer (aiming at `asymmetric_target` when C is given) and put W~ in its place."""
    t0 = time.perf_counter()
    w = lin.weight.data.float()
    target = asymmetric_target(w, C, H, q.damp_percent) if C is not None else w
    qw, damp = quantize_layer(full, target, H, H_held)
    approx = qw.dequantize().to(H.device)
    if not torch.isfinite(approx).all():
        raise UserError(f"quantizing {full} gave non-finite weights: its calibration inputs "
                        f"overflow in {lin.weight.dtype}; use model.dtype=float32")
    err = output_error(w, approx, H)
    held_err = output_error(w, approx, H_held) if H_held is not None else None
    if layer_stats is not None:  # the init's local objective: the layer's own float weight on these inputs
        layer_stats(full, w, qw, H)
    lin.weight.data.copy_(approx.to(lin.weight.dtype))  # w may share its storage: errors first
    return qw, LayerReport(full, lin.in_features, lin.out_features, err, damp, time.perf_counter() - t0, held_err)


def _correct_one(corr_lin: nn.Linear, full: str, w: torch.Tensor, qw: QuantizedWeight, H: torch.Tensor,
                 C: torch.Tensor, q: QuantizeSection, layer_stats: LayerStatsHook) -> None:
    """Hand the corrected stream's statistics of one layer to `layer_stats` and give the corrected
    block the weight it returns (W~ + Delta)."""
    target = asymmetric_target(w.to(H.device), C, H, q.damp_percent)
    corrected = layer_stats(full, target, qw, H)
    corr_lin.weight.data.copy_(corrected.to(corr_lin.weight.device, corr_lin.weight.dtype))


def _install_corrected(corr_block: nn.Module, block_name: str, results: dict[str, QuantizedWeight],
                       layer_stats: LayerStatsHook) -> None:
    """A restored block's corrected copy, from the statistics restored with it."""
    for name, lin in linear_layers(corr_block).items():
        corrected = layer_stats.corrected_weight(f"{block_name}.{name}", results[f"{block_name}.{name}"])
        lin.weight.data.copy_(corrected.to(lin.weight.device, lin.weight.dtype))


def _install_restored(block: nn.Module, block_name: str, results: dict[str, QuantizedWeight]) -> None:
    """Give a block restored from a store the W~ its layers had when it was quantized, so the
    batches passed through it come out as they did the first time."""
    for name, lin in linear_layers(block).items():
        full = f"{block_name}.{name}"
        if full not in results:
            raise UserError(f"the saved progress lacks layer {full}: it was made from another model; "
                            "start over without --resume")
        approx = results[full].dequantize()  # elementwise: the same on any device
        if approx.shape != lin.weight.shape:
            raise UserError(f"the saved progress holds {full} as {tuple(approx.shape)}, the model has "
                            f"{tuple(lin.weight.shape)}: it was made from another model; start over without --resume")
        lin.weight.data.copy_(approx.to(lin.weight.dtype))


def _advance(block: nn.Module, copies: _Copies, streams: _Streams) -> None:
    """Pass every stream through its copy of the finished block: what the next block receives."""
    pairs = [(block, streams.inputs), (block, streams.held), (copies.ref, streams.ref), (copies.corr, streams.corr)]
    for runner, part in pairs:
        if part is not None:
            part.hidden = [_block_output(runner, h, kw) for h, kw in zip(part.hidden, part.kwargs)]


def _move_non_block_parts(model: nn.Module, blocks: nn.ModuleList, device) -> None:
    """Move every parameter and buffer outside the blocks to `device`."""
    block_ids = {id(p) for p in blocks.parameters()} | {id(b) for b in blocks.buffers()}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None and id(p) not in block_ids and p.device != torch.device(device):
                p.data = p.data.to(device)
        for key, b in list(mod._buffers.items()):
            if b is not None and id(b) not in block_ids:
                mod._buffers[key] = b.to(device)
