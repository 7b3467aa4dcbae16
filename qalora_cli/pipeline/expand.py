"""From the recipe to stage instances: one per combination of the sweep values a stage uses
(itself, or through the stages it reads), each with its resolved config, its output folder and
a digest of everything its result depends on (so an unchanged stage is reused)."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..config.loader import apply_override, find_config, read_yaml, validate
from ..errors import UserError
from .spec import RecipeSpec, StageSpec, fill, references, stage_order, template_vars

# config keys the runner sets itself (inputs and outputs): never part of a digest
WIRED_KEYS = {"output": ("dir", "overwrite"), "train": ("quantized_model", "adapter_dir"),
              "merge": ("quantized_model", "adapter_dir", "dir", "format")}


@dataclass
class Instance:
    stage: str
    spec: StageSpec
    values: dict[str, Any]               # the sweep values this instance is run for
    inputs: dict[str, "Instance"]        # role (model, adapter) -> the instance it reads
    out: Path
    config: dict | None = None           # the run config, before the runner wires paths in
    digest: str = ""
    label: str = ""
    columns: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.stage + "".join(f"-{k}{v}" for k, v in self.values.items())


def expand(spec: RecipeSpec, source: str, root: Path) -> list[Instance]:
    """Every stage instance, each after the ones it reads."""
    used: dict[str, list[str]] = {}
    by_key: dict[tuple, Instance] = {}
    instances: list[Instance] = []
    for sid in stage_order(spec, source):
        st = spec.stages[sid]
        refs = references(st, spec.stages)
        names = template_vars(st).union(*(used[r] for r in refs.values()))
        used[sid] = [v for v in spec.sweep if v in names]  # in the sweep's order
        for combo in itertools.product(*(spec.sweep[v] for v in used[sid])):
            values = dict(zip(used[sid], combo))
            inputs = {role: by_key[(ref, _key(values, used[ref]))] for role, ref in refs.items()}
            inst = Instance(sid, st, values, inputs, root / sid)
            inst.out = root / inst.name
            _resolve(inst, source)
            by_key[(sid, _key(values, used[sid]))] = inst
            instances.append(inst)
    # sweep-major: everything the first value needs, then the next value (a partial run has whole
    # rows); stages that use no sweep variable come first, and each still follows its inputs
    rank = {sid: i for i, sid in enumerate(stage_order(spec, source))}
    return sorted(instances, key=lambda i: ([spec.sweep[v].index(i.values[v]) if v in i.values else -1
                                            for v in spec.sweep], rank[i.stage]))


def _key(values: dict, names: list[str]) -> tuple:
    return tuple(values[n] for n in names)


def _resolve(inst: Instance, source: str) -> None:
    st, values = inst.spec, {k: v for k, v in inst.values.items()}
    where = f"recipe {source}: stage '{inst.name}'"
    try:
        config_name = fill(st.config, values)
        inst.label = fill(st.label, values) or inst.stage
        inst.columns = {**values, **{k: fill(str(v), values) for k, v in st.columns.items()}}
        if config_name:
            data = read_yaml(find_config(config_name))
            for key, value in st.set.items():
                text = fill(value, values) if isinstance(value, str) else json.dumps(value)
                apply_override(data, f"{key}={text}")
            validate(json.loads(json.dumps(data)), f"{config_name} (stage '{inst.name}')")
            inst.config = data
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    except (KeyError, ValueError, IndexError) as e:
        raise UserError(f"{where}: a template in it cannot be filled ({e})") from None
    if st.run == "eval" and {"exact_match", "answer_loss"} & set(st.metrics) and not inst.config:
        raise UserError(f"{where}: exact_match and answer_loss need a config (its data section is the task)")
    for role in ("model", "adapter"):
        path = getattr(st, role)
        if path and role not in inst.inputs and "/" not in path and not Path(path).exists():
            raise UserError(f"{where}: {role} '{path}' is neither a stage of the recipe nor an existing path")
    inst.digest = _digest(inst)


def _digest(inst: Instance) -> str:
    st = inst.spec
    config = json.loads(json.dumps(inst.config)) if inst.config else None
    for section, keys in WIRED_KEYS.items():
        part = (config or {}).get(section)
        for k in keys if isinstance(part, dict) else ():
            part.pop(k, None)
    what = {"run": st.run, "config": config, "format": st.format, "metrics": sorted(st.metrics),
            "eval": st.eval.model_dump() if st.run == "eval" else None,
            "inputs": {role: i.digest for role, i in inst.inputs.items()},
            "paths": {role: fingerprint(getattr(st, role)) for role in ("model", "adapter")
                      if getattr(st, role) and role not in inst.inputs},
            "source": _source_fingerprint(config) if config and "model" not in inst.inputs else None,
            "qalora": __version__}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _source_fingerprint(config: dict) -> Any:
    """The config's own model (a quantize or a qlora/lora fine-tune reads it): a local file's size
    and time, a hub id as named (the hub's revision is the user's to pin)."""
    m = config.get("model") or {}
    try:
        from ..models.source import package_dir

        base = package_dir(m["package"]) if m.get("package") else Path(".")
        return fingerprint(str(base / m.get("name_or_path", "")))
    except UserError:
        return m.get("name_or_path")


def fingerprint(path: str) -> Any:
    """Size and modification time of a local file, or of every file in a folder; else the text."""
    p = Path(path)
    if p.is_file():
        s = p.stat()
        return [s.st_size, s.st_mtime_ns]
    if p.is_dir():
        return sorted([str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns]
                      for f in p.rglob("*") if f.is_file())
    return path
