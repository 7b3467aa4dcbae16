#!/usr/bin/env bash
# The main job on the embedded default: quantize SmolLM2-135M-Instruct with GPTQ INT4
# (group 32) on this machine, then compare held-out perplexity with the unquantized model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >&2
.venv/bin/qalora quantize --config smollm2-135m-int4 --output out/smollm2-135m-int4 --overwrite
.venv/bin/python scripts/compare_perplexity.py --config smollm2-135m-int4 out/smollm2-135m-int4
