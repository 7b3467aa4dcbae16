"""Calibration samples for GPTQ: `num_samples` windows of `seq_len` tokens, drawn at
random (seeded) from a token stream, as GPTQ does with C4."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config.schema import CalibrationSection
from ..errors import UserError
from .builtin_text import calibration_text

TEXT_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def describe(c: CalibrationSection) -> str:
    if c.source == "builtin":
        return "builtin: Python documentation help topics, even half (PSF License)"
    if c.source == "hub":
        return f"hub: {c.dataset}" + (f"/{c.dataset_config}" if c.dataset_config else "") + f" [{c.split}]"
    return "files: " + ", ".join(c.paths)


def _texts(c: CalibrationSection, chars_needed: int) -> list[str]:
    if c.source == "builtin":
        return [calibration_text()]
    if c.source == "hub":
        import datasets

        try:
            ds = datasets.load_dataset(c.dataset, c.dataset_config, split=c.split, streaming=True)
        except Exception as e:
            raise UserError(f"could not load calibration dataset '{c.dataset}': {str(e).splitlines()[0]}") from e
        return take_field(ds, c.text_field, chars_needed, c.dataset)
    texts: list[str] = []
    for p in map(Path, c.paths):
        if not p.is_file():
            raise UserError(f"calibration file '{p}' does not exist")
        if p.suffix in TEXT_SUFFIXES:
            import datasets

            ds = datasets.load_dataset(TEXT_SUFFIXES[p.suffix], data_files=str(p), split="train")
            texts += take_field(ds, c.text_field, None, str(p))
        else:
            texts.append(p.read_text(encoding="utf-8", errors="replace"))
    return texts


def take_field(ds, field: str, chars_needed: int | None, name: str,
               hint: str = "set calibration.text_field") -> list[str]:
    out, total = [], 0
    for row in ds:
        if field not in row:
            raise UserError(f"the data '{name}' has no field '{field}'; fields: {', '.join(row)}; {hint}")
        out.append(str(row[field]))
        total += len(out[-1])
        if chars_needed is not None and total >= chars_needed:
            break
    return out


def calibration_batches(c: CalibrationSection, tokenizer) -> torch.Tensor:
    """-> int64 [num_samples, seq_len] token ids."""
    # About 4 characters per token; ask a streaming source for ample text, then stop.
    texts = _texts(c, chars_needed=8 * c.seq_len * c.num_samples)
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() <= c.seq_len:
        raise UserError(f"too little calibration text: {ids.numel()} tokens, but one sample needs "
                        f"seq_len={c.seq_len}; give more text or lower calibration.seq_len")
    g = torch.Generator().manual_seed(c.seed)
    starts = torch.randint(0, ids.numel() - c.seq_len, (c.num_samples,), generator=g)
    return torch.stack([ids[s:s + c.seq_len] for s in starts.tolist()])
