"""Merged-model writers: the qalora float-zero format, GPTQ and GGUF."""
