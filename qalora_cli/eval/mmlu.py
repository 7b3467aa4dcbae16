"""MMLU accuracy as lm-evaluation-harness 0.4.x computes it for its `mmlu` task (not
`mmlu_generative`): each question is a prompt ending in "Answer:", the four continuations
" A", " B", " C", " D" are scored by log-likelihood, the highest is the prediction.

What is taken from lm-eval, so that the numbers are comparable:
- the prompt (`mmlu/default/_default_template_yaml`, the per-subject description, the
  `first_n` few-shot sampler, target delimiter " ", few-shot delimiter "\n\n");
- the tokenization (HFLM._encode_pair: trailing whitespace of the context moves to the
  continuation; context and context+continuation are encoded with the tokenizer's default
  special tokens; the continuation is what the whole has beyond the context's tokens);
- the model input (context + continuation minus its last token, left-truncated to the
  model's max length) and the log-likelihood (summed log-softmax of the continuation tokens);
- ties go to the first choice (numpy argmax), and the overall `mmlu` acc is the micro
  average over questions (lm-eval aggregates with weight_by_size: True).

Speed, without changing any number beyond float rounding:
- the four choices of a question usually share one model input (single-token letters, or
  letters whose tokens differ only in the last one), so each distinct input is run once and
  all the choices read their log-probabilities from it: one forward pass per question;
- inputs are batched longest first with right padding (causal attention never looks right,
  so padding needs no mask), over all subjects at once where no prefix is cached (as lm-eval
  batches its requests), and only the needed positions go through the LM head;
- with few-shot prompts the subject's questions share a long token prefix; it is run once
  and its KV cache is repeated over each batch, so only the question part is computed.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .mmlu_data import CATEGORIES, LETTERS, MMLUSet, Question, category_of

CONTINUATIONS = tuple(" " + letter for letter in LETTERS)   # target_delimiter " " + doc_to_choice
# A shared prefix shorter than this is not worth a cache (a 0-shot prompt shares only its
# one-line description); 5-shot prompts share hundreds of tokens.
MIN_CACHED_PREFIX = 64
# lm-eval's fallback when neither the config nor the tokenizer names a context length.
DEFAULT_MAX_LENGTH = 2048
_TOKENIZER_INFINITY = 1000000000000000019884624838656


# -- prompts --

def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"


def format_question(q: Question) -> str:
    """lm-eval's doc_to_text: the question stripped, the choices verbatim, then "Answer:"."""
    c = q.choices
    return f"{q.question.strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def format_exemplar(q: Question) -> str:
    return f"{format_question(q)} {LETTERS[q.answer]}\n\n"


def build_prompt(q: Question, exemplars: Sequence[Question] = ()) -> str:
    """description + exemplars (each with its answer) + the question, ending in "Answer:"."""
    return description(q.subject) + "".join(format_exemplar(e) for e in exemplars) + format_question(q)


# -- tokenization, as lm-eval's HFLM does it --

def max_length_of(model, tokenizer) -> int:
    """lm-eval's resolve_max_length: text_config or config n_positions / max_position_embeddings
    / n_ctx, else the tokenizer's model_max_length, else 2048."""
    cfg = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    mml = getattr(tokenizer, "model_max_length", None)
    return int(mml) if mml is not None and mml != _TOKENIZER_INFINITY else DEFAULT_MAX_LENGTH


