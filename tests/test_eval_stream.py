"""`qalora eval stream` through the CLI: dense, sinks and recompute against one dense forward,
the variants past the cache, and every bad input in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from helpers import text_ids
from qalora_cli.cli.app import app

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [*args, "--device", "cpu", "--dtype", "float32"])


def eval_stream(tmp_path, model_dir, *args):
    out, png = tmp_path / "stream.json", tmp_path / "stream.png"
    r = cli("eval", "stream", "--model", str(model_dir), "--output-json", str(out), "--plot", str(png), *args)
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text()), png


def test_eval_stream_variants_against_a_dense_forward(chat_model_dir, tmp_path):
    """Dense and sinks read one token at a time equal one dense forward before the cache fills;
    recompute with a context wider than the text scores exactly those positions."""
    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    model = AutoModelForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32).eval()
    ids = text_ids(tok, 120)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
    nll = -logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    r, png = eval_stream(tmp_path, chat_model_dir, "--max-tokens", "120", "--attention", "dense,sinks,recompute",
                         "--sinks", "4", "--window", "200", "--recompute-every", "7", "--chunk-tokens", "40")
    for key in ("ppl", "tokens", "tokens_per_s", "peak_cache_tokens"):
        assert key in r
    want = math.exp(float(nll.mean()))
    v = r["variants"]
    assert math.isclose(v["dense"]["ppl"], want, rel_tol=1e-4) and math.isclose(v["sinks"]["ppl"], want, rel_tol=1e-4)
    assert v["dense"]["tokens"] == 119 and len(v["dense"]["chunks"]) == 3
    at = list(range(7, 120, 7))
    assert v["recompute"]["tokens"] == len(at)
    assert math.isclose(v["recompute"]["ppl"], math.exp(float(nll[[t - 1 for t in at]].mean())), rel_tol=1e-4)
    assert math.isclose(v["sinks"]["ppl_on_recompute_positions"], v["recompute"]["ppl"], rel_tol=1e-4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_stream_past_the_cache(chat_model_dir, tmp_path):
    r, _ = eval_stream(tmp_path, chat_model_dir, "--max-tokens", "300", "--attention", "sinks,window,dense",
                       "--sinks", "4", "--window", "60")
    v = r["variants"]
    assert v["sinks"]["peak_cache_tokens"] == 64 and v["window"]["peak_cache_tokens"] == 64
    assert v["window"]["sinks"] == 0 and v["window"]["window"] == 64
    assert v["dense"]["peak_cache_tokens"] == 299 and v["sinks"]["evicted"] == 299 - 64  # the last token is scored, never read
    assert v["sinks"]["peak_cache_bytes"] < v["dense"]["peak_cache_bytes"]
    assert v["sinks"]["ppl"] != v["window"]["ppl"] != v["dense"]["ppl"]
    w, _ = eval_stream(tmp_path, chat_model_dir, "--max-tokens", "100", "--attention", "window", "--sinks", "0",
                       "--window", "30")
    assert w["peak_cache_tokens"] == 30


@pytest.mark.parametrize("args,words", [
    (["--attention", "sparse"], "--attention"),
    (["--attention", "sinks,sinks"], "twice"),
    (["--attention", "sinks", "--sinks", "0"], "window"),
    (["--window", "0"], "--window"),
    (["--max-tokens", "1"], "--max-tokens"),
    (["--recompute-every", "0"], "--recompute-every"),
    (["--output-json", "no/such/dir/x.json"], "does not exist"),
])
def test_eval_stream_bad_input_is_one_line_and_exit_2(chat_model_dir, args, words):
    r = cli("eval", "stream", "--model", str(chat_model_dir), *args)
    assert r.exit_code == 2, r.output
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1
