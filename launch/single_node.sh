#!/usr/bin/env bash
# One node, N GPUs (or CPU ranks):  bash launch/single_node.sh CONFIG [NUM_GPUS] [mmgpt train args...]
# Validates the config and DeepSpeed JSON first (one line and exit 2 on a problem, nothing started),
# then `deepspeed --num_gpus N`. Always --resume auto: rerunning the same command continues the run.
# Master port: MASTER_PORT if set (refused in one line when busy), else a free one.
set -euo pipefail
CONFIG="$(realpath "${1:?usage: bash launch/single_node.sh CONFIG [NUM_GPUS] [train args...]}")"
NUM_GPUS="${2:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
cd "$(dirname "$0")/.."
source launch/accelerator.sh
python -m mmgpt.train.launch_check --config "$CONFIG" --num-gpus "$NUM_GPUS"
PORT="$(python -m mmgpt.train.master_port)" || exit 2
echo "master port $PORT"
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "$PORT" --module mmgpt.train.cli \
  --config "$CONFIG" --resume auto "${@:3}"
