"""Read a (possibly sharded) safetensors checkpoint one tensor at a time, by name, holding
only the tensor asked for (models/safetensors_stream.py says why no memory map)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError, first_line
from ..models.quantized_io import weight_files
from ..models.safetensors_stream import StreamReader


class CheckpointReader:
    """Open handles on every shard; `get(name)` reads one tensor, `shape(name)` reads none."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = weight_files(self.path)
        self._readers, self.file_of = {}, {}
        for f in self.files:
            try:
                self._readers[f] = StreamReader(f)
            except Exception as e:
                self.close()
                raise UserError(f"'{f}': corrupt weights file: {first_line(e)}") from e
            self.file_of.update({k: f for k in self._readers[f].keys()})

    def keys_in(self, file: Path) -> list[str]:
        return self._readers[file].keys()

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str) -> torch.Tensor:
        return self._readers[self.file_of[name]].get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._readers[self.file_of[name]].entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._readers[self.file_of[name]].entries[name][0]

    def metadata(self, file: Path) -> dict[str, str]:
        return self._readers[file].meta

    def close(self) -> None:
        for r in self._readers.values():
            r.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
