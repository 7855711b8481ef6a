#!/usr/bin/env bash
# The README demo: write the bundled sample data, then train the `demo` preset (tiny, random) on it
# with 2 CPU ranks through the real `deepspeed` launcher (ZeRO-2, bf16): two epochs of the text,
# caption and VQA sources plus the visual task of coloured shapes, the held-out shape questions
# scored as it goes (the very first DeepSpeed start also compiles a small communication op, once).
#
#   bash launch/demo.sh OUT_DIR
#
# Leaves OUT_DIR/tensorboard/ (events), OUT_DIR/checkpoints/ (DeepSpeed, LoRA + optimizer only),
# OUT_DIR/adapter/ (peft adapter for `mmgpt export`), OUT_DIR/train.log. Rerunning resumes.
# Master port: MASTER_PORT if set (refused in one line when busy), else a free one, so several
# demos (or other jobs) can run on one machine at once.
set -euo pipefail
OUT="${1:?usage: bash launch/demo.sh OUT_DIR}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
CONFIG="$REPO/configs/demo_tiny.yaml"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
source "$REPO/launch/accelerator.sh"

if [ ! -f "$OUT/data/mixture.yaml" ]; then
  python -m mmgpt.cli data sample --out "$OUT/data" --n "${DEMO_RECORDS:-400}" --max-length 512
fi
python -m mmgpt.train.launch_check --config "$CONFIG" --set "mixture=$OUT/data/mixture.yaml" --num-gpus 2
PORT="$(python -m mmgpt.train.master_port)" || exit 2
echo "master port $PORT"
cd "$REPO"
deepspeed --num_gpus 2 --master_port "$PORT" --module mmgpt.train.cli \
  --config "$CONFIG" --set "mixture=$OUT/data/mixture.yaml" --output-dir "$OUT" --resume auto "${@:2}"

echo
echo "TensorBoard logs: $OUT/tensorboard   (tensorboard --logdir $OUT/tensorboard)"
echo "Checkpoints:      $OUT/checkpoints   (latest: $(cat "$OUT/checkpoints/latest"))"
echo "Adapter (peft):   $OUT/adapter"
echo "Training log:     $OUT/train.log"
# Two held-out pictures (never trained on) of different colours: shapes_val.json's first records
# are a blue and a red shape, asked about their colour (mmgpt/data/shapes.py).
for PICTURE in val_00000 val_00002; do
  echo "Chat with it:     mmgpt chat --model $OUT --image $OUT/data/shapes/images/$PICTURE.png --prompt \"What color is the shape?\""
done
echo "Score it:         mmgpt eval --model $OUT --task llava --data $OUT/data/shapes/shapes_val.json --images $OUT/data/shapes/images"
