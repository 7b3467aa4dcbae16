"""Every refusal of `qalora merge` is one line and exit code 2, and leaves nothing behind:
another base, a rank or group size that disagrees, a missing target, NaN, a failed
verification, a merged base, an existing output."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qalora_cli.lora.adapter_io import checkpoint_sha256
from helpers import corrupt_one_layer, merge_cli


def tampered(adapter, tmp_path, config_change=None, tensor_change=None):
    copy = tmp_path / "tampered"
    shutil.copytree(adapter, copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    tensors = load_file(copy / "adapter_model.safetensors")
    if config_change:
        config_change(cfg)
    if tensor_change:
        tensor_change(tensors)
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, copy / "adapter_model.safetensors")
    return copy


def refused(result, out, *words):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.output  # progress lines may come before
    for w in words:
        assert w in errors[0], errors[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))
    return errors[0]


def test_an_adapter_of_another_base(bases, tmp_path):
    out = tmp_path / "m"
    refused(merge_cli(bases["g64"], bases["adapter"], out), out, "another base")


def test_a_group_size_that_disagrees(bases, tmp_path):
    # The hash made to match, so that the shapes are what refuses it.
    sha = checkpoint_sha256(bases["g64"])
    adapter = tampered(bases["adapter"], tmp_path, lambda c: c["base"].update(sha256=sha))
    out = tmp_path / "m"
    refused(merge_cli(bases["g64"], adapter, out), out, "do not fit", "groups")


def test_a_rank_that_disagrees(bases, tmp_path):
    adapter = tampered(bases["adapter"], tmp_path, lambda c: c.update(rank=4, scaling=c["alpha"] / 4))
    out = tmp_path / "m"
    refused(merge_cli(bases["act"], adapter, out), out, "do not fit rank 4")


def test_a_target_the_model_lacks(bases, tmp_path):
    ghost = "model.layers.7.mlp.up_proj"

    def add(t):
        t[f"{ghost}.lora_A"], t[f"{ghost}.lora_B"] = torch.zeros(8, 2), torch.zeros(64, 8)

    adapter = tampered(bases["adapter"], tmp_path, lambda c: c["targets"].append(ghost), add)
    out = tmp_path / "m"
    refused(merge_cli(bases["act"], adapter, out), out, ghost)


def test_nan_in_the_adapter(bases, tmp_path):
    def poison(t):
        t["model.layers.1.mlp.down_proj.lora_B"][3, 2] = float("nan")

    adapter = tampered(bases["adapter"], tmp_path, tensor_change=poison)
    out = tmp_path / "m"
    refused(merge_cli(bases["act"], adapter, out), out, "model.layers.1.mlp.down_proj", "NaN")


def test_a_verification_that_fails_removes_the_output(bases, tmp_path, monkeypatch):
    corrupt_one_layer(monkeypatch)
    out = tmp_path / "m"
    refused(merge_cli(bases["act"], bases["adapter"], out), out, "verification failed")


def test_a_merged_base_and_an_existing_output(bases, tmp_path):
    merged = tmp_path / "merged"
    assert merge_cli(bases["act"], bases["adapter"], merged, "--no-verify").exit_code == 0
    out = tmp_path / "again"
    refused(merge_cli(merged, bases["adapter"], out), out, "merged model")
    before = sorted(p.name for p in merged.iterdir())
    result = merge_cli(bases["act"], bases["adapter"], merged, "--no-verify")
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert sorted(p.name for p in merged.iterdir()) == before


@pytest.mark.parametrize("what", ["adapter", "model"])
def test_a_folder_that_is_not_there(bases, tmp_path, what):
    out = tmp_path / "m"
    base, adapter = bases["act"], bases["adapter"]
    if what == "adapter":
        adapter = tmp_path / "nothing"
    else:
        base = tmp_path / "nothing"
    refused(merge_cli(base, adapter, out), out, "nothing")
