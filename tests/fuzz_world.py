"""The good folders the fuzz tests (test_fuzz_readers.py and its slow run) plant bad files in:
built lazily, once per session (conftest's `world` fixture)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from fuzz_readers import call_cli
from helpers import tiny_config_dict
from qalora_cli.config.loader import validate
from qalora_cli.lora.adapter_io import checkpoint_sha256


def merge_args(base, adapter, out):
    return ["merge", "--config", "smollm2-135m-int4", "--model", base, "--adapter", adapter, "--output", out,
            "--no-verify", "merge.device=cpu"]


class World:
    """The good folders the bad files are planted in, each built when first used."""

    def __init__(self, bases, tiny_model_dir, root: Path):
        self.bases, self.fp, self.root = bases, tiny_model_dir, root
        self._gguf = self._ckpt = self._data = None

    def scratch(self, name: str) -> Path:
        return self.root / "cases" / name

    @property
    def gguf(self) -> Path:
        """A tiny GGUF (Q4_1) written by `qalora merge --format gguf`."""
        if self._gguf is None:
            out = self.root / "gguf"
            args = merge_args(self.bases["g32"], self.bases["adapter_g32"], out) + ["--format", "gguf"]
            assert call_cli(args) == "ok"
            self._gguf = out / "model.gguf"
        return self._gguf

    @property
    def ckpt(self):
        """A 2-step fine-tune with a checkpoint per step, and what `_restore` loads it into."""
        if self._ckpt is None:
            from qalora_cli.lora.inject import inject_qalora
            from qalora_cli.models.quantized_io import load_quantized
            from qalora_cli.recipes import finetune as ft
            from qalora_cli.train.optim import build_optimizer, build_scheduler

            run = self.root / "ft"
            cfg = validate(self.ft_dict(run), "t")
            ft.run(cfg, show_progress=False)
            model, _ = load_quantized(self.bases["act"], "cpu", torch.float32)
            torch.manual_seed(0)
            adapters = inject_qalora(model, cfg.lora)
            params = [p for m in adapters.values() for p in (m.lora_A, m.lora_B)]
            opt, _ = build_optimizer(params, cfg.train, torch.device("cpu"))
            sched = build_scheduler(opt, cfg.train)
            fp = ft._fingerprint(cfg, checkpoint_sha256(self.bases["act"]))
            self._ckpt = run, fp, adapters, opt, sched
        return self._ckpt

    def ft_dict(self, run: Path, **train) -> dict:
        d = tiny_config_dict(self.fp, self.bases["act"])
        d["lora"] = {"rank": 8, "alpha": 16, "dropout": 0.0}
        d["data"] = {"source": "builtin", "builtin_size": 40, "max_length": 128, "template": "raw",
                     "eval_max_examples": 4}
        d["train"] = dict({"adapter_dir": str(run), "device": "cpu", "micro_batch_size": 4, "batch_size": 4,
                           "max_steps": 2, "eval_every": 2, "save_every": 1, "exact_match_examples": 0,
                           "mixed_precision": "no"}, **train)
        return d

    @property
    def data(self) -> dict[str, bytes]:
        """Good instruction / text data files, one per suffix."""
        if self._data is None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            rows = [{"instruction": f"Say {w}.", "input": "", "output": w, "text": f"The word is {w}. " * 4}
                    for w in ("one", "two", "three", "four", "five", "six")]
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows), buf)
            csv = "instruction,input,output,text\n" + "".join(
                f"{r['instruction']},,{r['output']},{r['text']}\n" for r in rows)
            jsonl = "".join(json.dumps(r) + "\n" for r in rows)
            self._data = {".json": json.dumps(rows).encode(), ".jsonl": jsonl.encode(), ".csv": csv.encode(),
                          ".parquet": buf.getvalue()}
        return self._data
