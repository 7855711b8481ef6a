#!/usr/bin/env bash
# Installs lmms-eval for tests/test_lmms_eval.py (idempotent): a venv at $1 (default
# ~/.cache/mmgpt/lmms-venv) that sees the system's packages (torch, transformers, mmgpt: made with
# --system-site-packages) and holds lmms-eval 0.7.3 with what it adds or changes beside mmgpt's pins
# (~60 packages, ~0.9 GB; inside the venv protobuf goes 7 -> 6 and filelock is held below 4, whose
# 4.x lacks the filelock._api lmms-eval 0.7.3 patches). The system python is left as it was.
# The test finds the venv's python through MMGPT_LMMS_PYTHON.
set -euo pipefail
venv="${1:-$HOME/.cache/mmgpt/lmms-venv}"
repo="$(cd "$(dirname "$0")/../.." && pwd)"  # the checks import mmgpt from here (CI installs it later)
ready='import lmms_eval, filelock._api; from mmgpt.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer; load_tokenizer(TINY_TOKENIZER_DIR)'
if [ -x "$venv/bin/python" ] && PYTHONPATH="$repo" "$venv/bin/python" -c "$ready" 2>/dev/null; then
  exit 0
fi
python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install --quiet "lmms-eval==0.7.3" "filelock<4"
# wandb (an lmms-eval logger mmgpt does not use) pins protobuf < 7, so pip puts protobuf 6 in the venv,
# where it shadows the system's 7.x: transformers' sentencepiece_model_pb2 (gencode 7) then refuses to
# load, and a sentencepiece-only tokenizer such as the bundled tiny one cannot be read. The venv keeps
# the system's protobuf.
"$venv/bin/python" -m pip uninstall --quiet --yes protobuf
PYTHONPATH="$repo" "$venv/bin/python" -c "$ready; print('lmms-eval ready in $venv')"
