"""Instruction data for `qalora finetune`: load records, render each as prompt and response
text, tokenize with a loss mask (labels only on response tokens), pack and collate.

A record becomes segments of text, each a prompt or a response. Segments are tokenized
separately and concatenated, so the mask is exact and the prompt's tokens are the ones the
model sees at generation time (it is given the prompt alone and continues it).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.schema import DataSection
from ..errors import UserError, first_line, root_cause
from .file_types import DATA_SUFFIXES
from .record_task import record_task

IGNORE = -100
# A file in a data folder whose name starts with one of these is that split; others are train.
_SPLIT_NAME = re.compile(r"^(train|validation|valid|val|dev|test|eval)(?=$|[-_.])", re.IGNORECASE)

# Columns each format needs, in detection order (alpaca's `input` is optional).
FORMAT_COLUMNS = {
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "inputs_targets": ("inputs", "targets"),
    "chat": ("messages",),
}

# The Stanford Alpaca prompts.
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens, the token id on response tokens


# ---- loading -------------------------------------------------------------------------------

def _with_cause(e: BaseException) -> str:
    """The error's first line, and its root cause's (datasets wraps the telling one)."""
    return ": ".join(first_line(x) for x in dict.fromkeys((e, root_cause(e))))


def _looks_like_path(source: str) -> bool:
    return (source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1
            or Path(source).suffix in DATA_SUFFIXES)


def _local_data_files(path: Path) -> tuple[str, dict[str, list[str]]]:
    """-> (the `datasets` builder, {split: files}) for a data file or a folder of them."""
    kinds = ", ".join(DATA_SUFFIXES)
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise UserError(f"data file '{path}' is not one of {kinds}; convert it or give a hub dataset id")
        return DATA_SUFFIXES[path.suffix], {"train": [str(path)]}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise UserError(f"data folder '{path}' holds no {kinds} files; add some or give a data file")
    builders = {DATA_SUFFIXES[p.suffix] for p in files}
    if len(builders) > 1:
        raise UserError(f"data folder '{path}' mixes {' and '.join(sorted(builders))} files; keep one type")
    splits: dict[str, list[str]] = {}
    for p in files:
        m = _SPLIT_NAME.match(p.stem)
        splits.setdefault(m.group(1).lower() if m else "train", []).append(str(p))
    return builders.pop(), splits


def _no_rows(files: list[str], builder: str) -> bool:
    """Whether the files hold no records: datasets fails on empty files rather than giving 0 rows."""
    try:
        if builder == "parquet":
            import pyarrow.parquet as pq

            return all(pq.read_metadata(f).num_rows == 0 for f in files)
        texts = [[ln for ln in Path(f).read_text(errors="replace").splitlines() if ln.strip()] for f in files]
    except Exception:  # unreadable: the load's own error says more
        return False
    # A CSV header alone is no record; nor is an empty JSON list.
    return all(len(t) <= (builder == "csv") or "".join(t).strip() == "[]" for t in texts)


def _load_split(d: DataSection, split: str, key: str):
    """One split of the source as a `datasets.Dataset`; `key` names the setting that chose it."""
    import datasets

    path = Path(d.source).expanduser()
    if path.exists():
        builder, splits = _local_data_files(path)
        if split not in splits:
            raise UserError(f"{key} '{split}' is not in '{path}' (splits: {', '.join(sorted(splits))}); "
                            f"set data.{key} to one of them")
        if builder == "json":
            from .calibration import check_json_records

            check_json_records(splits[split])
        try:
            return datasets.load_dataset(builder, data_files=splits[split], split="train")
        except Exception as e:
            if _no_rows(splits[split], builder):  # only now: reading every file costs
                raise UserError(f"data source '{path}' [{split}] is empty; give a source with records") from e
            raise UserError(f"could not read {builder} data in '{path}': {_with_cause(e)}") from e
    if _looks_like_path(d.source):
        raise UserError(f"data source '{d.source}' does not exist; give an existing file or folder "
                        f"({', '.join(DATA_SUFFIXES)}), a hub dataset id, or 'builtin'")
    try:
        return datasets.load_dataset(d.source, d.hub_config, split=split)
    except Exception as e:
        error = e
    # The load failed: say whether the split or the dataset is the problem.
    try:
        names = datasets.get_dataset_split_names(d.source, d.hub_config)
    except Exception:
        raise UserError(f"data source '{d.source}' is neither a local file or folder nor a loadable hub "
                        f"dataset ({_with_cause(error)}); check the path or the dataset id") from error
    if split not in names:
        raise UserError(f"{key} '{split}' is not in hub dataset '{d.source}' (splits: {', '.join(names)}); "
                        f"set data.{key} to one of them")
    raise UserError(f"could not load hub dataset '{d.source}' [{split}]: {_with_cause(error)}") from error


def load_records(d: DataSection) -> tuple[list[dict], list[dict], str]:
    """-> (train records, held-out records, a one-line description of the source)."""
    if d.source == "builtin":
        train, evals = record_task(d.builtin_size, d.seed)
        train, evals = train[:d.max_examples], evals[:d.eval_max_examples]
        return train, evals, (f"builtin: record extraction (sentence -> JSON), {len(train)} train, "
                              f"{len(evals)} held out (unseen names and cities), seed {d.seed}")
    ds = _load_split(d, d.split, "split")
    fmt = resolve_format(ds.column_names, d.format)  # fail on the columns before anything else
    n = len(ds)
    if n == 0:
        raise UserError(f"data source '{d.source}' [{d.split}] is empty; give a source with records")
    rng = random.Random(d.seed)
    order = rng.sample(range(n), n)
    if d.eval_split:
        eval_ds = _load_split(d, d.eval_split, "eval_split")
        if len(eval_ds) == 0:
            raise UserError(f"eval_split '{d.eval_split}' of '{d.source}' is empty; choose another split")
        resolve_format(eval_ds.column_names, fmt)
        eval_idx = rng.sample(range(len(eval_ds)), min(len(eval_ds), d.eval_max_examples))
        train_idx, held = order, f"[{d.eval_split}]"
    else:
        if n < 2:
            raise UserError(f"data source '{d.source}' has 1 record: none left to hold out for evaluation; "
                            "add records or set data.eval_split")
        k = min(max(1, round(d.eval_fraction * n)), d.eval_max_examples, n - 1)
        eval_ds, eval_idx, train_idx = ds, order[:k], order[k:]
        held = f"from [{d.split}] (seed {d.seed})"
    # Seeded orders: max_examples and the held-out cap take random subsets, not a file's head.
    train_idx = sorted(train_idx[:d.max_examples])
    try:  # rows are decoded here: a damaged file (e.g. invalid UTF-8 in a parquet column) fails now
        train, evals = ds.select(train_idx).to_list(), eval_ds.select(sorted(eval_idx)).to_list()
    except Exception as e:
        raise UserError(f"could not read the records of '{d.source}': {_with_cause(e)}") from e
    where = "local" if Path(d.source).expanduser().exists() else "hub"
    name = d.source + (f"/{d.hub_config}" if d.hub_config and where == "hub" else "")
    return train, evals, f"{where}: {name} [{d.split}]: {len(train)} train, {len(evals)} held out {held}"


# ---- formats and templates ----------------------------------------------------------------

def resolve_format(columns, fmt: str = "auto") -> str:
    """The record format from the column names (auto), or check an explicit one has its columns."""
    found = ", ".join(columns) or "none"
    if fmt != "auto":
        missing = [c for c in FORMAT_COLUMNS[fmt] if c not in columns]
        if missing:
            raise UserError(f"data format '{fmt}' needs columns {' + '.join(FORMAT_COLUMNS[fmt])}, but "
                            f"{', '.join(missing)} is missing (columns found: {found}); rename them or "
                            "set data.format")
        return fmt
    for name, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return name
    wanted = "; ".join(f"{' + '.join(c)} ({n})" for n, c in FORMAT_COLUMNS.items())
    raise UserError(f"cannot tell the data format from the columns found ({found}); needed one of: "
                    f"{wanted}; rename the columns or set data.format")


def resolve_template(fmt: str, template: str) -> str:
    if template == "auto":
        return {"alpaca": "alpaca", "chat": "chat"}.get(fmt, "raw")
    if fmt == "chat" and template != "chat":
        raise UserError(f"chat records (messages) need data.template 'chat' or 'auto', not '{template}'")
    return template


def _text(value) -> str:
    return "" if value is None else str(value)


def _parts(record: dict, fmt: str) -> tuple[str, str, str]:
    """(instruction, input, response) of a non-chat record."""
    if fmt == "alpaca":
        return _text(record["instruction"]), _text(record.get("input")), _text(record["output"])
    a, b = FORMAT_COLUMNS[fmt]
    return _text(record[a]), "", _text(record[b])


def _messages(record: dict, fmt: str) -> list[dict]:
    if fmt != "chat":
        instruction, inp, response = _parts(record, fmt)
        user = f"{instruction}\n\n{inp}" if inp else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    messages = record["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise UserError("a chat record's 'messages' is not a list of {role, content}; fix the data")
    return [{"role": m["role"], "content": _text(m["content"])} for m in messages]


def _apply(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("data.template 'chat' needs a tokenizer with a chat template, and this one has none; "
                        "use data.template 'alpaca' or 'raw'")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:
        raise UserError(f"the tokenizer's chat template failed on a record: {_with_cause(e)}; "
                        "check the messages' roles and order") from e


def _chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """Every assistant turn is a response: the text its message adds to the rendering."""
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _apply(tokenizer, messages[:i], add_generation_prompt=True)
        after = _apply(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise UserError(f"the tokenizer's chat template rewrites earlier text when turn {i + 1} is added, "
                            "so assistant turns cannot be masked; use single-turn records or template alpaca")
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    return segments


def _eos(tokenizer) -> str:
    if tokenizer.eos_token is None:
        raise UserError("the tokenizer has no EOS token to end responses with; use data.template 'chat'")
    return tokenizer.eos_token


def render_segments(record: dict, fmt: str, template: str, tokenizer) -> list[tuple[str, bool]]:
    """-> [(text, is_response)]: the record as the model reads it, responses marked for the loss."""
    fmt = fmt if fmt != "auto" else resolve_format(list(record), "auto")
    template = resolve_template(fmt, template)
    if template == "chat":
        return _chat_segments(_messages(record, fmt), tokenizer)
    prompt, response = prompt_and_reference(record, fmt, template, tokenizer)
    return [(prompt, False), (response + _eos(tokenizer), True)]


def prompt_and_reference(record: dict, fmt: str, template: str, tokenizer) -> tuple[str, str]:
    """-> (the prompt to generate from, the reference response): the last assistant turn for chat."""
    fmt = fmt if fmt != "auto" else resolve_format(list(record), "auto")
    template = resolve_template(fmt, template)
    if template == "chat":
        messages = _messages(record, fmt)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise UserError("a held-out chat record has no assistant message to compare with; fix the data")
        return _apply(tokenizer, messages[:last], add_generation_prompt=True), messages[last]["content"]
    instruction, inp, response = _parts(record, fmt)
    if template == "alpaca":
        prompt = (ALPACA_INPUT if inp else ALPACA_NO_INPUT).format(instruction=instruction, input=inp)
    else:  # raw: as is, the data carries its own separators
        prompt = f"{instruction}\n\n{inp}" if inp else instruction
    return prompt, response


# ---- tokenization ----------------------------------------------------------------------------

def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS in front of text by itself (the model was trained so).
    Some name a BOS they never add (SmolLM2's is <|im_start|>): those get none."""
    bos = tokenizer.bos_token_id
    probe = tokenizer("a", add_special_tokens=True)["input_ids"] if bos is not None else []
    return bool(probe) and probe[0] == bos


