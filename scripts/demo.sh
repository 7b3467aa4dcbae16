#!/usr/bin/env bash
# The main job on the embedded default, on this machine: quantize SmolLM2-135M-Instruct with
# GPTQ INT4 (group 32), compare held-out perplexity with the unquantized model, then fine-tune
# QA-LoRA adapters on the frozen INT4 model with the embedded record-extraction task and show
# the held-out loss and exact-match accuracy before and after; then merge the adapter into the
# INT4 model exactly (float zero points), reload it and print the verdict of the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >&2
.venv/bin/qalora quantize --config smollm2-135m-int4 --output out/smollm2-135m-int4 --overwrite
.venv/bin/python scripts/compare_perplexity.py --config smollm2-135m-int4 out/smollm2-135m-int4
.venv/bin/qalora finetune --config smollm2-135m-int4 --model out/smollm2-135m-int4 \
    --output out/smollm2-135m-int4-qalora --overwrite
.venv/bin/qalora merge --config smollm2-135m-int4 --model out/smollm2-135m-int4 \
    --adapter out/smollm2-135m-int4-qalora --output out/smollm2-135m-int4-merged --overwrite
