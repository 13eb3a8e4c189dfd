#!/usr/bin/env bash
# A robust mobile victim with DAFAR's decoder on top, on CIFAR-10 (JPEG q75 image folder):
#
#   bash bench/scripts/robust_cifar10.sh OUT_DIR CIFAR_TREE      (about 2 hours on a 2-core VM)
#
# CIFAR_TREE holds train/<class>/*.jpg and test/<class>/*.jpg, e.g. ../shared/data's tarball
# unpacked: mkdir -p /tmp/cifar-tree && tar xzf ../shared/data/cifar10-jpg/cifar10-jpg.tar.gz -C /tmp/cifar-tree
#
# 1. `dafar train --arch mobile --adversarial pgd --adv-eps 8/255 --adv-steps 2 --epochs 10`: E and F
#    trained on 2-step PGD images (step 10/255, random start), D on the clean images, C after, alpha
#    calibrated on clean validation images as today (about an hour here; resumable).  Two steps, not
#    Madry's 7 (2.6 hours here) and not `fast` (FGSM + random start, which overfit catastrophically
#    on MNIST): 2-step PGD costs about 1.15x `fast` per batch and resists that failure.
# 2. `dafar eval` with 500 images, gray-box FGSM/PGD at 8/255, the white-box adaptive attack at 8/255
#    and 1 (PGD 50 steps from the clean image and from the gray-box example; no BPDA pass, the mobile
#    decoder has no unpool mask; then APGD-CE and APGD-DLR, 50 steps each from random points, on what
#    stands) against the victim alone, DAFAR hybrid and DAFAR detect.
#    Half the MNIST steps and starts: the full setting would take about 3 hours on this network.
# 3. The side-by-side table (bench/scripts/robust_table.py), then export (l2, float NCHW, hybrid and
#    detect) and `dafar pareto` timing each graph against its own victim.
# Every step is skipped when its output exists, so an interrupted run resumes (training resumes too).
set -euo pipefail
OUT=$(realpath -m "${1:?usage: robust_cifar10.sh OUT_DIR CIFAR_TREE}")
DATA=$(realpath "${2:?usage: robust_cifar10.sh OUT_DIR CIFAR_TREE}")
REPO=${REPO:-$(cd "$(dirname "$0")/../.." && pwd)}
DAFAR=${DAFAR:-$REPO/.venv/bin/dafar}
PY=${PY:-$REPO/.venv/bin/python}
mkdir -p "$OUT"

if [ ! -f "$OUT/robust/manifest.json" ]; then
  resume=()
  [ -d "$OUT/robust/checkpoints" ] && resume=(--resume)
  "$DAFAR" train --dataset imagefolder --data-dir "$DATA" --arch mobile --adversarial pgd --adv-eps 8/255 \
    --adv-steps 2 --epochs 10 --batch-size 128 --lr 3e-3 --augment crop-flip --val-size 5000 --threads 2 \
    --out "$OUT/robust" "${resume[@]}"
fi

[ -f "$OUT/robust/eval/summary.json" ] || "$DAFAR" eval "$OUT/robust" --data-dir "$DATA" --images 500 \
  --adaptive-images 500 --eps 8/255 --adaptive-eps 8/255,1 --adaptive-steps 50 --adaptive-restarts 1 \
  --graybox fgsm,pgd --no-peers --no-deployed --detector l2 --quiet
"$PY" "$REPO/bench/scripts/robust_table.py" "$OUT/robust" --out "$OUT/table"

grep -q -- '-detect-' "$OUT/robust/manifest.json" || "$DAFAR" export "$OUT/robust" --detector l2 \
  --input float-nchw --mode hybrid,detect --data-dir "$DATA" --quiet
"$DAFAR" pareto "$OUT/robust" --out "$OUT/pareto" --threads 1 --runs 300