def bos_prefix(tokenizer, text: str, adds: bool | None = None) -> list[int]:
    """[bos] once, when the tokenizer adds one and the text does not start with it already
    (chat templates often write it)."""
    adds = adds_bos(tokenizer) if adds is None else adds
    return [tokenizer.bos_token_id] if adds and not text.startswith(tokenizer.bos_token) else []


def tokenize_records(records: list[dict], tokenizer, d: DataSection) -> tuple[list[Example], dict]:
    """-> (examples, counts {examples, truncated, skipped, tokens, response_tokens})."""
    if not records:
        raise UserError("no records to tokenize; give a data source with records")
    fmt = resolve_format(list(records[0]), d.format)
    rendered = [render_segments(r, fmt, d.template, tokenizer) for r in records]
    flat = [text for segments in rendered for text, _ in segments]
    # One batched call: fast tokenizers encode the whole list in parallel.
    encoded = iter(tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
    adds = adds_bos(tokenizer)
    examples, counts = [], dict(examples=0, truncated=0, skipped=0, tokens=0, response_tokens=0)
    for segments in rendered:
        ids = bos_prefix(tokenizer, segments[0][0], adds) if segments else []
        labels = [IGNORE] * len(ids)
        for _, is_response in segments:
            part = next(encoded)
            ids += part
            labels += part if is_response else [IGNORE] * len(part)
        cut = len(ids) > d.max_length
        if cut and d.overlong == "skip":
            counts["skipped"] += 1
            continue
        ids, labels = ids[:d.max_length], labels[:d.max_length]
        # The loss predicts token t from tokens < t: a label at position 0 is never trained.
        if all(x == IGNORE for x in labels[1:]):
            counts["skipped"] += 1
            continue
        counts["truncated"] += cut
        counts["tokens"] += len(ids)
        counts["response_tokens"] += sum(x != IGNORE for x in labels[1:])
        examples.append(Example(ids, labels))
    counts["examples"] = len(examples)
    if not examples:
        raise UserError(f"all {len(records)} examples were skipped: each is longer than data.max_length "
                        f"({d.max_length}) or its prompt leaves no room for a response; raise data.max_length"
                        + (" or set data.overlong: truncate" if d.overlong == "skip" else ""))
    return examples, counts


def pack_examples(examples: list[Example], max_length: int) -> list[Example]:
    """Greedy packing of whole examples, in order, into sequences of at most max_length tokens.

    Naive packing: attention is not blocked at example boundaries, so an example can attend
    to the ones before it in its sequence. Cheap and common; the labels stay per example."""
    packed, ids, labels = [], [], []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > max_length:
            packed.append(Example(ids, labels))
            ids, labels = [], []
        ids, labels = ids + ex.input_ids, labels + ex.labels
    if ids:
        packed.append(Example(ids, labels))
    return packed


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded int64 batch: input_ids, attention_mask, labels (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
