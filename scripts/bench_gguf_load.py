"""How long the embedded SmolLM2 GGUF takes to load through transformers' GGUF reader and from
qalora's converted copy (qalora_cli/models/gguf_cache.py), in one process with a fresh cache folder.

    .venv/bin/python scripts/bench_gguf_load.py
"""

import os
import tempfile
import time


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["QALORA_CACHE_DIR"] = cache
        from qalora_cli.config.loader import load_config
        from qalora_cli.models.loading import load_model

        m = load_config("smollm2-135m-int4").model
        load_model(m)  # imports warmed and the library's first-call costs paid: not counted
        os.environ["QALORA_GGUF_CACHE"] = "0"
        t = time.perf_counter()
        load_model(m)
        gguf_s = time.perf_counter() - t
        os.environ["QALORA_GGUF_CACHE"] = "1"
        t = time.perf_counter()
        load_model(m)
        copy_s = time.perf_counter() - t
    print(f"GGUF reader: {gguf_s:.2f} s   converted copy: {copy_s:.2f} s   ({gguf_s / copy_s:.0f}x)")


if __name__ == "__main__":
    main()
