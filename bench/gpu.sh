#!/usr/bin/env bash
# Packing benchmark on one CUDA GPU: the 9B architecture (ViT-L/14 + LLaMA-7B, OpenFlamingo-9B
# layout) with RANDOM weights built on the device in bf16 (nothing is downloaded), LoRA trainable.
# Compares one sample per forward, padded batches and packed 4096-token rows; reports supervised
# tokens/s, MFU (LoRA-aware FLOPs, see mmgpt.perf.step_flops) and peak memory as JSON.
# Budget: about 5 minutes on an H100/H200 (model build ~1 min, timing ~2 min).
#
#   bench/gpu.sh [OUT_DIR] [extra `mmgpt bench packing` options]
#   bench/gpu.sh --dry-run [OUT_DIR]   # same code path on CPU at tiny scale (checks the script)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--dry-run" ]]; then
    shift
    model_args=(--preset tiny --device cpu --dtype float32 --samples 300 --max-tokens 512 --steps 2)
else
    model_args=(--preset 9b --device cuda --dtype bfloat16 --samples 2000 --max-tokens 4096 --steps 6
                --gradient-checkpointing)
fi
out_dir="${1:-${OUT:-out}}"
shift $(( $# > 0 ? 1 : 0 ))
mkdir -p "$out_dir"

# A bare checkout works too: mmgpt from the repo root, mmgpt_kernels from kernels/ (setup.py's layout).
if ! python3 -c "import mmgpt, mmgpt_kernels" 2>/dev/null; then
    export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ "${model_args[*]}" == *cuda* ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out_dir/gpu_info.csv"
fi
python3 -c "import torch, transformers, peft, open_clip; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'open_clip', open_clip.__version__)"

PYTHONUNBUFFERED=1 python3 -m mmgpt.cli bench packing "${model_args[@]}" \
    --json "$out_dir/packing_bench.json" "$@" 2>&1 | tee "$out_dir/packing_bench.log"
