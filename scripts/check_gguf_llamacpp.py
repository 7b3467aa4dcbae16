"""Run a merged GGUF export in llama.cpp itself (through llama-cpp-python, installed in a
separate environment: `pip install llama-cpp-python` compiles llama.cpp) and compare with
transformers' GGUF loader on the same file: the token ids of a few prompts, the logits of
every prompt position, and a greedy continuation.

llama.cpp multiplies Q4_1 weights by activations it first rounds to 8 bits (Q8_1), so its
logits differ from a float32 computation by more than the file's own rounding; the check
reports how much and whether the greedy tokens agree.

    .venv/bin/python scripts/check_gguf_llamacpp.py out/smollm2-135m-int4-gguf-merged-gguf \
        --llama-python /path/to/venv-with-llama-cpp/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PROMPTS = [
    "The Python language reference describes the syntax and the core semantics of the language.",
    "Extract the record as JSON. Sentence: Maria Keller, 34, works as a baker in Lyon.",
]

WORKER = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
path, prompts, n_new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=512, logits_all=True, verbose=False, n_threads=2)
out = []
for p in prompts:
    ids = llm.tokenize(p.encode(), add_bos=True, special=False)
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    greedy = []
    for _ in range(n_new):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(nxt)
        llm.eval([nxt])
    out.append({"ids": ids, "logits": logits.tolist(), "greedy": greedy})
print(json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="a `qalora merge --format gguf` output, or any .gguf file (a control)")
    p.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python installed")
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    gguf_file = args.folder if args.folder.is_file() else args.folder / "model.gguf"
    run = subprocess.run([args.llama_python, "-c", WORKER, str(gguf_file), json.dumps(PROMPTS), str(args.new_tokens)],
                         check=True, capture_output=True, text=True)
    theirs = json.loads(run.stdout)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    print(f"llama.cpp (llama-cpp-python) vs transformers' GGUF loader on {gguf_file}")
    for prompt, t in zip(PROMPTS, theirs):
        ids = tok(prompt)["input_ids"]
        if tok.bos_token_id is not None and ids[:1] != [tok.bos_token_id] and t["ids"][:1] == [tok.bos_token_id]:
            ids = [tok.bos_token_id] + ids
        same_ids = ids == t["ids"]
        x = torch.tensor([t["ids"]])
        with torch.no_grad():
            ours = model(x).logits[0].float()
            gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens)[0, x.shape[1]:].tolist()
        lc = torch.tensor(t["logits"])
        rel = float((lc - ours).abs().max() / ours.abs().max())
        top1 = float((lc.argmax(-1) == ours.argmax(-1)).double().mean())
        agree = next((i for i, (a, b) in enumerate(zip(gen, t["greedy"])) if a != b), len(gen))
        print(f"- {len(ids)} tokens, token ids {'identical' if same_ids else 'DIFFER'}; logits: largest difference "
              f"{rel:.2e} of the largest logit, top-1 agreement {100 * top1:.1f}%; greedy: first {agree} of "
              f"{len(gen)} tokens identical")
        print(f"  llama.cpp: {tok.decode(t['greedy'])!r}")
        print(f"  transformers: {tok.decode(gen)!r}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
