#!/usr/bin/env bash
# Install mmgpt with its test extras (idempotent) and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet -e ".[dev]"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
python3 -m pytest -q tests "$@"
