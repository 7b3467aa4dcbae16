"""`qalora recipe`: a whole experiment from one YAML file. On a tiny Llama: the stages run in
order and end in results.csv/.md/.png whose figures are the stages' own reports; a second run
does no work; a changed setting re-runs just the stages that depend on it; every mistake in a
recipe is one line and exit 2 before any stage runs."""

import csv
import json

import pytest
import yaml
from typer.testing import CliRunner

from helpers import tiny_config_dict
from qalora_cli.cli.app import app

runner = CliRunner()


def write_config(tiny_model_dir, folder, lr=3e-3):
    d = tiny_config_dict(tiny_model_dir, folder / "unused")
    d["lora"] = {"rank": 8, "alpha": 16, "dropout": 0.0}
    d["data"] = {"source": "builtin", "builtin_size": 160, "max_length": 192, "template": "raw",
                 "eval_max_examples": 8}
    d["train"] = {"device": "cpu", "micro_batch_size": 4, "batch_size": 8, "learning_rate": lr, "max_steps": 4,
                  "eval_every": 4, "save_every": 4, "exact_match_examples": 4, "mixed_precision": "no",
                  "max_new_tokens": 24}
    d["merge"] = {"verify_prompts": 1, "ppl_tokens": 0}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def recipe_dict(config, out, **changes):
    r = {"description": "tiny QA-LoRA", "output": str(out), "sweep": {"bits": [4]},
         "stages": {"quantize": {"run": "quantize", "config": str(config), "set": {"quantize.bits": "{bits}"}},
                    "tune": {"run": "finetune", "config": str(config), "model": "quantize"},
                    "merged": {"run": "merge", "config": str(config), "model": "quantize", "adapter": "tune"},
                    "score": {"run": "eval", "config": str(config), "model": "merged", "label": "merged",
                              "metrics": ["exact_match", "answer_loss", "ppl"],
                              "eval": {"ppl_tokens": 256, "ppl_seq_len": 64, "device": "cpu", "dtype": "float32"}}},
         "results": {"metrics": ["exact_match", "answer_loss", "ppl", "size_mb", "eval_loss"], "x": "bits"}}
    for path, value in changes.items():
        node = r
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return r


def run_recipe(path, *args):
    result = runner.invoke(app, ["recipe", "run", str(path), *args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe")
    config = write_config(tiny_model_dir, folder)
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(config, folder / "out")))
    code, out = run_recipe(path)
    assert code == 0, out
    return folder, path, config


def test_the_results_are_the_stages_own_figures(finished):
    folder, _, _ = finished
    out = folder / "out"
    (row,) = list(csv.DictReader((out / "results.csv").open()))
    task = json.loads((out / "score-bits4/task.json").read_text())
    ppl = json.loads((out / "score-bits4/ppl.json").read_text())
    tuned = json.loads((out / "tune-bits4/finetune_report.json").read_text())
    assert row["label"] == "merged" and row["bits"] == "4"
    assert float(row["exact_match"]) == task["exact_match"] and float(row["answer_loss"]) == task["answer_loss"]
    assert float(row["ppl"]) == ppl["ppl"] and float(row["eval_loss"]) == tuned["after"]["eval_loss"]
    merged_bytes = sum(f.stat().st_size for f in (out / "merged-bits4").glob("*.safetensors"))
    assert float(row["size_mb"]) == round(merged_bytes / 1e6, 2)
    assert json.loads((out / "merged-bits4/merge_report.json").read_text())["verification"]["verdict"] == "pass"
    assert "| merged | 4 |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_a_second_run_does_no_work(finished):
    folder, path, _ = finished
    outputs = {p: p.stat().st_mtime_ns for p in (folder / "out").glob("*-bits4/*") if p.is_file()}
    code, out = run_recipe(path)
    assert code == 0 and "0 stage runs, 4 reused" in out, out
    assert outputs == {p: p.stat().st_mtime_ns for p in outputs}


def test_a_changed_setting_reruns_only_what_depends_on_it(finished, tiny_model_dir):
    """The dry run names what changes (the fine-tune and what reads it), the run re-runs just that."""
    folder, path, config = finished
    quantized = (folder / "out/quantize-bits4/model.safetensors").stat().st_mtime_ns
    before = (folder / "out/tune-bits4/adapter_model.safetensors").read_bytes()
    recipe = recipe_dict(config, folder / "out")
    recipe["stages"]["tune"]["set"] = {"train.learning_rate": 1e-2}
    path.write_text(yaml.safe_dump(recipe))
    code, out = run_recipe(path, "--dry-run")
    assert code == 0 and "[reuse  ] quantize-bits4" in out and "[changed] tune-bits4" in out, out
    assert "[changed] merged-bits4" in out and "[changed] score-bits4" in out
    code, out = run_recipe(path)
    assert code == 0 and "3 stage runs, 1 reused" in out, out
    assert (folder / "out/quantize-bits4/model.safetensors").stat().st_mtime_ns == quantized
    assert (folder / "out/tune-bits4/adapter_model.safetensors").read_bytes() != before


BAD = [
    ({"stages.tune.run": "distill"}, "stages.tune.run"),
    ({"stages.tune.config": "no-such-config"}, "no built-in config named 'no-such-config'"),
    ({"results.metrics": ["accuracy"]}, "unknown metric 'accuracy'"),
    ({"stages.score.metrics": ["bleu"]}, "unknown metric 'bleu'"),
    ({"stages.quantize.model": "score"}, "cycle: "),
    ({"sweep.bits": [4, 5]}, "quantize.bits"),
    ({"stages.tune.model": "quantise"}, "'quantise' is neither a stage"),
    ({"stages.score.label": "{width}"}, "'{width}' is not a sweep variable"),
    ({"results.x": "width"}, "results.x 'width' is not a sweep variable"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m for _, m in BAD])
def test_a_bad_recipe_is_one_line_before_any_stage_runs(tiny_model_dir, tmp_path, change, message):
    config = write_config(tiny_model_dir, tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(config, tmp_path / "out", **change)))
    code, out = run_recipe(path)
    assert code == 2 and message in out and out.count("\n") == 1, out
    assert not (tmp_path / "out").exists()


def test_an_unknown_recipe_name_lists_the_built_in_ones():
    code, out = run_recipe("paper-tabel")
    assert code == 2 and "no built-in recipe named 'paper-tabel'" in out and "paper-table" in out
