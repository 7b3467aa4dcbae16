"""Nothing the package reads can run code: no pickle anywhere (torch.load only with
weights_only=True, numpy without allow_pickle, no pickle-family modules), trust_remote_code
never switched on by the code itself (only a user's explicit model.trust_remote_code), and
chat templates rendered only through transformers' sandboxed engine. The scanner is tested on
planted violations, so it cannot pass by seeing nothing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "?")  # ?.eval(): a method, not the builtin
    return ".".join(reversed(parts))


def violations(source: str, where: str = "<src>") -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{where}:{node.lineno} imports {a.name}" for a in node.names
                      if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}:{node.lineno} imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name.endswith("torch.load") or name == "load" and _kw(node, "weights_only") is not None:
                if not _is_true(_kw(node, "weights_only")):
                    found.append(f"{where}:{node.lineno} torch.load without weights_only=True")
            if name.split(".")[-1] == "load" and name.split(".")[0] in ("np", "numpy") and \
                    _kw(node, "allow_pickle") is not None and not (
                    isinstance(_kw(node, "allow_pickle"), ast.Constant) and _kw(node, "allow_pickle").value is False):
                found.append(f"{where}:{node.lineno} numpy load with allow_pickle")
            if _is_true(_kw(node, "trust_remote_code")):
                found.append(f"{where}:{node.lineno} trust_remote_code=True")
            if name in ("eval", "exec"):
                found.append(f"{where}:{node.lineno} {name}()")
    return found


def package_files():
    return sorted((ROOT / "qalora_cli").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))


def test_no_path_of_the_package_can_load_a_pickle_or_run_remote_code():
    files = package_files()
    assert len(files) > 50
    found = [v for f in files for v in violations(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert found == []


@pytest.mark.parametrize("source,what", [
    ("import pickle\npickle.loads(b'')", "imports pickle"),
    ("from joblib import load", "imports from joblib"),
    ("import torch\ntorch.load('x.pt')", "weights_only"),
    ("import torch\ntorch.load('x.pt', weights_only=False)", "weights_only"),
    ("import numpy as np\nnp.load('x.npy', allow_pickle=True)", "allow_pickle"),
    ("from transformers import AutoModel\nAutoModel.from_pretrained('m', trust_remote_code=True)", "trust_remote_code"),
    ("eval('1 + 1')", "eval()"),
])
def test_the_scanner_finds_each_planted_violation(source, what):
    found = violations(source)
    assert len(found) == 1 and what in found[0]


def test_safe_forms_pass_the_scanner():
    assert violations("import torch\ntorch.load('x.pt', weights_only=True)\n"
                      "import numpy as np\nnp.load('x.npy')\nnp.load('y.npy', allow_pickle=False)\n"
                      "f(trust_remote_code=cfg.trust_remote_code)") == []


def test_trust_remote_code_is_off_unless_the_user_turns_it_on():
    from qalora_cli.config.schema import ModelSection

    assert ModelSection(name_or_path="x").trust_remote_code is False


def test_a_chat_template_that_reaches_for_python_is_stopped_by_the_sandbox(tmp_path):
    """transformers renders templates in jinja2's immutable sandbox: attribute walks to Python
    internals raise, and the CLI says so in one line (exit 2)."""
    from typer.testing import CliRunner

    from helpers import make_tiny_llama, make_tokenizer
    from qalora_cli.cli.app import app

    tok = make_tokenizer()
    tok.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}{{ messages[0]['content'] }}"
    make_tiny_llama(len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    r = CliRunner().invoke(app, ["generate", "--model", str(tmp_path), "--prompt", "hi", "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert "chat template" in r.stderr and len(r.stderr.strip().splitlines()) == 1
