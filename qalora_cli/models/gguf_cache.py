"""A local GGUF model, converted once to a Hugging Face folder (safetensors, config, tokenizer)
and loaded from there afterwards.

Why: transformers' GGUF loader re-parses the file's whole vocabulary field by field and rebuilds
its tensor-name map once per tensor. The embedded SmolLM2 (a 100 MB Q4_1 file) took 36.9 s to load
on 2 CPU cores, 3 s of it dequantizing, and 0.42 s from the converted folder (docs/BENCHMARKS.md).
Every qalora stage on a GGUF source paid that.

The key is the file's path, size and modification time, the dtype it is loaded in and the
transformers version (its GGUF conversion may change). A folder is written under a temporary name
(output_dir's, so a killed writer's leftovers are swept by the next one) and renamed when complete:
a failed write (a full disk, a read-only home) leaves nothing and the load goes on from the GGUF.

Each copy names its GGUF (source.json); a copy whose GGUF is gone or was changed is deleted when the
next copy is written, so the cache holds the GGUF files that still exist, not every one ever loaded.

Where: $QALORA_CACHE_DIR, else $XDG_CACHE_HOME/qalora, else ~/.cache/qalora (folder gguf/).
QALORA_GGUF_CACHE=0 turns it off."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..output_dir import sweep_stale_in, temp_sibling
from .source import ModelSource


def cache_root() -> Path:
    if os.environ.get("QALORA_CACHE_DIR"):
        return Path(os.environ["QALORA_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "qalora"


SOURCE_NAME = "source.json"


def converted_folder(src: ModelSource, dtype: str) -> Path | None:
    """-> where the converted copy of a local GGUF source lives (made or not), None when the
    source is not a local GGUF file or the cache is turned off."""
    if not (src.gguf_file and src.is_local) or os.environ.get("QALORA_GGUF_CACHE", "1") == "0":
        return None
    import transformers

    gguf = (Path(src.location) / src.gguf_file).resolve()
    stamp = _stamp(gguf)
    if stamp is None:
        return None  # the loader says what is wrong with the file
    key = f"{gguf}\0{stamp['size']}\0{stamp['mtime_ns']}\0{dtype}\0{transformers.__version__}"
    return cache_root() / "gguf" / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _stamp(gguf: Path) -> dict | None:
    """-> what a copy records of its GGUF: the file as it was converted."""
    try:
        st = gguf.stat()
    except OSError:
        return None
    return {"gguf": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_complete(folder: Path | None) -> bool:
    return folder is not None and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def store(model, tokenizer, folder: Path, gguf: Path) -> None:
    """Save the converted model and tokenizer of `gguf` to `folder`, whole or not at all. Best effort:
    a cache that cannot be written only means the next load converts again."""
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_in(folder.parent)
        remove_orphans(folder.parent)
        tmp = temp_sibling(folder)
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="100GB")
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_NAME).write_text(json.dumps(_stamp(gguf.resolve())) + "\n")
        os.replace(tmp, folder)  # another process that got there first wins: ours is removed below
    except Exception:  # noqa: BLE001 - any failure (safetensors' own errors included) only skips the cache
        pass
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_orphans(gguf_root: Path) -> None:
    """Delete the copies whose GGUF no longer exists as it was converted (deleted, replaced, or a
    test's temporary file), and any without a readable source.json (a copy is renamed into place
    only with it, so these are not this code's)."""
    for folder in gguf_root.iterdir():
        if folder.name.startswith(".") or not folder.is_dir():
            continue  # temporaries: sweep_stale_in's
        try:
            recorded = json.loads((folder / SOURCE_NAME).read_text())
            current = _stamp(Path(recorded["gguf"]))
        except (OSError, ValueError, KeyError, TypeError):
            current, recorded = None, True
        if current != recorded:
            shutil.rmtree(folder, ignore_errors=True)
