"""The CLI through Typer's runner, and as a user runs it (a subprocess for --help)."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from qalora_cli.cli.app import app

runner = CliRunner()


def test_help_is_instant_and_imports_no_torch():
    code = ("import sys, time; t = time.time(); from qalora_cli.cli.app import app; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; print(time.time() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) < 2.0
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "quantize" in r.output and "config" in r.output


def test_config_ls_cp_show(tmp_path):
    r = runner.invoke(app, ["config", "ls"])
    assert r.exit_code == 0 and "smollm2-135m-int4" in r.output and "llama2-7b-int4" in r.output
    r = runner.invoke(app, ["config", "cp", "smollm2-135m-int3", str(tmp_path)])
    assert r.exit_code == 0 and (tmp_path / "smollm2-135m-int3.yaml").is_file()
    r = runner.invoke(app, ["config", "cp", "smollm2-135m-int3", str(tmp_path)])
    assert r.exit_code == 2 and "already exists" in r.output
    r = runner.invoke(app, ["config", "show", "--config", str(tmp_path / "smollm2-135m-int3.yaml"),
                            "quantize.group_size=64"])
    assert r.exit_code == 0 and "group_size: 64" in r.output and "bits: 3" in r.output


def quantize_args(model_dir, out, *extra):
    return ["quantize", "--model", str(model_dir), "--output", str(out), "--device", "cpu",
            "calibration.num_samples=4", "calibration.seq_len=32", *extra]


def test_quantize_end_to_end_and_refuses_to_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    r = runner.invoke(app, quantize_args(tiny_model_dir, out, "--bits", "3"))
    assert r.exit_code == 0, r.output
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["bits"] == 3 and len(report["layers"]) == 14
    assert report["calibration"]["source"].startswith("mix: 2 of 4 samples generated")  # the config default
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    r = runner.invoke(app, quantize_args(tiny_model_dir, out))
    assert r.exit_code == 2 and "already exists; pass --overwrite" in r.output
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # untouched
    r = runner.invoke(app, quantize_args(tiny_model_dir, out, "--overwrite", "--bits", "2"))
    assert r.exit_code == 0, r.output
    assert json.loads((out / "quantize_report.json").read_text())["bits"] == 2


@pytest.mark.parametrize("extra, message", [
    (["--bits", "5"], "quantize.bits: Input should be 2, 3, 4 or 8 (got 5)"),
    (["--group-size", "48"], "group size 48 does not divide the input width 64 of layer 'model.layers.0.self_attn.q_proj'"),
    (["calibration.seq_len=100000000"], "too little calibration text"),
    (["--device", "cuda:3"], "device 'cuda:3' is not available"),
    (["quantize.nonsense=1"], "quantize.nonsense: unknown key"),
])
def test_bad_input_is_one_line_exit_2_and_no_output(tiny_model_dir, tmp_path, extra, message):
    out = tmp_path / "q"
    r = runner.invoke(app, quantize_args(tiny_model_dir, out, *extra))
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-written


def test_missing_and_corrupt_models(tmp_path, tiny_model_dir):
    r = runner.invoke(app, quantize_args(tmp_path / "nowhere", tmp_path / "q"))
    assert r.exit_code == 2 and "no model at" in r.output
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    r = runner.invoke(app, quantize_args(broken, tmp_path / "q"))
    assert r.exit_code == 2 and "could not load the model" in r.output
    assert not (tmp_path / "q").exists()
    r = runner.invoke(app, quantize_args(tmp_path / "notes.txt", tmp_path / "q"))
    assert r.exit_code == 2


def test_calibration_from_user_files(tiny_model_dir, tmp_path):
    text = tmp_path / "my.jsonl"
    text.write_text("\n".join(json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 20})
                              for _ in range(5)))
    out = tmp_path / "q"
    r = runner.invoke(app, quantize_args(tiny_model_dir, out, "calibration.source=files",
                                         f"calibration.paths=[{text}]"))
    assert r.exit_code == 0, r.output
    assert "my.jsonl" in json.loads((out / "quantize_report.json").read_text())["calibration"]["source"]
    r = runner.invoke(app, quantize_args(tiny_model_dir, tmp_path / "q2", "calibration.source=files",
                                         f"calibration.paths=[{text}]", "calibration.text_field=body"))
    assert r.exit_code == 2 and "has no field 'body'; fields: text" in r.output


def test_debug_variable_shows_the_traceback(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QALORA_DEBUG", "1")
    r = runner.invoke(app, quantize_args(tiny_model_dir, tmp_path / "q", "--group-size", "48"))
    assert r.exit_code != 0 and r.exception is not None
