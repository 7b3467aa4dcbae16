"""Read and write safetensors files one tensor at a time.

`safetensors.torch.save_file` wants every tensor in memory at once: merging a 70B-class model
that way needs the model twice. The format is simple (an 8-byte little-endian header length, a
JSON header with each tensor's dtype, shape and byte range, then the bytes in that order), so
the header is planned from shapes alone and each tensor is written as it is made.

Reading uses plain file reads into a fresh buffer rather than safetensors' memory map: mapped
pages that were read stay counted in the process's memory, so a streamed pass over a large
checkpoint would look (and, under memory pressure, act) as if it held the whole file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.uint32: "U32",  # U32: MLX's packed weights
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


class StreamReader:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh = open(self.path, "rb")
        try:
            (n,) = struct.unpack("<Q", self._fh.read(8))
            if n > 100 << 20:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(self._fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            self._base = 8 + n
            self.meta = header.pop("__metadata__", None) or {}
            if not isinstance(self.meta, dict) or not all(isinstance(v, str) for v in self.meta.values()):
                raise ValueError("__metadata__ is not a mapping of strings")
            self.entries = {k: self._entry(k, v) for k, v in header.items()}
        except Exception:
            self._fh.close()
            raise

    def _entry(self, name: str, v) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]]:
        """One header entry, checked against the file: a damaged header fails here, not later."""
        try:
            dtype, shape, (begin, end) = CODE_DTYPES[v["dtype"]], tuple(v["shape"]), tuple(v["data_offsets"])
            ok = all(type(d) is int and d >= 0 for d in shape) and type(begin) is int and type(end) is int
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{name}: damaged header entry {str(v)[:80]}")
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end or end - begin != size or self._base + end > self.path.stat().st_size:
            raise ValueError(f"{name}: its bytes {begin}..{end} do not fit its shape {list(shape)} or the file")
        return dtype, shape, (begin, end)

    def keys(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, (begin, end) = self.entries[name]
        buf = bytearray(end - begin)
        self._fh.seek(self._base + begin)
        if self._fh.readinto(buf) != len(buf):
            raise ValueError(f"{self.path}: {name} is cut short")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def close(self) -> None:
        self._fh.close()


class StreamWriter:
    """Usage: declare (name, dtype, shape) for every tensor, then `write` them in that order."""

    def __init__(self, path: str | Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._plan = list(plan)
        header, offset = {}, 0
        for name, dtype, shape in self._plan:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = dict(metadata)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # tensors start 8-byte aligned, as safetensors writes them
        self.data_bytes = offset
        self._next = 0
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, dtype, shape = self._plan[self._next]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"tensor {self._next}: planned {want_name} {dtype} {tuple(shape)}, got "
                             f"{name} {tensor.dtype} {tuple(tensor.shape)}")
        t = tensor.detach().to("cpu").contiguous()
        self._fh.write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        self._next += 1

    def close(self) -> None:
        self._fh.close()
        if self._next != len(self._plan):
            raise ValueError(f"{self.path}: {len(self._plan) - self._next} planned tensors were not written")

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()
