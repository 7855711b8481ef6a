#!/usr/bin/env bash
# Several nodes from a DeepSpeed hostfile (`HOST slots=N` lines, see launch/hostfile.example).
#
# pdsh mode (run once, on the first host; needs passwordless ssh + pdsh to every host):
#   bash launch/multi_node.sh CONFIG HOSTFILE [GPUS_PER_NODE] [train args...]
# no-ssh mode (run on EVERY node yourself, or from a scheduler; no ssh needed):
#   NODE_RANK=k MASTER_ADDR=first-host bash launch/multi_node.sh --no-ssh CONFIG HOSTFILE [GPUS_PER_NODE] [...]
#
# Environment for the remote ranks: in pdsh mode DeepSpeed exports NCCL_*, PYTHON* and the lines of
# ./.deepspeed_env (NAME=VALUE, no blank lines or comments). Set MMGPT_EXPORT="VAR1 VAR2 ..." to
# (re)write ./.deepspeed_env from the current values of those variables. Every node must see the
# repo, weights and data at the same paths, and the config's output_dir on one shared filesystem
# (checkpoints are written by every rank; resume checks that all ranks see the same `latest`).
# MASTER_PORT defaults to 29500 and is NOT chosen for you (every node must agree on it before any
# starts): give each multi-node job on shared hosts its own MASTER_PORT. A busy port fails in one
# line; ranks of another job that join by mistake are refused on every rank (run identity check).
set -euo pipefail
NO_SSH=0
if [ "${1:-}" = "--no-ssh" ]; then NO_SSH=1; shift; fi
USAGE="usage: bash launch/multi_node.sh [--no-ssh] CONFIG HOSTFILE [GPUS_PER_NODE] [train args...]"
CONFIG="$(realpath "${1:?$USAGE}")"
HOSTFILE="$(realpath "${2:?$USAGE}")"
GPUS="${3:-}"
cd "$(dirname "$0")/.."

if [ -n "${MMGPT_EXPORT:-}" ]; then
  : > .deepspeed_env
  for name in $MMGPT_EXPORT; do
    if [ -n "${!name+x}" ]; then printf '%s=%s\n' "$name" "${!name}" >> .deepspeed_env; fi
  done
fi
CHECK=(--config "$CONFIG" --hostfile "$HOSTFILE")
LAUNCH=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
if [ -n "$GPUS" ]; then CHECK+=(--num-gpus "$GPUS"); LAUNCH+=(--num_gpus "$GPUS"); fi
if [ -f .deepspeed_env ]; then CHECK+=(--deepspeed-env .deepspeed_env); fi
python -m mmgpt.train.launch_check "${CHECK[@]}"

if [ "$NO_SSH" = 1 ]; then
  : "${NODE_RANK:?--no-ssh needs NODE_RANK (0 on the first host of the hostfile)}"
  : "${MASTER_ADDR:?--no-ssh needs MASTER_ADDR (address of the first host)}"
  LAUNCH+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
else
  first_host="$(grep -v '^[[:space:]]*\(#\|$\)' "$HOSTFILE" | head -n1 | awk '{print $1}')"
  LAUNCH+=(--launcher pdsh --master_addr "${MASTER_ADDR:-$first_host}")
fi
exec deepspeed "${LAUNCH[@]}" --module mmgpt.train.cli --config "$CONFIG" --resume auto "${@:4}"
