"""Instruction data: the embedded record task, loading and format detection from local files,
loss masks under each template, truncation, packing, collation, exact match, and every
input mistake a user can make (each a one-line UserError)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import make_tiny_llama, make_tokenizer

from qalora_cli.config.schema import DataSection
from qalora_cli.data import record_task as rt
from qalora_cli.data.instruct import (Example, collate, load_records, pack_examples, prompt_and_reference,
                                      resolve_format, tokenize_records)
from qalora_cli.errors import UserError
from qalora_cli.eval.exact_match import exact_match, generate_responses, stop_token_ids

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
ROWS = {
    "alpaca": [{"instruction": f"Say {i}.", "input": "" if i % 2 else f"n={i}", "output": f"{i}!"}
               for i in range(40)],
    "prompt_completion": [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(40)],
    "inputs_targets": [{"inputs": f"Translate {i}", "targets": f"T{i}"} for i in range(40)],
    "chat": [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]}
             for i in range(40)],
}


@pytest.fixture(autouse=True)
def _isolated_datasets(tmp_path, monkeypatch):
    """datasets' cache in tmp, and the hub offline: a hub id fails at once, not after retries."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    t = make_tokenizer()
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = CHATML
    return t


def write(rows: list[dict], path):
    import datasets

    empty = {"instruction": [], "output": []}
    ds = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict(empty)
    {".jsonl": ds.to_json, ".csv": ds.to_csv, ".parquet": ds.to_parquet}[path.suffix](str(path))
    return path


def labelled(ex: Example) -> list[int]:
    return [t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100]


# ---- the embedded task --------------------------------------------------------------------

def test_record_task_is_deterministic_with_disjoint_eval_pools():
    train, evals = rt.record_task(400, 0)
    assert (train, evals) == rt.record_task(400, 0)
    assert (train, evals) != rt.record_task(400, 1)
    assert (len(train), len(evals)) == (360, 40)
    assert len(rt.record_task(100, 0)[1]) == 20  # at least 20 held out
    pools = [set(rt.TRAIN_FIRST) | set(rt.TRAIN_LAST) | set(rt.TRAIN_CITIES),
             set(rt.EVAL_FIRST) | set(rt.EVAL_LAST) | set(rt.EVAL_CITIES)]
    assert not pools[0] & pools[1]
    train_text = " ".join(r["input"] for r in train)
    shapes = set()
    for split, (firsts, lasts, cities) in ((train, (rt.TRAIN_FIRST, rt.TRAIN_LAST, rt.TRAIN_CITIES)),
                                           (evals, (rt.EVAL_FIRST, rt.EVAL_LAST, rt.EVAL_CITIES))):
        for r in split:
            assert set(r) == {"instruction", "input", "output"}
            o = json.loads(r["output"])
            assert list(o) == ["name", "age", "city", "job"]
            first, last = o["name"].split(" ")
            assert first in firsts and last in lasts and o["city"] in cities and o["job"] in rt.JOBS
            # An independent rendering of the compact form with the fixed key order.
            assert r["output"] == (f'{{"name": "{o["name"]}", "age": {o["age"]}, "city": "{o["city"]}", '
                                   f'"job": "{o["job"]}"}}')
            assert isinstance(o["age"], int) and str(o["age"]) in r["input"] and o["city"] in r["input"]
            assert o["name"] in r["input"] and o["job"].lower() in r["input"].lower()
            if split is evals:  # nothing of an eval person or city is seen in training
                assert o["name"].split()[0] not in train_text and o["city"] not in train_text
            shapes.add(re.sub(r"\d+", "#", r["input"].replace(o["name"], "N").replace(first, "F")
                              .replace(o["city"], "C").lower().replace(o["job"], "J")))
    assert len(shapes) >= 8
    assert max(len(r["output"]) for r in train + evals) < 120


def test_builtin_source_caps():
    train, evals, desc = load_records(DataSection(builtin_size=400, max_examples=50, eval_max_examples=25))
    assert (len(train), len(evals)) == (50, 25) and desc.startswith("builtin")
    assert (train, evals) == (rt.record_task(400, 0)[0][:50], rt.record_task(400, 0)[1][:25])


# ---- loading and format detection ----------------------------------------------------------

@pytest.mark.parametrize("fmt,suffix", [("alpaca", ".jsonl"), ("prompt_completion", ".csv"),
                                        ("inputs_targets", ".parquet"), ("chat", ".jsonl"),
                                        ("chat", ".parquet"), ("alpaca", ".csv")])
def test_format_detection_from_local_files(tmp_path, fmt, suffix):
    path = write(ROWS[fmt], tmp_path / f"data{suffix}")
    train, evals, desc = load_records(DataSection(source=str(path), eval_fraction=0.1))
    assert resolve_format(list(train[0])) == fmt
    assert (len(train), len(evals)) == (36, 4) and str(path) in desc
    # CSV reads an empty cell as None; the records keep that, rendering treats it as "".
    key = lambda r: json.dumps({k: "" if v is None else v for k, v in r.items()}, sort_keys=True)  # noqa: E731
    assert sorted(map(key, train + evals)) == sorted(map(key, ROWS[fmt]))  # a partition of the rows
    assert (train, evals) == load_records(DataSection(source=str(path), eval_fraction=0.1))[:2]


