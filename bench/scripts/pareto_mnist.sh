#!/usr/bin/env bash
# Every point of the MNIST cost/detection comparison, from the published model, in one command:
#
#   bash bench/scripts/pareto_mnist.sh OUT_DIR        (about an hour on a 2-core VM)
#   CONFIGS="pool1 0.5" EVAL_SKIP="joint plugin-pool1-w0.5" bash bench/scripts/pareto_mnist.sh OUT_DIR
#                                                      (one plug-in, no evaluation: about 10 minutes)
#
# Configurations: the published joint model (the paper-sized defence, the reference) and decoders
# attached to its frozen victim at the first / second pooling block, full and half width.  Each is
# exported as hybrid and detect graphs (l2, float NCHW, ONNX + TFLite, parity-checked), quantized
# to int8 TFLite (precise layout, checked; the joint model and the pool1 plug-ins also as copies with
# the mixed layout), evaluated gray-box (FGSM/PGD at 0.05, 0.1, 0.3, CW-L2), and then every file is
# timed against its own run's victim by `dafar pareto`.
# Results: OUT_DIR/pareto/pareto.md, pareto.json, pareto.png; the run folders stay in OUT_DIR.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: pareto_mnist.sh OUT_DIR}")
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DAFAR=${DAFAR:-$REPO/.venv/bin/dafar}
mkdir -p "$OUT"
EXPORT=(--detector l2 --input float-nchw --mode hybrid,detect --quiet)

[ -f "$OUT/joint/manifest.json" ] || "$DAFAR" export "$OUT/joint" --pretrained mnist "${EXPORT[@]}"
runs=("$OUT/joint")
# CONFIGS="pool1 0.5" (feedback position and width pairs, ';'-separated) times a subset
IFS=';' read -r -a configs <<< "${CONFIGS:-pool1 1.0;pool1 0.5;pool2 1.0;pool2 0.5}"
for cfg in "${configs[@]}"; do
  set -- $cfg
  run="$OUT/plugin-$1-w$2"
  if [ ! -f "$run/manifest.json" ]; then
    "$DAFAR" attach --victim mnist --feedback-at "$1" --decoder-width "$2" --no-detector --quiet --out "$run"
    "$DAFAR" export "$run" "${EXPORT[@]}"
  fi
  runs+=("$run")
done
for run in "${runs[@]}"; do
  # EVAL_SKIP="plugin-pool2-w1.0 ..." leaves runs unevaluated (the table then says so): CW-L2 and
  # JSMA take 10-20 minutes per run on these 2 cores
  case " ${EVAL_SKIP:-} " in *" $(basename "$run") "*) continue ;; esac
  [ -f "$run/eval/summary.json" ] || "$DAFAR" eval "$run" --no-peers --no-adaptive --no-deployed --images 300 \
    --slow-images 20 --eps 0.05,0.1,0.3 --detector l2 --quiet
done
# the int8 score path: the cheap candidates once more as copies (same weights, same float evaluation)
# quantized with the mixed layout, where E and D run in int8 too and only the residual onwards is
# float; quantize compares its decisions and its detection on FGSM/PGD with float
more=()
for run in "$OUT/joint" "$OUT/plugin-pool1-w1.0" "$OUT/plugin-pool1-w0.5"; do
  [ -d "$run" ] || continue  # not among CONFIGS
  [ -d "$run-mixed" ] || { cp -r "$run" "$run-mixed.tmp" && mv "$run-mixed.tmp" "$run-mixed"; }
  grep -q -- '-int8-b1.tflite' "$run-mixed/manifest.json" || "$DAFAR" quantize "$run-mixed" --format tflite \
    --layout mixed --no-naive --quiet
  more+=("$run-mixed")
done
for run in "${runs[@]}"; do
  grep -q -- '-int8-b1.tflite' "$run/manifest.json" || "$DAFAR" quantize "$run" --format tflite --no-naive --quiet
done
"$DAFAR" pareto "${runs[@]}" "${more[@]}" --out "$OUT/pareto" --threads 1,2 --runs 300
