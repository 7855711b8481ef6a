#!/usr/bin/env bash
# GPU throughput matrix on one CUDA card (issue 10); about 5 minutes on an H100/H200, capped at 6.
#   1. The 9B packed training step: ViT-L/14 + LLaMA-7B (OpenFlamingo-9B layout) with RANDOM
#      weights built on the device in bf16 (nothing is downloaded), LoRA trainable, 4096-token
#      rows, for attention backend {sdpa, fused} x activation checkpointing {full, off} x
#      liger {off, on}, all on one model build (`mmgpt bench packing --matrix`). Each entry records
#      the backends that ran and whether liger applied (or why not).
#   2. `mmgpt bench train --preset 9b --steps 10`: ZeRO-2 training steps.
# JSON and logs go to bench/results/<card>.*, <card> being nvidia-smi's name for GPU 0.
#
#   bench/gpu.sh [extra `mmgpt bench packing` options]
#   bench/gpu.sh --dry-run    # prints every command, runs none, exits 0 (any machine)
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
    shift
fi

# A bare checkout works too: mmgpt from the repo root, mmgpt_kernels from kernels/ (setup.py's layout).
if ! python3 -c "import mmgpt, mmgpt_kernels" 2>/dev/null; then
    export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
fi

card="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)"
card="$(printf '%s' "${card:-no-gpu}" | tr -c 'A-Za-z0-9._-' '_')"
results=bench/results
prefix="$results/$card"

# run LOG CMD...: print the command; unless dry-running, run it with its output also in LOG. A
# failing step (a timeout, say) is reported at the end and does not stop the later ones.
failed=()
run() {
    local log="$1"
    shift
    printf '+ %s  (log: %s)\n' "$(printf '%q ' "$@")" "$log"
    if (( ! dry_run )) && ! PYTHONUNBUFFERED=1 "$@" 2>&1 | tee "$log"; then
        failed+=("$log")
    fi
}

(( dry_run )) || mkdir -p "$results"
run "$prefix.gpu_info.csv" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run "$prefix.versions.txt" python3 -c "import torch, transformers, peft, open_clip; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, \
'peft', peft.__version__, 'open_clip', open_clip.__version__)"
# ~1 min build + 8 combinations x (warm-up + timed) x 2 rows; liger's first call compiles Triton.
run "$prefix.step_matrix.log" timeout 230 python3 -m mmgpt.cli bench packing --matrix \
    --preset 9b --device cuda --dtype bfloat16 --samples 2000 --max-tokens 4096 --steps 2 \
    --json "$prefix.step_matrix.json" "$@"
run "$prefix.train.log" timeout 120 python3 -m mmgpt.cli bench train --preset 9b --steps 10 \
    --json "$prefix.train.json"
if (( ${#failed[@]} )); then
    echo "bench/gpu.sh: failed steps (see their logs): ${failed[*]}" >&2
    exit 1
fi
