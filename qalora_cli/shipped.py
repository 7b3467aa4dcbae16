"""Where the files qalora ships beside its code live: the run configs (configs/) and the
recipes (recipes/) at the top of the source tree. A wheel carries them inside the package as
qalora_cli/shipped_configs and qalora_cli/shipped_recipes (pyproject.toml maps them), so a
name like `smollm2-135m-int4` is found however qalora was installed."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

_PACKAGE = Path(__file__).resolve().parent


def shipped_dir(kind: str) -> Path:
    """The folder of shipped `kind` files ('configs' or 'recipes'): the wheel's copy first, then
    the source tree's (a checkout or an editable install)."""
    for folder in (_PACKAGE / f"shipped_{kind}", _PACKAGE.parent / kind):
        if folder.is_dir():
            return folder
    raise UserError(f"qalora's shipped {kind} are missing from this installation; reinstall qalora")


def shipped_names(kind: str) -> list[str]:
    return sorted(p.stem for p in shipped_dir(kind).glob("*.yaml"))


def find_shipped(kind: str, name_or_path: str, what: str) -> Path:
    """A YAML file by path, or a shipped one by name, with or without `.yaml` (the usage line
    `--config llama2-7b-int4.yaml` works from any folder). `what` names it in errors."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if "/" in name_or_path:
        raise UserError(f"{what} file '{name_or_path}' does not exist")
    stem = p.stem if p.suffix in (".yaml", ".yml") else name_or_path
    shipped = shipped_dir(kind) / f"{stem}.yaml"
    if shipped.is_file():
        return shipped
    if stem != name_or_path:
        raise UserError(f"{what} file '{name_or_path}' does not exist (and no built-in {what} is named '{stem}')")
    raise UserError(f"no built-in {what} named '{name_or_path}'; built-in: {', '.join(shipped_names(kind))} "
                    f"(or give a path to a YAML file)")


def first_comment_line(path: Path) -> str:
    """What a shipped file is for: its first line, a comment."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0].lstrip("# ").strip() if lines else ""
