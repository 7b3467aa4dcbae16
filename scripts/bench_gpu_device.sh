#!/usr/bin/env bash
# Every GPU measurement of docs/BENCHMARKS.md ("Kernels on CUDA") in one command, for a lent
# GPU with little time on it: each part of bench_gpu.py runs under its own time limit, the most
# wanted first, so a slow or failing part costs its own rows only; then, given TESTS_S seconds,
# the Triton tests on CUDA (bfloat16 is checked there alone).
#
#   scripts/bench_gpu_device.sh OUTDIR        # OUTDIR gets the JSON + markdown of each part and log.txt
#
# Wheels the machine lacks (bitsandbytes for the QLoRA baseline; pydantic for qalora itself)
# are installed from .whl/ when it is there. Filled once, on a machine with PyPI, for its
# Python (3.12 on the lent H200s):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     bitsandbytes pydantic pydantic_core annotated-types typing-inspection typing_extensions
# Training runs on 8 layers of the random Llama-2-7B, so that the
# 13.5 GB bf16 copy QLoRA loads from shrinks to 3.5 GB (tokens/s and memory are then per 8 layers).
set -u
out=${1:?usage: scripts/bench_gpu_device.sh OUTDIR}
mkdir -p "$out"
log="$out/log.txt"
tmp=${TMPDIR:-/tmp}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$tmp/qalora-site" .whl/*.whl >>"$log" 2>&1 || { echo "wheel install failed" >>"$log"; exit 2; }
  export PYTHONPATH="$tmp/qalora-site:$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv >>"$log" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >>"$log" 2>&1

part() {   # part NAME SECONDS ARGS...: one bench_gpu.py run, its tables to OUTDIR/NAME.md
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit $limit s)" >>"$log"
  timeout -k 5 "$limit" python3 scripts/bench_gpu.py --work "$tmp/qalora-bench" --output "$out/$name.json" "$@" \
    >/dev/null 2>>"$log"
  echo "=== $name: exit $? after $((SECONDS - t0)) s" >>"$log"
}

# The most wanted first (limits sized for about 290 s of a lent machine's time): decoding at
# batch 1 and 8 through generate and as CUDA graphs, on 16 layers (the checkpoint is made on
# the device's CPU, about 1 s per layer); QA-LoRA against QLoRA; then the kernels, then the
# Triton tests on CUDA with whatever time is left.
part decode 130 --parts decode --layers 16 --new-tokens 48 --reps 2 \
  --decode-variants dense,int4-gptq,dense-graph,int4-gptq-graph,int4-merged-graph
part train 85 --parts train --layers 8 --train-variants qalora,qlora-nf4
part kernels 55 --parts kernels --kernel-configs int4
if [ "${TESTS_S:-0}" -gt 0 ]; then   # TESTS_S=SECONDS: the compiles of every test shape take minutes
  echo "=== triton tests on CUDA" >>"$log"
  timeout -k 5 "$TESTS_S" python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_kernels.py >>"$log" 2>&1
  echo "=== tests: exit $?" >>"$log"
fi
# At most 8 files come back from a lent machine: the tables go into one.
cat "$out"/*.md >"$out/tables.md.tmp" 2>/dev/null && rm -f "$out"/*.md && mv "$out/tables.md.tmp" "$out/tables.md"
