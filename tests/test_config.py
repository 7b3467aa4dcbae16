"""The typed config: built-ins validate, overrides apply, and every mistake names its key."""

from pathlib import Path

import pytest

from qalora_cli.config.loader import apply_override, builtin_names, find_config, load_config, validate
from qalora_cli.errors import UserError

BASE = {"model": {"name_or_path": "some/model"}, "output": {"dir": "out/x"}}


def test_every_builtin_validates():
    names = builtin_names()
    assert {"smollm2-135m-int4", "smollm2-135m-int3", "smollm2-135m-int2",
            "llama2-7b-int4", "llama2-13b-int4"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.quantize.group_size == 32
    assert load_config("smollm2-135m-int3").quantize.bits == 3


def test_overrides_are_typed():
    cfg = load_config("smollm2-135m-int4", ["quantize.bits=3", "calibration.num_samples=16",
                                            "quantize.act_order=true", "output.dir=elsewhere"])
    assert cfg.quantize.bits == 3 and cfg.calibration.num_samples == 16
    assert cfg.quantize.act_order is True and cfg.output.dir == "elsewhere"


@pytest.mark.parametrize("data_change, expected", [
    ({"quantize": {"bits": 5}}, r"quantize\.bits: Input should be 2, 3, 4 or 8 \(got 5\)"),
    ({"quantize": {"colour": 1}}, r"quantize\.colour: unknown key; allowed here: method, bits"),
    ({"extra_section": {}}, r"extra_section: unknown key; allowed here: model, quantize"),
    ({"quantize": {"group_size": 0}}, r"quantize\.group_size: .*positive number of columns or -1"),
    ({"quantize": {"damp_percent": "lots"}}, r"quantize\.damp_percent: .*valid number"),
    ({"calibration": {"source": "hub"}}, r"calibration: .*needs calibration\.dataset"),
    ({"quantize": {"static_groups": True}}, r"static_groups only applies with act_order"),
    ({"output": {}}, r"output\.dir: Field required"),
])
def test_errors_name_the_key(data_change, expected):
    data = {k: dict(v) for k, v in BASE.items()}
    for section, values in data_change.items():
        if section == "output" and not values:
            data["output"] = {}
        else:
            data.setdefault(section, {}).update(values)
    with pytest.raises(UserError, match=expected):
        validate(data, "'t'")


def test_unknown_name_lists_builtins_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="no built-in config named 'nope'; built-in: .*smollm2-135m-int4"):
        find_config("nope")
    with pytest.raises(UserError, match="does not exist"):
        find_config(str(tmp_path / "missing.yaml"))


def test_bad_yaml_and_bad_override(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_config(str(bad))
    with pytest.raises(UserError, match="section.key=value"):
        apply_override({}, "quantize.bits")
    with pytest.raises(UserError, match="'bits' is not a section"):
        apply_override({"bits": 4}, "bits.x=1")


def test_a_builtin_config_is_found_by_its_file_name_from_any_folder(tmp_path, monkeypatch):
    """The model card's usage line `--config llama2-7b-int4.yaml` names the built-in when no such file is here;
    a file of that name in the current folder wins, and a path that does not exist stays an error."""
    monkeypatch.chdir(tmp_path)
    assert find_config("llama2-7b-int4.yaml") == find_config("llama2-7b-int4")
    (tmp_path / "llama2-7b-int4.yaml").write_text("model: {name_or_path: x}\n")
    assert find_config("llama2-7b-int4.yaml") == Path("llama2-7b-int4.yaml")
    with pytest.raises(UserError, match="does not exist"):
        find_config("sub/llama2-7b-int4.yaml")
    with pytest.raises(UserError, match="no built-in config is named 'nope'"):
        find_config("nope.yml")