def encode_pairs(tokenizer, contexts: list[str], continuations: Sequence[str] = CONTINUATIONS
                 ) -> list[list[tuple[list[int], list[int]]]]:
    """Per context, per continuation: (context tokens, continuation tokens), as
    HFLM._encode_pair makes them. One batched tokenizer call for all of them."""
    ctxs, wholes = [], []
    for context in contexts:
        for cont in continuations:
            n_spaces = len(context) - len(context.rstrip())
            ctx, cont = (context[:-n_spaces], context[-n_spaces:] + cont) if n_spaces else (context, cont)
            ctxs.append(ctx)
            wholes.append(ctx + cont)
    # Tokenizer defaults for special tokens, as tokenizer.encode(string) in lm-eval.
    unique_ctx = list(dict.fromkeys(ctxs))
    ctx_ids = dict(zip(unique_ctx, tokenizer(unique_ctx)["input_ids"])) if unique_ctx else {}
    whole_ids = tokenizer(wholes)["input_ids"] if wholes else []
    k = len(continuations)
    out = []
    for i in range(len(contexts)):
        pairs = []
        for j in range(k):
            c = ctx_ids[ctxs[i * k + j]]
            pairs.append((list(c), list(whole_ids[i * k + j][len(c):])))
        out.append(pairs)
    return out


@dataclass
class _Row:
    """One distinct model input and what is read from it: for each (question, choice), the
    log-probabilities of the continuation tokens at the input's last len(cont) positions."""
    tokens: list[int]
    reads: list[tuple[int, int, list[int]]] = field(default_factory=list)   # (question, choice, cont)

    def positions(self) -> list[int]:
        n = len(self.tokens)
        return sorted({p for _, _, cont in self.reads for p in range(n - len(cont), n)})


def build_rows(pairs: list[list[tuple[list[int], list[int]]]], max_length: int,
               ids: Sequence[int] | None = None) -> list[_Row]:
    """The distinct model inputs of the questions `ids` (default 0, 1, ...), whose (context,
    continuation) token pairs are `pairs`."""
    rows: list[_Row] = []
    for qi, choice_pairs in zip(ids if ids is not None else range(len(pairs)), pairs):
        by_input: dict[tuple[int, ...], _Row] = {}
        for ci, (ctx, cont) in enumerate(choice_pairs):
            if not ctx or not cont:
                raise ValueError(f"question {qi}: empty context or continuation after tokenization")
            # lm-eval: (context + continuation)[-(max_length + 1):][:-1]
            inp = tuple((ctx + cont)[-(max_length + 1):][:-1])
            row = by_input.get(inp)
            if row is None:
                row = by_input[inp] = _Row(list(inp))
                rows.append(row)
            row.reads.append((qi, ci, cont))
    return rows


# -- the model --

def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class _Scorer:
    def __init__(self, model, pad_id: int, n_questions: int, n_choices: int, progress):
        self.model = model
        self.device = next(model.parameters()).device
        self.pad_id = pad_id
        self.slice_head = _accepts_logits_to_keep(model)
        self.ll = [[math.nan] * n_choices for _ in range(n_questions)]
        self.rows_left = [0] * n_questions
        self.done = 0
        self.progress = progress or (lambda done, total: None)

    def forward(self, rows: list[_Row], offset: int = 0, past=None) -> None:
        """Run rows[i].tokens[offset:] (after a cached prefix of `offset` tokens, if any) and
        record every read of every row."""
        width = max(len(r.tokens) for r in rows) - offset
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r.tokens) - offset] = torch.tensor(r.tokens[offset:], dtype=torch.long)
        wanted = [r.positions() for r in rows]
        keep = sorted({p - offset for ps in wanted for p in ps})
        kwargs = {"use_cache": past is not None}
        if past is not None:
            kwargs["past_key_values"] = past
        if self.slice_head:
            kwargs["logits_to_keep"] = torch.tensor(keep, device=self.device)
        logits = self.model(input_ids=ids.to(self.device), **kwargs).logits
        if not self.slice_head:
            logits = logits[:, keep]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        # Every (row, kept position, token) read, gathered in one indexing op and one transfer.
        where = {p: k for k, p in enumerate(keep)}
        at_row, at_pos, at_tok, reads = [], [], [], []
        for i, r in enumerate(rows):
            n = len(r.tokens)
            for qi, ci, cont in r.reads:
                at_row += [i] * len(cont)
                at_pos += [where[p - offset] for p in range(n - len(cont), n)]
                at_tok += cont
                reads.append((qi, ci, len(cont)))
        values = logprobs[torch.tensor(at_row), torch.tensor(at_pos), torch.tensor(at_tok)].tolist()
        start = 0
        for qi, ci, length in reads:
            self.ll[qi][ci] = sum(values[start:start + length])
            start += length
        for r in rows:
            for qi in {qi for qi, _, _ in r.reads}:
                self.rows_left[qi] -= 1
                self.done += self.rows_left[qi] == 0

    def prefix_cache(self, tokens: list[int]):
        """The KV cache of `tokens`, or None where the model's cache cannot be repeated over a
        batch (a legacy tuple cache from remote code): those rows then run without it."""
        kwargs = {"logits_to_keep": 1} if self.slice_head else {}
        out = self.model(input_ids=torch.tensor([tokens], device=self.device), use_cache=True, **kwargs)
        past = getattr(out, "past_key_values", None)
        return past if hasattr(past, "batch_repeat_interleave") else None


