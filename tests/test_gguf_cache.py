"""The GGUF conversion cache keeps copies of the GGUF files that still exist as they were converted:
writing a copy deletes those whose file is gone or changed (qalora_cli/models/gguf_cache.py). The
load itself, on the real SmolLM2: test_gguf_cache_slow.py."""

import json
import os

import pytest

from helpers import make_tiny_llama, make_tokenizer
from qalora_cli.models import gguf_cache


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tok = make_tokenizer()
    return make_tiny_llama(len(tok)), tok


def test_a_copy_records_its_gguf_and_copies_of_gone_or_changed_files_are_removed(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    root = tmp_path / "cache" / "gguf"
    files = {name: tmp_path / f"{name}.gguf" for name in ("kept", "deleted", "rewritten", "touched")}
    for f in files.values():
        f.write_bytes(b"GGUF" + bytes(16))
    for name, f in files.items():
        gguf_cache.store(model, tok, root / name, f)
    recorded = json.loads((root / "kept" / gguf_cache.SOURCE_NAME).read_text())
    assert recorded == {"gguf": str(files["kept"].resolve()), "size": 20,
                        "mtime_ns": files["kept"].stat().st_mtime_ns}
    assert gguf_cache.is_complete(root / "kept")

    files["deleted"].unlink()
    files["rewritten"].write_bytes(b"GGUF" + bytes(32))  # another size
    st = files["touched"].stat()
    os.utime(files["touched"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, newer
    (root / "no-record").mkdir()  # not written by this code: a copy is renamed into place with its record

    newcomer = tmp_path / "new.gguf"
    newcomer.write_bytes(b"GGUF")
    gguf_cache.store(model, tok, root / "new", newcomer)
    assert sorted(p.name for p in root.iterdir()) == ["kept", "new"]
