#!/usr/bin/env bash
# Issue 21 on CIFAR-10 (JPEG q75), mobile network: two cheaper decoders trained jointly on the
# published joint model's E and F, against that model, in one command (about 100 minutes on a 2-core
# VM: 2 x 8 joint epochs at ~170 s, three gray-box evaluations, the int8 conversions):
#
#   bash bench/scripts/pareto_cifar10_mobile.sh OUT_DIR [CIFAR_TREE]
#
# CIFAR_TREE: the extracted image folder (default: ../shared/data's tarball extracted into OUT_DIR).
# Runs: `joint`, the published `cifar10-mobile` (D at stage2, full width; the reference); `half`:
# `dafar train --init-from joint --new-decoder --decoder-width 0.5`; `stage1`: the same with
# `--feedback-at stage1` at full width (E and F continue at a tenth of the reference's learning
# rate, D starts from scratch on its own Adam schedule).  Each: l2, uint8 NHWC input, hybrid and
# detect graphs, gray-box eval (FGSM/PGD at 2, 8, 16/255, CW-L2, JSMA), int8 TFLite with the precise
# layout and, in a copy, the mixed layout (left out of the table where `dafar quantize` refuses it:
# its decisions moved); then `dafar pareto` times every file against its own run's victim.
# Results: OUT_DIR/pareto/ (bench/results/pareto-cifar10/mobile-joint/).
set -euo pipefail
OUT=$(realpath -m "${1:?usage: pareto_cifar10_mobile.sh OUT_DIR [CIFAR_TREE]}")
REPO=$(cd "$(dirname "$0")/../.." && pwd)
D=${DAFAR:-$REPO/.venv/bin/dafar}
mkdir -p "$OUT"
TREE=${2:-$OUT/cifar-tree/cifar10-jpg}
if [ ! -d "$TREE/train" ]; then
  mkdir -p "$OUT/cifar-tree" && tar xzf "$REPO/../shared/data/cifar10-jpg/cifar10-jpg.tar.gz" -C "$OUT/cifar-tree"
fi
DATA=(--data-dir "$TREE")
EXPORT=(--detector l2 --input uint8-nhwc --validate 1000 --quiet "${DATA[@]}")
EV=(--no-peers --no-adaptive --no-deployed --images 300 --slow-images 20 --eps 2/255,8/255,16/255 --detector l2
    --quiet "${DATA[@]}")
Q=(--format tflite --min-label-agreement 0.98 --quiet "${DATA[@]}")
TRAIN=(train --dataset imagefolder "${DATA[@]}" --arch mobile --profile quick --init-from "$OUT/joint" --new-decoder
       --epochs 8 --batch-size 128 --optimizer adamw --lr 3e-4 --weight-decay 0.05 --decoder-optimizer adam
       --decoder-lr 2e-3 --augment crop-flip --no-detector --val-size 5000 --seed 0 --threads 2 --quiet)
[ -f "$OUT/joint/manifest.json" ] || "$D" export "$OUT/joint" --pretrained cifar10-mobile "${EXPORT[@]}" --mode hybrid,detect
[ -f "$OUT/half/manifest.json" ] || "$D" "${TRAIN[@]}" --decoder-width 0.5 --out "$OUT/half"
[ -f "$OUT/stage1/manifest.json" ] || "$D" "${TRAIN[@]}" --feedback-at stage1 --out "$OUT/stage1"
runs=() mixed=()
. "$REPO/bench/scripts/pareto_cifar10_runs.sh"
for r in joint half stage1; do measure_run "$r" hybrid,detect; done
"$D" pareto "${runs[@]}" "${mixed[@]}" --out "$OUT/pareto" --input uint8-nhwc --threads 1,2 --runs 300
