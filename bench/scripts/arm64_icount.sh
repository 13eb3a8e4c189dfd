#!/usr/bin/env bash
# ARM cost without a Pi: a deterministic instruction count per inference for every model file of a
# run folder, on emulated Cortex-A72 (Raspberry Pi 4) and Cortex-A76 (Pi 5) CPU models.
#
#   sudo bench/scripts/arm64_icount.sh RUN_DIR [ROOTFS_DIR]
#
# Each file runs in the emulated aarch64 Debian of arm64_check.sh (built on first use) under
# Debian's dynamic qemu-user with a counting plugin (icount_plugin.c; the static qemu the cross-check
# uses cannot load plugins): two warm-up inferences, then RUNS (default 5) marked ones, one thread.
# Results: RUN_DIR/bench/arm64_icount.json, and an "aarch64 instruction counts" section in
# bench_report.md (written again when `dafar bench` has run).  Counts depend on the CPU model
# (the kernels XNNPACK and MLAS pick for it) and are a relative cost, not Pi cycles or milliseconds.
set -euo pipefail
RUN=$(realpath "${1:?usage: arm64_icount.sh RUN_DIR [ROOTFS_DIR]}")
ROOT=$(realpath -m "${2:-${HOME:-/root}/.cache/dafar/arm64-rootfs}")
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
RUNS=${RUNS:-5}
CPUS=${CPUS:-cortex-a72 cortex-a76}
[ "$(id -u)" = 0 ] || { echo "arm64_icount: needs root (chroot, mounts)" >&2; exit 2; }
[ -f "$RUN/manifest.json" ] || { echo "arm64_icount: $RUN is not a dafar run folder" >&2; exit 2; }
log() { echo "[arm64-icount $(date +%H:%M:%S)] $*" >&2; }

bash "$HERE/arm64_rootfs.sh" "$ROOT"

# ---- the dynamic qemu and the plugin, with their x86 libraries, inside the aarch64 root (the
# x86 loader and libraries live under /lib/x86_64-linux-gnu and /lib64, apart from the aarch64 ones)
if ! command -v qemu-aarch64 >/dev/null; then
  log "installing qemu-user (the dynamic build, which loads plugins)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null
fi
command -v gcc >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc >/dev/null
mkdir -p "$ROOT/icount"
gcc -shared -fPIC -O2 -Wall -o "$ROOT/icount/libicount.so" "$HERE/icount_plugin.c"
cp "$(command -v qemu-aarch64)" "$ROOT/icount/qemu-aarch64"
libs() { ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'; }
for f in $( (libs "$(command -v qemu-aarch64)"; libs "$ROOT/icount/libicount.so") | sort -u); do
  mkdir -p "$ROOT$(dirname "$f")"
  cp -L "$f" "$ROOT$f"
done
cp "$HERE/arm64_icount_guest.py" "$ROOT/icount/guest.py"
QEMU_VERSION=$(qemu-aarch64 --version | head -1)

# ---- the run's model files
rm -rf "$ROOT/icount/run" && mkdir -p "$ROOT/icount/run"
cp "$RUN/manifest.json" "$ROOT/icount/run/"
cp -r "$RUN/export" "$ROOT/icount/run/"

source "$(dirname "$0")/arm64_mounts.sh"
trap 'arm64_umount "$ROOT"' EXIT
arm64_mount "$ROOT"

RAW="$ROOT/icount/raw"
rm -rf "$RAW" && mkdir -p "$RAW"
files=$(cd "$RUN" && ls export/*.tflite export/*.onnx 2>/dev/null)
n=$(echo "$files" | wc -w)
i=0
for cpu in $CPUS; do
  for rel in $files; do
    i=$((i + 1))
    out="$RAW/$cpu--$(basename "$rel").txt"
    log "[$i/$((n * $(echo $CPUS | wc -w)))] $cpu $rel"
    if ! chroot "$ROOT" /icount/qemu-aarch64 -cpu "$cpu" \
         -plugin "/icount/libicount.so,out=/icount/raw/$(basename "$out")" \
         /venv/bin/python /icount/guest.py "/icount/run/$rel" "$RUNS" >"$out.log" 2>&1; then
      log "  failed: $(tail -1 "$out.log")"
    fi
  done
done
"$PY" -m dafar.bench.perf.icount "$RUN" "$RAW" --runs "$RUNS" --qemu "$QEMU_VERSION"
