#!/usr/bin/env bash
# Issue 21 on CIFAR-10 (JPEG q75): `--profile edge` against the paper-sized defence it replaces, in
# one command (about 2 hours on a 2-core VM: 30 joint epochs at ~160 s, two gray-box evaluations,
# the int8 conversions):
#
#   bash bench/scripts/pareto_cifar10_edge.sh OUT_DIR [CIFAR_TREE]
#
# CIFAR_TREE: the extracted image folder (default: ../shared/data's tarball extracted into OUT_DIR).
# Runs: `joint`, the published `cifar10-mobile` (30 joint AdamW epochs, D after the second stage,
# full width; the reference); `edge`: `dafar train --profile edge`, the same recipe, seed and
# epochs with D after the first stage (published as `cifar10-mobile-edge`: to skip the training,
# run `dafar pretrained cifar10-mobile-edge --out OUT_DIR/edge` first).  Each: l2, uint8 NHWC input,
# detect graphs (the reference also hybrid), gray-box eval (FGSM/PGD at 2, 8, 16/255, CW-L2, JSMA), int8 TFLite with
# the precise layout and, in a copy, the mixed layout (left out where `dafar quantize` refuses it:
# its decisions moved); then `dafar pareto` times every file against its own run's victim.
# Results: OUT_DIR/pareto/ (bench/results/pareto-cifar10/mobile-edge/).
set -euo pipefail
OUT=$(realpath -m "${1:?usage: pareto_cifar10_edge.sh OUT_DIR [CIFAR_TREE]}")
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
[ -f "$OUT/joint/manifest.json" ] || "$D" export "$OUT/joint" --pretrained cifar10-mobile "${EXPORT[@]}" --mode hybrid,detect
# the reference's own command (core/assets/pretrained/cifar10-mobile) with --profile edge, which sets
# --feedback-at stage1 and everything else it passed; no anomaly autoencoder (l2 only)
[ -f "$OUT/edge/manifest.json" ] || "$D" train --dataset imagefolder "${DATA[@]}" --profile edge --augment crop-flip \
  --val-size 5000 --seed 0 --threads 2 --quiet --out "$OUT/edge"
runs=() mixed=()
. "$REPO/bench/scripts/pareto_cifar10_runs.sh"
# the edge model ships as detect graphs (what `dafar pipeline --profile edge` exports); the reference
# also as the paper's hybrid graph
measure_run joint hybrid,detect
measure_run edge detect
"$D" pareto "${runs[@]}" "${mixed[@]}" --out "$OUT/pareto" --input uint8-nhwc --threads 1,2 --runs 300
