#!/usr/bin/env bash
# Everything mmgpt checks on one CUDA card (issues 10 and 23), in at most 6 minutes on an H100/H200:
#   fake_cuda   tests/test_fake_cuda.py (on a CUDA machine it also runs its real-number half): the full 9B step that CI traces on
#               fake CUDA tensors, run for real (loss and LoRA grads of torch_varlen vs sdpa)
#   cuda_tests  the tests that skip elsewhere with "needs CUDA" (the fused kernels' parametrisations)
#   step_matrix the 9B packed training step, RANDOM weights built on the card in bf16 (nothing is
#               downloaded), 4096-token rows, attention {sdpa, fused} x checkpointing {full, off} x
#               liger {off, on} on one model build (`mmgpt bench packing --matrix`)
#   train       `mmgpt bench train --preset 9b --steps 10`: real ZeRO-2 optimizer steps
#   plan        `mmgpt plan` for configs/mmgpt_9b.yaml on this card's memory; the summary puts its
#               predicted peaks next to the ones step_matrix and train measured
# Each step runs under its own timeout and the 6-minute budget; a failing step is recorded and the
# next one still runs. Results: bench/results/<card>_<step>.{json,log} and <card>_summary.json
# (every step's status, exit code, seconds, test counts; the plan next to the measured peaks),
# <card> being nvidia-smi's name for GPU 0 without "NVIDIA", lower-case (h200, h100_80gb_hbm3).
#
#   bench/gpu.sh [--steps a,b] [extra `mmgpt bench packing` options]
#   bench/gpu.sh --dry-run          # prints every command, runs none, writes nothing (any machine)
#   bench/gpu.sh --download-wheels  # here: the wheels of bench/gpu-wheels.txt into .whl/
# On the lent machine (README "Performance"): carry .whl; this script installs it into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
only=""
while (( $# )); do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --steps) only=",$2,"; shift 2 ;;
        --download-wheels)
            # the one place wheels are fetched: binary wheels for the device's Python 3.12, and
            # DeepSpeed (an sdist only on PyPI) built here as a pure-Python wheel (no ops compiled)
            set -e
            mkdir -p .whl
            grep -v '^#' bench/gpu-wheels.txt | grep -v '^deepspeed' | xargs python3 -m pip download \
                --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
                --platform manylinux2014_x86_64 -d .whl
            grep '^deepspeed' bench/gpu-wheels.txt | DS_BUILD_OPS=0 xargs python3 -m pip wheel \
                --no-deps --no-build-isolation -w .whl
            exit 0 ;;
        *) break ;;
    esac
done

if (( ! dry_run )) && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# A bare checkout works too: mmgpt from the repo root, mmgpt_kernels from kernels/ (setup.py's layout).
if ! python3 -c "import mmgpt, mmgpt_kernels" 2>/dev/null; then
    export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

card="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)"
card="$(printf '%s' "${card:-no-gpu}" | sed 's/^NVIDIA //' | tr 'A-Z' 'a-z' | tr -c 'a-z0-9.\n-' '_')"
mem_mib="$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1 || true)"
gpu_gib="$(( ${mem_mib:-0} / 1024 ))GiB"
results="${MMGPT_GPU_RESULTS:-bench/results}"
prefix="$results/${card}_"
steps_tsv="$(mktemp)"
budget=360
started=$SECONDS

# step NAME TIMEOUT CMD...: print the command; unless dry-running (or not among --steps), run it
# under min(TIMEOUT, what is left of the budget), its output also in <prefix>NAME.log, and record
# name, exit status, seconds, log and command in the steps file.
step() {
    local name="$1" limit="$2"
    shift 2
    [[ -z "$only" || "$only" == *",$name,"* ]] || return 0
    local log="$prefix$name.log" left=$(( budget - (SECONDS - started) ))
    printf '+ [%s] %s\n' "$name" "$(printf '%q ' "$@")"
    (( dry_run )) && return 0
    if (( left < 10 )); then
        printf '%s\tskipped\t0\t%s\t%s\n' "$name" "$log" "$*" >>"$steps_tsv"
        echo "bench/gpu.sh: $name skipped: the 6-minute budget is spent" >&2
        return 0
    fi
    local t0=$SECONDS rc=0
    timeout $(( limit < left ? limit : left )) "$@" >"$log" 2>&1 || rc=$?
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" "$log" "$*" >>"$steps_tsv"
    tail -n 3 "$log"
}

(( dry_run )) || mkdir -p "$results"
step gpu_info 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step versions 60 python3 -c "import torch, transformers, peft, open_clip, deepspeed; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, \
'peft', peft.__version__, 'open_clip', open_clip.__version__, 'deepspeed', deepspeed.__version__)"
step fake_cuda 90 python3 -m pytest -q -rs tests/test_fake_cuda.py
step cuda_tests 60 python3 -m pytest -q -rs tests/test_kernels.py \
    tests/test_model.py::test_auto_runs_fused_self_and_cross_attention_for_9b_on_cuda
# ~1 min build + 8 combinations x (warm-up + timed) x 2 rows; liger's first call compiles Triton.
step step_matrix 170 python3 -m mmgpt.cli bench packing --matrix --preset 9b --device cuda \
    --dtype bfloat16 --samples 2000 --max-tokens 4096 --steps 2 --json "${prefix}step_matrix.json" "$@"
step train 100 python3 -m mmgpt.cli bench train --preset 9b --steps 10 --json "${prefix}train.json"
step plan 30 python3 -m mmgpt.cli plan --config configs/mmgpt_9b.yaml --world-size 1 --gpu "$gpu_gib" \
    --json "${prefix}plan.json"
(( dry_run )) && exit 0

python3 bench/gpu_summary.py "$steps_tsv" "$prefix" "$card" "${prefix}summary.json"
rm -f "$steps_tsv"
failed="$(python3 -c "import json, sys; print(' '.join(json.load(open(sys.argv[1]))['failed_steps']))" \
    "${prefix}summary.json")"
if [[ -n "$failed" ]]; then
    echo "bench/gpu.sh: failed steps (see ${prefix}<step>.log): $failed" >&2
    exit 1
fi
echo "bench/gpu.sh: all steps passed; ${prefix}summary.json"
