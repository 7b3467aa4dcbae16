"""The GGUF export (Q4_1, for llama.cpp and ollama) in three parts: gguf_writer.py writes the
file (and says when a model fits Q4_1 exactly), gguf_tokenizer.py converts the tokenizer,
gguf_verify.py reads the file back and checks it. The names callers use are here."""

from .gguf_tokenizer import add_tokenizer_kv, bpe_pre
from .gguf_verify import verify_gguf_weights
from .gguf_writer import BLOCK, BLOCK_BYTES, Q4_1, check_gguf_compatible, pack_q4_1, permute_rows, write_gguf

__all__ = ["BLOCK", "BLOCK_BYTES", "Q4_1", "add_tokenizer_kv", "bpe_pre", "check_gguf_compatible", "pack_q4_1",
           "permute_rows", "verify_gguf_weights", "write_gguf"]
