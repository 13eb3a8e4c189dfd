#!/usr/bin/env bash
# Issue 21's cheap MNIST defence against the paper-sized one, in one command (about 50 minutes on a
# 2-core VM, most of it the three gray-box evaluations):
#
#   bash bench/scripts/pareto_mnist_edge.sh OUT_DIR
#
# Runs: the published joint model (reference); a plug-in decoder at pool1, half width, without the
# unpool mask (--unpool upsample) on its frozen victim; and `dafar train --profile edge` (the same
# decoder trained jointly, alpha at a 0.3% validation FPR).  Each: l2, float NCHW, hybrid and detect
# graphs, gray-box eval (FGSM/PGD at 0.05/0.1/0.3, CW-L2), int8 TFLite with the precise layout and, in
# a copy, the mixed layout; then `dafar pareto` times every file against its own run's victim.
# Results: OUT_DIR/pareto/pareto.md, pareto.json, pareto.png (bench/results/pareto-mnist/edge/).
set -euo pipefail
OUT=$(realpath -m "${1:?usage: pareto_mnist_edge.sh OUT_DIR}")
REPO=$(cd "$(dirname "$0")/../.." && pwd)
D=${DAFAR:-$REPO/.venv/bin/dafar}
mkdir -p "$OUT"
EXPORT=(--detector l2 --input float-nchw --mode hybrid,detect --quiet)
EV=(--no-peers --no-adaptive --no-deployed --images 300 --slow-images 20 --eps 0.05,0.1,0.3 --graybox fgsm,pgd,cw-l2
    --detector l2 --quiet)
[ -f "$OUT/joint/manifest.json" ] || "$D" export "$OUT/joint" --pretrained mnist "${EXPORT[@]}"
[ -f "$OUT/plugin-up/manifest.json" ] || { "$D" attach --victim mnist --feedback-at pool1 --decoder-width 0.5 \
    --unpool upsample --no-detector --quiet --out "$OUT/plugin-up" && "$D" export "$OUT/plugin-up" "${EXPORT[@]}"; }
[ -f "$OUT/edge/manifest.json" ] || { "$D" train --dataset mnist --profile edge --quiet --out "$OUT/edge" \
    && "$D" export "$OUT/edge" "${EXPORT[@]}"; }
runs=() mixed=()
for r in joint plugin-up edge; do
  [ -f "$OUT/$r/eval/summary.json" ] || "$D" eval "$OUT/$r" "${EV[@]}"
  [ -d "$OUT/$r-mixed" ] || { cp -r "$OUT/$r" "$OUT/$r-mixed.tmp" && mv "$OUT/$r-mixed.tmp" "$OUT/$r-mixed"; }
  grep -q -- '-int8-b1.tflite' "$OUT/$r-mixed/manifest.json" || "$D" quantize "$OUT/$r-mixed" --format tflite \
    --layout mixed --no-naive --quiet
  grep -q -- '-int8-b1.tflite' "$OUT/$r/manifest.json" || "$D" quantize "$OUT/$r" --format tflite --no-naive --quiet
  runs+=("$OUT/$r") mixed+=("$OUT/$r-mixed")
done
"$D" pareto "${runs[@]}" "${mixed[@]}" --out "$OUT/pareto" --threads 1,2 --runs 300