def shared_prefix(rows: list[_Row]) -> int:
    """Tokens all rows start with, leaving in each row every position it reads (and one token
    at least) to the part computed after the cache."""
    first = rows[0].tokens
    n = min(r.positions()[0] for r in rows)   # the first read position: at most len - 1
    for r in rows[1:]:
        t = r.tokens
        m = 0
        while m < n and t[m] == first[m]:
            m += 1
        n = m
    return max(n, 0)


def _batches(rows: list[_Row], size: int):
    """Longest first, as lm-eval: running out of memory shows at once, and lengths within a
    batch are close (little padding)."""
    ordered = sorted(rows, key=lambda r: (-len(r.tokens), r.tokens))
    for s in range(0, len(ordered), size):
        yield ordered[s:s + size]


@torch.no_grad()
def score_questions(model, tokenizer, prompts: list[str], groups: list[str] | None = None, batch_size: int = 16,
                    prefix_cache: bool | None = None, max_length: int | None = None,
                    continuations: Sequence[str] = CONTINUATIONS,
                    progress: Callable[[int, int], None] | None = None) -> list[list[float]]:
    """Log-likelihood of each continuation after each prompt, as lm-eval's HFLM.loglikelihood.

    groups: rows of one group (the subject) may share a cached prefix; prefix_cache None
    uses the cache where the shared prefix is at least MIN_CACHED_PREFIX tokens."""
    groups = groups or [""] * len(prompts)
    max_length = max_length or max_length_of(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sc = _Scorer(model, pad, len(prompts), len(continuations), progress)
    total = len(prompts)
    sc.progress(0, total)
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    was_training = model.training
    model.eval()
    try:
        # Rows that share no cacheable prefix with their group (0-shot) are pooled over all
        # groups and batched by length together, as lm-eval batches its requests: per subject,
        # each subject's last batch would be a partial one.
        pooled: list[_Row] = []
        for ids in by_group.values():
            rows = build_rows(encode_pairs(tokenizer, [prompts[i] for i in ids], continuations), max_length, ids)
            for r in rows:
                for qi in {qi for qi, _, _ in r.reads}:
                    sc.rows_left[qi] += 1
            n = shared_prefix(rows) if prefix_cache is not False and len(rows) > 1 else 0
            cache = sc.prefix_cache(rows[0].tokens[:n]) if n and (n >= MIN_CACHED_PREFIX or prefix_cache) else None
            if cache is None:
                pooled.extend(rows)
                continue
            for batch in _batches(rows, batch_size):
                past = copy.deepcopy(cache)   # the forward appends to it: the prefix stays clean
                past.batch_repeat_interleave(len(batch))
                sc.forward(batch, offset=n, past=past)
                sc.progress(sc.done, total)
        for batch in _batches(pooled, batch_size):
            sc.forward(batch)
            sc.progress(sc.done, total)
    finally:
        model.train(was_training)
    return sc.ll


# -- results --

@dataclass
class Prediction:
    subject: str
    index: int             # the question's position in its subject's split in the source
    answer: int
    pred: int
    loglikelihoods: list[float]

    @property
    def correct(self) -> bool:
        return self.pred == self.answer


def argmax_first(values: Sequence[float]) -> int:
    """numpy.argmax: the first of equal maxima."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _acc(preds: list[Prediction]) -> dict:
    n = len(preds)
    k = sum(p.correct for p in preds)
    return {"acc": k / n if n else math.nan, "correct": k, "n": n}


@dataclass
class MMLUResult:
    data: MMLUSet
    predictions: list[Prediction]
    seconds: float = 0.0
    model: str = ""

    def per_subject(self) -> dict[str, dict]:
        out: dict[str, list[Prediction]] = {}
        for p in self.predictions:
            out.setdefault(p.subject, []).append(p)
        return {s: {"category": category_of(s), **_acc(ps)} for s, ps in out.items()}

    def per_category(self) -> dict[str, dict]:
        """Per category: the micro average over its questions (lm-eval's group acc, weighted by
        size) and the macro average over its subjects."""
        subjects = self.per_subject()
        out = {}
        for cat in CATEGORIES:
            preds = [p for p in self.predictions if category_of(p.subject) == cat]
            if preds:
                accs = [v["acc"] for s, v in subjects.items() if v["category"] == cat]
                out[cat] = {**_acc(preds), "macro_acc": sum(accs) / len(accs), "subjects": len(accs)}
        return out

    def overall(self) -> dict:
        """micro_acc: correct / questions (lm-eval's `mmlu` acc); macro_acc: the mean of the
        per-subject accuracies."""
        subjects = self.per_subject()
        micro = _acc(self.predictions)
        return {"micro_acc": micro["acc"], "macro_acc": sum(v["acc"] for v in subjects.values()) / len(subjects),
                "correct": micro["correct"], "n": micro["n"], "subjects": len(subjects)}

    def to_dict(self) -> dict:
        d = self.data
        return {
            "task": "mmlu",
            "model": self.model,
            "source": d.source,
            "shots": d.shots,
            "exemplars_from": d.exemplar_split,
            "excluded_as_exemplars": d.excluded,
            "note": (f"the source has no dev split: the first {d.shots} test questions of each subject are the "
                     f"exemplars and are not scored ({d.excluded} questions)") if d.exemplar_split == "test" else None,
            "prompt": "lm-eval 0.4 mmlu (default): description, exemplars, question, 'Answer:'; "
                      "continuations ' A' ' B' ' C' ' D' by log-likelihood",
            "overall": self.overall(),
            "categories": self.per_category(),
            "subjects": self.per_subject(),
            "seconds": self.seconds,
            "questions_per_s": len(self.predictions) / self.seconds if self.seconds else None,
            "predictions": [{"subject": p.subject, "index": p.index, "answer": LETTERS[p.answer],
                             "pred": LETTERS[p.pred], "correct": p.correct,
                             "loglikelihoods": p.loglikelihoods} for p in self.predictions],
        }


def evaluate_mmlu(model, tokenizer, data: MMLUSet, batch_size: int = 16, prefix_cache: bool | None = None,
                  progress: Callable[[int, int], None] | None = None, model_name: str = "") -> MMLUResult:
    import time

    t0 = time.perf_counter()
    qs = data.questions
    prompts = [build_prompt(q, data.exemplars.get(q.subject, ())) for q in qs]
    lls = score_questions(model, tokenizer, prompts, [q.subject for q in qs], batch_size=batch_size,
                          prefix_cache=prefix_cache, progress=progress)
    preds = [Prediction(q.subject, q.index, q.answer, argmax_first(ll), ll) for q, ll in zip(qs, lls)]
    return MMLUResult(data, preds, time.perf_counter() - t0, model_name)
