"""`qalora eval ppl` through the CLI: the unquantized folder, a GPTQ checkpoint with and without
its adapter, and the merged model (which must give the adapter's perplexity), each against the
float64 sliding-window reference; and every bad input in one line."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from qalora_cli.cli.app import app
from qalora_cli.lora.adapter_io import attach_adapter, read_adapter
from qalora_cli.models.quantized_io import load_quantized
from helpers import merge_cli, reference_nll

runner = CliRunner()


def eval_ppl(tmp_path, *args):
    out = tmp_path / "ppl.json"
    r = runner.invoke(app, ["eval", "ppl", "--seq-len", "48", "--stride", "24", "--max-tokens", "200",
                            "--device", "cpu", "--dtype", "float32", "--output-json", str(out), *args])
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


def ids_of(tokenizer_dir):
    from transformers import AutoTokenizer

    from qalora_cli.data.builtin_text import heldout_text

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return torch.tensor(tok(heldout_text(), add_special_tokens=False)["input_ids"][:200])


def test_every_model_kind_against_the_reference(bases, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = ids_of(tiny_model_dir)
    fp = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    r = eval_ppl(tmp_path, "--model", str(tiny_model_dir))
    assert math.isclose(r["nll"], reference_nll(fp, ids, 48, 24)[0], rel_tol=1e-5) and r["tokens"] == 199

    q, _ = load_quantized(bases["act"], dtype=torch.float32)
    r_q = eval_ppl(tmp_path, "--model", str(bases["act"]))
    assert math.isclose(r_q["nll"], reference_nll(q, ids, 48, 24)[0], rel_tol=1e-5)

    attach_adapter(q, *read_adapter(bases["adapter"]))
    want = reference_nll(q.eval(), ids, 48, 24)[0]
    r_a = eval_ppl(tmp_path, "--model", str(bases["act"]), "--adapter", str(bases["adapter"]))
    assert math.isclose(r_a["nll"], want, rel_tol=1e-5) and r_a["nll"] != r_q["nll"]

    merged = tmp_path / "merged"
    assert merge_cli(bases["act"], bases["adapter"], merged, "--no-verify").exit_code == 0
    r_m = eval_ppl(tmp_path, "--model", str(merged))
    assert math.isclose(r_m["nll"], want, rel_tol=1e-5)  # the merged model is the adapted one


def test_a_text_file(bases, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    r = eval_ppl(tmp_path, "--model", str(bases["act"]), "--text", str(f))
    assert r["text"] == str(f) and r["ppl"] > 1


@pytest.mark.parametrize("args, words", [
    (["--text", "missing.txt"], "does not exist"),
    (["--seq-len", "1"], "--seq-len"),
    (["--stride", "99"], "--stride"),
    (["--max-tokens", "10"], "shorter than one window"),
])
def test_bad_input_is_one_line_and_exit_2(bases, tmp_path, args, words):
    r = runner.invoke(app, ["eval", "ppl", "--model", str(bases["act"]), "--device", "cpu", "--seq-len", "48", *args])
    assert r.exit_code == 2, r.output
    assert r.output.strip().count("\n") == 0 and words in r.output


@pytest.mark.parametrize("kernel, dtype, rel", [("triton", "float32", 1e-5), ("gptqmodel", "float16", 1e-3)])
def test_named_kernels_give_the_reference_perplexity(bases, tmp_path, kernel, dtype, rel):
    """The same checkpoint + adapter through another backend gives the torch reference's
    perplexity in the same dtype (triton under TRITON_INTERPRET=1 without a GPU; GPTQModel's
    kernels compute in float16/bfloat16 only)."""
    pytest.importorskip(kernel)
    args = ["--model", str(bases["act"]), "--adapter", str(bases["adapter"]), "--max-tokens", "100", "--dtype", dtype]
    want = eval_ppl(tmp_path, *args, "--kernel", "torch")
    got = eval_ppl(tmp_path, *args, "--kernel", kernel)
    assert math.isclose(got["nll"], want["nll"], rel_tol=rel), (got["nll"], want["nll"])
