"""The progress of a resumable `qalora quantize`: each decoder block saved as it finishes, in a
clearly named folder beside the output, removed once the output is finished.

    <output>.partial/
      settings.json            what the blocks were made with: the config's settings, and the
                               identity of the input model and of the calibration batches
      block-00000.safetensors  one file per finished block: every layer's codes (packed), scales,
                               zeros and g_idx, the lora.init statistics of its layers when
                               gathered; its layer reports in the metadata

A block file is written under a temporary name and renamed, so one that exists is whole. Only
safetensors and JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import UserError, first_line
from ..output_dir import discard, disk_full_error, is_disk_full, temp_sibling
from .pack import pack_rows, unpack_rows
from .result import QuantizedWeight
from .sequential import LayerReport

SETTINGS = "settings.json"
FORMAT = "qalora-quantize-progress"
_PARTS = ("codes", "scales", "zeros", "g_idx")


def progress_dir(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".partial")


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def tensors_identity(tensors: dict[str, torch.Tensor], samples: int = 65536) -> str:
    """SHA-256 of every tensor's name, dtype and shape and of an evenly spaced sample of its
    values (every value of a small tensor): two checkpoints of one architecture differ in
    almost every weight, so a sample tells them apart without reading 140 GB twice."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(flat[::step].contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _changed(had: dict, now: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two settings dicts."""
    out = []
    for key in sorted(set(had) | set(now)):
        a, b = had.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def read_settings(folder: Path) -> dict:
    try:
        recorded = json.loads((folder / SETTINGS).read_text(encoding="utf-8"))
        if not isinstance(recorded, dict) or recorded.get("format") != FORMAT:
            raise ValueError("not a qalora quantize progress file")
        return recorded
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot resume: '{folder / SETTINGS}' is unreadable ({first_line(e)}); "
                        f"delete '{folder}' to start over") from None


def check_same(folder: Path, recorded: dict, now: dict, what: str) -> None:
    """Refuse, in one line, to continue progress made with other settings."""
    if recorded != now:
        changed = _changed(recorded if isinstance(recorded, dict) else {}, now)
        raise UserError(f"cannot resume: the progress in '{folder}' was made with other {what} "
                        f"({', '.join(changed[:6]) or 'unreadable'}); resume with the same ones, or start over "
                        "without --resume (pass --overwrite to discard the progress)")


class QuantizeProgress:
    """The blocks of one run (quant.sequential.BlockStore). `stats`: the run's lora.init
    statistics collector, whose tensors of a block are kept with it."""

    def __init__(self, folder: Path, settings: dict, inputs: dict, blocks: int, stats=None):
        self.folder, self.settings, self.inputs, self.blocks, self.stats = Path(folder), settings, inputs, blocks, stats

    @classmethod
    def open(cls, folder: Path, settings: dict, inputs: dict, blocks: int, fresh: bool,
             stats=None) -> "QuantizeProgress":
        """Start afresh (any earlier progress removed) or continue the progress the folder
        holds, which must have been made with the same settings and inputs."""
        folder = Path(folder)
        if folder.is_dir() and not fresh and (folder / SETTINGS).is_file():
            recorded = read_settings(folder)
            check_same(folder, recorded.get("settings"), settings, "settings")
            check_same(folder, recorded.get("inputs"), inputs, "inputs (model weights or calibration data)")
            return cls(folder, settings, inputs, blocks, stats)
        discard(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(folder)
        try:
            (tmp / SETTINGS).write_text(json.dumps({"format": FORMAT, "settings": settings, "inputs": inputs},
                                                   indent=1, sort_keys=True) + "\n")
        except Exception as e:  # a disk already full: nothing may be left behind
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(e):
                raise disk_full_error(folder, 0) from e
            raise
        os.replace(tmp, folder)  # the folder appears with its settings, never without
        return cls(folder, settings, inputs, blocks, stats)

    def _path(self, index: int) -> Path:
        return self.folder / f"block-{index:05d}.safetensors"

    def finished(self) -> int:
        n = 0
        while self._path(n).is_file():
            n += 1
        return n

    def save(self, index: int, results: dict[str, QuantizedWeight], reports: list[LayerReport]) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for name, qw in results.items():
            for part in _PARTS:
                t = getattr(qw, part)
                # codes packed as in the checkpoint: the progress takes no more room than the output
                t = pack_rows(t.t().contiguous(), qw.bits) if part == "codes" else t
                tensors[f"{name}.{part}"] = t.cpu().contiguous()
        if self.stats is not None:
            prefixes = tuple(f"{name}." for name in results)
            tensors.update({f"stats.{k}": v for k, v in self.stats.tensors.items() if k.startswith(prefixes)})
        meta = {"format": FORMAT, "reports": json.dumps([r.as_dict() for r in reports]),
                "bits": json.dumps({n: [qw.bits, qw.group_size] for n, qw in results.items()})}
        tmp = self.folder / f".block-{index:05d}.tmp"
        try:
            save_file(tensors, tmp, metadata=meta)
        except Exception as e:
            written = tmp.stat().st_size if tmp.exists() else 0
            tmp.unlink(missing_ok=True)
            if is_disk_full(e):
                raise self._disk_full(written, sum(t.numel() * t.element_size() for t in tensors.values())) from e
            raise
        os.replace(tmp, self._path(index))

    def _disk_full(self, written: int, block_bytes: int) -> UserError:
        """Finished blocks are kept for --resume; with none finished, nothing is left behind."""
        done = self.finished()
        if done == 0:
            self.remove()
            return disk_full_error(self.folder, written, block_bytes * self.blocks)
        error = disk_full_error(self.folder, written, block_bytes * (self.blocks - done))
        return UserError(kept_note(error, self.folder, done))

    def load(self, index: int) -> tuple[dict[str, QuantizedWeight], list[LayerReport]]:
        from safetensors import safe_open

        path = self._path(index)
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            reports = [LayerReport(**r) for r in json.loads(meta["reports"])]
            results = {}
            for name, (bits, group) in json.loads(meta["bits"]).items():
                g_idx = tensors[f"{name}.g_idx"]
                codes = unpack_rows(tensors[f"{name}.codes"], bits, g_idx.numel()).t().contiguous()
                results[name] = QuantizedWeight(codes=codes.to(torch.uint8), scales=tensors[f"{name}.scales"],
                                                zeros=tensors[f"{name}.zeros"], g_idx=g_idx, bits=bits,
                                                group_size=group)
        except Exception as e:
            raise UserError(f"cannot resume: '{path}' is damaged ({first_line(e)}); "
                            "delete it to redo that block") from None
        if self.stats is not None:
            self.stats.tensors.update({k[len("stats."):]: v for k, v in tensors.items() if k.startswith("stats.")})
        return results, reports

    def remove(self) -> None:
        discard(self.folder)


def kept_note(error: UserError, folder: Path, done: int) -> str:
    """A full disk's one line, saying that the finished blocks wait in `folder` for --resume."""
    line = str(error).split("; nothing half-written")[0]
    return (f"{line}; the {done} finished block(s) are kept in '{folder}': free some space and continue with "
            "the same command and --resume")
