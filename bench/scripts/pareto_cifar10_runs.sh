# Sourced by pareto_cifar10_mobile.sh and pareto_cifar10_edge.sh: the steps every CIFAR-10 run of
# theirs goes through.  Needs D, OUT, EXPORT, EV and Q set, and the arrays runs and mixed.
#
#   measure_run NAME MODES   (MODES: hybrid,detect or detect)
#
# exports OUT/NAME's uint8-nhwc graphs in MODES, evaluates it gray-box, quantizes it with the
# precise layout and a copy OUT/NAME-mixed with the mixed one (left out, with the reason printed,
# where `dafar quantize` refuses it: its decisions moved); each step skipped when already done.
measure_run() {
  local r=$1 modes=$2
  grep -q -- 'detect-uint8-nhwc-b1.tflite' "$OUT/$r/manifest.json" || "$D" export "$OUT/$r" "${EXPORT[@]}" --mode "$modes"
  [ -f "$OUT/$r/eval/summary.json" ] || "$D" eval "$OUT/$r" "${EV[@]}"
  # the mixed layout's copy is taken before the precise int8 files exist (one layout per run folder)
  [ -d "$OUT/$r-mixed" ] || { cp -r "$OUT/$r" "$OUT/$r-mixed.tmp" && mv "$OUT/$r-mixed.tmp" "$OUT/$r-mixed"; }
  grep -q -- '-int8-b1.tflite' "$OUT/$r/manifest.json" || "$D" quantize "$OUT/$r" "${Q[@]}"
  runs+=("$OUT/$r")
  if grep -q -- '-int8-b1.tflite' "$OUT/$r-mixed/manifest.json" \
     || "$D" quantize "$OUT/$r-mixed" "${Q[@]}" --layout mixed 2> "$OUT/$r-mixed.err"; then
    mixed+=("$OUT/$r-mixed")
  else
    echo "mixed int8 refused for $r: $(tail -n 3 "$OUT/$r-mixed.err")"
  fi
}