def test_held_out_caps_and_max_examples(tmp_path):
    path = write(ROWS["alpaca"], tmp_path / "a.jsonl")
    train, evals, _ = load_records(DataSection(source=str(path), eval_fraction=0.5, eval_max_examples=3,
                                               max_examples=10))
    assert (len(evals), len(train)) == (3, 10)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in evals}
    other, _, _ = load_records(DataSection(source=str(path), eval_fraction=0.5, eval_max_examples=3,
                                           max_examples=10, seed=1))
    assert other != train


def test_folder_splits_and_eval_split(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write(ROWS["alpaca"][:30], folder / "train.jsonl")
    write(ROWS["alpaca"][30:], folder / "test.jsonl")
    (folder / "README.md").write_text("not data")
    train, evals, _ = load_records(DataSection(source=str(folder), eval_split="test"))
    assert len(train) == 30
    assert sorted(r["output"] for r in evals) == sorted(r["output"] for r in ROWS["alpaca"][30:])
    with pytest.raises(UserError, match=r"eval_split 'validation' is not in .*splits: test, train"):
        load_records(DataSection(source=str(folder), eval_split="validation"))


# ---- bad input -------------------------------------------------------------------------------

def test_columns_missing_name_needed_and_found(tmp_path):
    path = write(ROWS["alpaca"], tmp_path / "a.jsonl")
    with pytest.raises(UserError, match=r"needs columns prompt \+ completion.*found: instruction, input, output"):
        load_records(DataSection(source=str(path), format="prompt_completion"))
    odd = write([{"question": "q", "answer": "a"}] * 4, tmp_path / "q.csv")
    with pytest.raises(UserError, match=r"columns found \(question, answer\).*instruction \+ output \(alpaca\)"):
        load_records(DataSection(source=str(odd)))


@pytest.mark.parametrize("setup,message", [
    (lambda p: write([], p / "e.parquet"), r"is empty"),
    (lambda p: (p / "e.jsonl").write_text("\n") and p / "e.jsonl", r"is empty"),
    (lambda p: (p / "h.csv").write_text("instruction,output\n") and p / "h.csv", r"is empty"),
    (lambda p: (p / "bad.jsonl").write_text("{not json\n") and p / "bad.jsonl", r"could not read json data"),
    (lambda p: write(ROWS["alpaca"][:1], p / "one.jsonl"), r"none left to hold out"),
    (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", r"is not one of \.json"),
    (lambda p: (p / "empty-dir").mkdir() or p / "empty-dir", r"holds no \.json"),
    (lambda p: (p / "d").mkdir() or (write(ROWS["alpaca"], p / "d" / "a.jsonl"),
                                     write(ROWS["alpaca"], p / "d" / "b.csv")) and p / "d", r"mixes csv and json"),
    (lambda p: p / "missing" / "data.jsonl", r"'.*data\.jsonl' does not exist"),
    (lambda p: "no-such-owner-zz/no-such-dataset-zz", r"neither a local file or folder nor a loadable hub"),
])
def test_source_errors(tmp_path, setup, message):
    with pytest.raises(UserError, match=message) as err:
        load_records(DataSection(source=str(setup(tmp_path))))
    assert "\n" not in str(err.value)


def test_template_errors(tok, chat_tok):
    with pytest.raises(UserError, match="chat template"):
        tokenize_records([ALPACA], tok, DataSection(template="chat"))
    with pytest.raises(UserError, match="need data.template 'chat'"):
        tokenize_records(ROWS["chat"][:1], chat_tok, DataSection(template="alpaca"))
    with pytest.raises(UserError, match="not a list of"):
        tokenize_records([{"messages": "hello"}], chat_tok, DataSection())
    rewriting = make_tokenizer()
    rewriting.chat_template = "{{ messages | length }}" + CHATML  # earlier text changes with each turn
    with pytest.raises(UserError, match="rewrites earlier text"):
        tokenize_records(ROWS["chat"][:1], rewriting, DataSection())


# ---- loss masks --------------------------------------------------------------------------

def test_alpaca_mask_labels_exactly_the_response(tok):
    (ex,), counts = tokenize_records([ALPACA], tok, DataSection())
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further "
              "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
              "Add the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    n = len(tok(prompt, add_special_tokens=False).input_ids)
    assert ex.labels[:n] == [-100] * n and ex.labels[n:] == ex.input_ids[n:]
    assert tok.decode(ex.input_ids[:n]) == prompt and tok.decode(labelled(ex)) == "5<eos>"
    assert counts == {"examples": 1, "truncated": 0, "skipped": 0, "tokens": len(ex.input_ids),
                      "response_tokens": len(ex.input_ids) - n}
    no_input = {"instruction": "Say hi.", "output": "hi"}
    assert prompt_and_reference(no_input, "auto", "auto", tok)[0].startswith(
        "Below is an instruction that describes a task. Write")
    (raw,), _ = tokenize_records([{"prompt": "Q: 2+3=", "completion": " 5"}], tok, DataSection())
    assert tok.decode(raw.input_ids) == "Q: 2+3= 5<eos>" and tok.decode(labelled(raw)) == " 5<eos>"


def test_multi_turn_chat_labels_only_assistant_turns(chat_tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "Blue."}]
    (ex,), _ = tokenize_records([{"messages": messages}], chat_tok, DataSection())
    full = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n"
            "<|im_start|>assistant\nRed.<|im_end|>\n<|im_start|>user\nAnother?<|im_end|>\n"
            "<|im_start|>assistant\nBlue.<|im_end|>\n")
    assert chat_tok.decode(ex.input_ids) == full
    runs, run = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != -100:
            assert lab == t
            run.append(t)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    assert [chat_tok.decode(r) for r in runs] == ["Red.<|im_end|>\n", "Blue.<|im_end|>\n"]
    prompt, ref = prompt_and_reference({"messages": messages}, "chat", "auto", chat_tok)
    assert ref == "Blue." and prompt == full[:full.rindex("Blue.")]
    # An alpaca record through the chat template: one user turn "instruction\n\ninput".
    assert prompt_and_reference(ALPACA, "alpaca", "chat", chat_tok) == (
        "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n", "5")


