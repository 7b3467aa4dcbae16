"""The wheel carries what qalora finds by name: the top-level configs/ and recipes/ ship inside
the package, every subpackage is listed in pyproject.toml, and an installed copy finds a config
or recipe by name from any folder (the card's `--config llama2-7b-int4.yaml` included)."""

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_in_the_wheel_list():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "qalora_cli").rglob("__init__.py")}
    assert on_disk | {"qalora_cli.shipped_configs", "qalora_cli.shipped_recipes"} == listed


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory):
    dist, src = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "qalora_cli", "configs", "recipes"):  # setuptools builds in place
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(dist)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = dist.glob("qalora-*.whl")
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def test_the_wheel_ships_the_configs_and_recipes(unpacked_wheel):
    for kind in ("configs", "recipes"):
        shipped = sorted(p.name for p in (unpacked_wheel / "qalora_cli" / f"shipped_{kind}").glob("*.yaml"))
        assert shipped == sorted(p.name for p in (ROOT / kind).glob("*.yaml")) and shipped


def test_an_installed_copy_finds_configs_and_recipes_by_name_from_any_folder(unpacked_wheel, tmp_path):
    code = ("from qalora_cli.config.loader import find_config; from qalora_cli.shipped import find_shipped;"
            "import qalora_cli; print(qalora_cli.__file__);"
            "print(find_config('llama2-7b-int4.yaml')); print(find_config('smollm2-135m-int4'));"
            "print(find_shipped('recipes', 'paper-table', 'recipe'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(unpacked_wheel), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(str(unpacked_wheel))  # the unpacked copy, not the source tree
    assert lines[1] == str(unpacked_wheel / "qalora_cli/shipped_configs/llama2-7b-int4.yaml")
    assert lines[2] == str(unpacked_wheel / "qalora_cli/shipped_configs/smollm2-135m-int4.yaml")
    assert lines[3] == str(unpacked_wheel / "qalora_cli/shipped_recipes/paper-table.yaml")
