#!/usr/bin/env bash
# A robust victim with DAFAR's decoder on top, against the paper-trained model, on MNIST:
#
#   bash bench/scripts/robust_mnist.sh OUT_DIR [DATA_DIR]      (about 1.5 hours on a 2-core VM)
#
# 1. `dafar train --adversarial pgd --adv-steps 5 --epochs 6`: E and F trained on 5-step PGD images
#    at eps 0.3 (Madry et al.; 29 minutes here), D and C as usual, alpha calibrated on clean
#    validation images as today.  (`--adversarial fast` overfit catastrophically on this network:
#    see bench/results/robust-mnist/README.md.)
# 2. `dafar eval` on both runs with the same flags: 500 images, gray-box FGSM/PGD at 0.3, the
#    white-box adaptive attack at eps 0.3 and 1 (PGD 100 steps x 3 starts, BPDA, APGD-CE, APGD-DLR)
#    against the victim alone, DAFAR hybrid and DAFAR detect; sanity checks at 0.3.
# 3. Export (l2, float NCHW, hybrid and detect) and int8 quantization of both, then `dafar pareto`
#    times every file against its own victim, interleaved: the same architecture costs the same.
# Results: OUT_DIR/table/robust.md and .json (bench/scripts/robust_table.py), OUT_DIR/pareto/.
# Every step is skipped when its output exists, so an interrupted run resumes (training resumes too).
set -euo pipefail
OUT=$(realpath -m "${1:?usage: robust_mnist.sh OUT_DIR [DATA_DIR]}")
DATA=${2:-}
REPO=${REPO:-$(cd "$(dirname "$0")/../.." && pwd)}
DAFAR=${DAFAR:-$REPO/.venv/bin/dafar}
PY=${PY:-$REPO/.venv/bin/python}
mkdir -p "$OUT"
DATA_ARGS=()
[ -n "$DATA" ] && DATA_ARGS=(--data-dir "$DATA")

if [ ! -f "$OUT/robust/manifest.json" ]; then
  resume=()
  [ -d "$OUT/robust/checkpoints" ] && resume=(--resume)
  "$DAFAR" train --dataset mnist "${DATA_ARGS[@]}" --profile paper --no-victim --adversarial pgd --adv-steps 5 \
    --epochs 6 --out "$OUT/robust" "${resume[@]}"
fi
[ -f "$OUT/paper/manifest.json" ] || "$DAFAR" pretrained mnist --out "$OUT/paper"

EVAL=(--images 500 --adaptive-images 500 --eps 0.3 --adaptive-eps 0.3,1 --graybox fgsm,pgd --no-peers
      --no-deployed --detector l2 --quiet)
for run in "$OUT/paper" "$OUT/robust"; do
  [ -f "$run/eval/summary.json" ] || "$DAFAR" eval "$run" "${DATA_ARGS[@]}" "${EVAL[@]}"
done
"$PY" "$REPO/bench/scripts/robust_table.py" "$OUT/paper" "$OUT/robust" --out "$OUT/table"

for run in "$OUT/paper" "$OUT/robust"; do
  grep -q -- '-detect-' "$run/manifest.json" || "$DAFAR" export "$run" --detector l2 --input float-nchw \
    --mode hybrid,detect --quiet
  grep -q -- '-int8-b1.tflite' "$run/manifest.json" || "$DAFAR" quantize "$run" --format tflite --no-naive --quiet
done
"$DAFAR" pareto "$OUT/paper" "$OUT/robust" --out "$OUT/pareto" --threads 1 --runs 300