def test_bos_once(chat_tok):
    from tokenizers import processors

    t = make_tokenizer()
    t.add_special_tokens({"bos_token": "<s>"})
    # A tokenizer that puts BOS in front by itself, as Llama's does.
    t._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                special_tokens=[("<s>", t.bos_token_id)])
    (ex,), _ = tokenize_records([ALPACA], t, DataSection())
    assert ex.input_ids[0] == t.bos_token_id and ex.input_ids.count(t.bos_token_id) == 1 and ex.labels[0] == -100
    t.chat_template = "{{ bos_token }}" + CHATML  # the template writes BOS itself: not added again
    (ex,), _ = tokenize_records([ALPACA], t, DataSection(template="chat"))
    assert ex.input_ids.count(t.bos_token_id) == 1 and t.decode(ex.input_ids).startswith("<s><|im_start|>")
    (ex,), _ = tokenize_records([ALPACA], chat_tok, DataSection(template="chat"))  # no BOS at all
    assert chat_tok.decode(ex.input_ids).startswith("<|im_start|>user")


def test_truncate_and_skip(tok):
    short = {"prompt": "Hi ", "completion": "there"}
    long_response = {"prompt": "Hi ", "completion": "word " * 80}
    long_prompt = {"prompt": "word " * 80, "completion": "x"}
    records = [short, long_response, long_prompt]
    ex, counts = tokenize_records(records, tok, DataSection(max_length=24))
    assert counts["examples"] == 2 and counts["truncated"] == 1 and counts["skipped"] == 1
    assert len(ex[1].input_ids) == 24 and tok.decode(labelled(ex[1])).startswith("word word")
    assert counts["tokens"] == len(ex[0].input_ids) + 24
    ex, counts = tokenize_records(records, tok, DataSection(max_length=24, overlong="skip"))
    assert (counts["examples"], counts["truncated"], counts["skipped"]) == (1, 0, 2)
    assert tok.decode(ex[0].input_ids) == "Hi there<eos>"
    with pytest.raises(UserError, match="all 2 examples were skipped"):
        tokenize_records([long_response, long_prompt], tok, DataSection(max_length=24, overlong="skip"))


def test_packing_keeps_every_labelled_token(tok):
    examples, _ = tokenize_records(ROWS["alpaca"], tok, DataSection(template="raw"))
    packed = pack_examples(examples, 64)
    assert len(packed) < len(examples) and all(len(p.input_ids) <= 64 for p in packed)
    assert [t for p in packed for t in p.input_ids] == [t for e in examples for t in e.input_ids]
    assert [x for p in packed for x in p.labels] == [x for e in examples for x in e.labels]


def test_collate_right_pads():
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([1, 2, 3, 4, 9], [-100, -100, 3, 4, 9])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 3, 4, 9]]
    assert all(v.dtype == torch.int64 for v in batch.values())


# ---- exact match -------------------------------------------------------------------------

def test_exact_match():
    assert exact_match(["a ", "b", "c"], ["a", "x", "\nc"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])


def test_generate_matches_unbatched_greedy(chat_tok):
    torch.manual_seed(0)
    model = make_tiny_llama(len(chat_tok))
    model.generation_config.eos_token_id = 7  # the model's own stop token counts too
    im_end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(model, chat_tok) == sorted({chat_tok.eos_token_id, 7, im_end})
    prompts = ["Hello there", "A much longer prompt about the weather today", "x", "Name a color."]
    got = generate_responses(model, chat_tok, prompts, max_new_tokens=6, batch_size=3)
    for prompt, answer in zip(prompts, got):  # reference: one prompt, no padding, no cache
        ids = chat_tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        start = ids.shape[1]
        for _ in range(6):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if nxt.item() in stop_token_ids(model, chat_tok):
                break
        assert answer == chat_tok.decode(ids[0, start:], skip_special_tokens=True).strip()
