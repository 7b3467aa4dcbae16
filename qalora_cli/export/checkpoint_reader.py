"""Read a (possibly sharded) safetensors checkpoint one tensor at a time, by name."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch

from ..errors import UserError
from ..models.quantized_io import weight_files


class CheckpointReader:
    """Open handles on every shard; `get(name)` reads one tensor, `shape(name)` reads none."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        self.files = weight_files(self.path)
        self._stack = ExitStack()
        self._handles, self.file_of = {}, {}
        try:
            for f in self.files:
                h = self._stack.enter_context(safe_open(f, "pt"))
                self._handles[f] = h
                self.file_of.update({k: f for k in h.keys()})
        except Exception as e:
            self._stack.close()
            raise UserError(f"'{self.path}': corrupt weights file: {str(e).splitlines()[0]}") from e

    def keys_in(self, file: Path) -> list[str]:
        return sorted(self._handles[file].keys())

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.file_of[name]].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

    def dtype_code(self, name: str) -> str:
        return self._handles[self.file_of[name]].get_slice(name).get_dtype()

    def metadata(self, file: Path) -> dict[str, str]:
        return self._handles[file].metadata() or {}

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
