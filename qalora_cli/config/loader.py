"""Find a config by name or path, apply `section.key=value` overrides, validate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import UserError
from ..shipped import find_shipped, shipped_dir, shipped_names
from .schema import RunConfig

def builtin_dir() -> Path:
    return shipped_dir("configs")


def builtin_names() -> list[str]:
    return shipped_names("configs")


def find_config(name_or_path: str) -> Path:
    return find_shipped("configs", name_or_path, "config")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"config '{path}' could not be read as UTF-8 text: {e}") from None
    except RecursionError:
        raise UserError(f"config '{path}' is nested too deeply to be a config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        why = " ".join(str(getattr(e, "problem", None) or e).split())  # one line: the reader's errors span several
        raise UserError(f"config '{path}' is not valid YAML{where}: {why}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config '{path}' must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """`quantize.bits=3` -> data['quantize']['bits'] = 3 (the value parsed as YAML)."""
    key, sep, raw = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise UserError(f"override '{assignment}' must look like section.key=value")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserError(f"override '{assignment}': '{p}' is not a section")
        node = nxt
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = raw


def validate(data: dict[str, Any], source: str) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        path = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            allowed = _allowed_keys(err["loc"][:-1])
            if allowed:
                msg += f"; allowed here: {', '.join(allowed)}"
        elif "input" in err and err["type"] != "missing":
            msg += f" (got {err['input']!r})"
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise UserError(f"config {source}: {path}: {msg}{more}") from None


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = RunConfig
    for part in loc:
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = field.annotation
    return list(model.model_fields) if hasattr(model, "model_fields") else []


def load_config(name_or_path: str, overrides: list[str] = ()) -> RunConfig:
    path = find_config(name_or_path)
    data = read_yaml(path)
    for o in overrides:
        apply_override(data, o)
    return validate(data, f"'{name_or_path}'")
