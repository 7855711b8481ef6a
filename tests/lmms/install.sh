#!/usr/bin/env bash
# Installs lmms-eval for tests/test_lmms_eval.py (idempotent): a venv at $1 (default
# ~/.cache/mmgpt/lmms-venv) that sees the system's packages (torch, transformers, mmgpt: made with
# --system-site-packages) and holds lmms-eval 0.7.3 with what it adds or changes beside mmgpt's pins
# (~60 packages, ~0.9 GB; inside the venv protobuf goes 7 -> 6 and filelock is held below 4, whose
# 4.x lacks the filelock._api lmms-eval 0.7.3 patches). The system python is left as it was.
# The test finds the venv's python through MMGPT_LMMS_PYTHON.
set -euo pipefail
venv="${1:-$HOME/.cache/mmgpt/lmms-venv}"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import lmms_eval, filelock._api" 2>/dev/null; then
  exit 0
fi
python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install --quiet "lmms-eval==0.7.3" "filelock<4"
"$venv/bin/python" -c "import lmms_eval, filelock._api; print('lmms-eval ready in $venv')"
