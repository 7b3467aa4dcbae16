#!/usr/bin/env bash
# Set up on first use, then run the tests. Arguments go to pytest:
#   scripts/test.sh            the default suite (fast: tiny models, a few minutes)
#   scripts/test.sh -m slow    the real SmolLM2-135M and peer runs
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >&2
export GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-2}"
exec .venv/bin/python -m pytest "$@"
