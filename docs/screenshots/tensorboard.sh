#!/usr/bin/env bash
# Writes docs/tensorboard.png: TensorBoard's Scalars page of a demo run (train/loss, eval/loss, the
# per-side losses, the held-out colour-question accuracy and its shuffled-image control, grad
# norm, lr), taken by headless chromium (tests/browser/tensorboard_shot.js, playwright-core driving
# /usr/bin/chromium; `bash tests/browser/install.sh` installs both).
#
#   bash docs/screenshots/tensorboard.sh [RUN_DIR] [PNG]    (RUN_DIR default runs/demo, PNG default docs/tensorboard.png)
#   bash docs/screenshots/tensorboard.sh --dry-run [RUN_DIR] [PNG]   (print the steps, run nothing)
#
# A RUN_DIR without TensorBoard events is trained first with `bash launch/demo.sh RUN_DIR` (about
# 1.5 min on 2 cores; the very first DeepSpeed start also compiles a CPU op for a few minutes).
# TensorBoard is started on a free 127.0.0.1 port for the screenshot and stopped afterwards.
set -euo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
PNG="$(realpath -m "${2:-$REPO/docs/tensorboard.png}")"
if [ -n "${1:-}" ]; then RUN="$(realpath -m "$1")"; else RUN=runs/demo; fi
cd "$REPO"  # the default run as README's `tensorboard --logdir runs/demo/tensorboard` (its sidebar shows the logdir)
TAGS='^(train/loss|train/loss_language|train/loss_vl|eval/loss|eval/accuracy/shapes/what_color_is_the_shape|eval/accuracy_shuffled/shapes/what_color_is_the_shape|train/lr|train/grad_norm)$'
CHARTS=8
DRIVER="$REPO/tests/browser/tensorboard_shot.js"

run() { echo "+ $*"; if [ "$DRY" = 0 ]; then "$@"; fi; }

if ! compgen -G "$RUN/tensorboard/events.out.tfevents.*" > /dev/null; then
  run bash "$REPO/launch/demo.sh" "$RUN"
fi
if [ "$DRY" = 0 ]; then
  [ -d "$REPO/tests/browser/node_modules/playwright-core" ] || { echo "playwright-core missing: bash tests/browser/install.sh" >&2; exit 1; }
  command -v tensorboard > /dev/null || { echo "tensorboard is not installed (pip install tensorboard)" >&2; exit 1; }
fi
PORT="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
URL="http://127.0.0.1:$PORT"
echo "+ tensorboard --logdir $RUN/tensorboard --host 127.0.0.1 --port $PORT &"
if [ "$DRY" = 1 ]; then
  echo "+ node $DRIVER $URL $PNG '$TAGS' $CHARTS"
  exit 0
fi
LOG="$(mktemp)"
tensorboard --logdir "$RUN/tensorboard" --host 127.0.0.1 --port "$PORT" > "$LOG" 2>&1 &
TB=$!
trap 'kill "$TB" 2> /dev/null || true; wait "$TB" 2> /dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 120); do  # until it answers (and has read the events: the scalar tags are listed)
  if python - "$URL" <<'PY' 2> /dev/null; then break; fi
import json, sys, urllib.request
tags = json.load(urllib.request.urlopen(sys.argv[1] + "/data/plugin/scalars/tags", timeout=2))
sys.exit(0 if any("train/loss" in run for run in tags.values()) else 1)
PY
  kill -0 "$TB" 2> /dev/null || { cat "$LOG" >&2; echo "tensorboard exited" >&2; exit 1; }
  sleep 1
done
mkdir -p "$(dirname "$PNG")"
echo "+ node $DRIVER $URL $PNG '$TAGS' $CHARTS"
node "$DRIVER" "$URL" "$PNG" "$TAGS" "$CHARTS"
echo "wrote $PNG"
