#!/usr/bin/env bash
# Run the dafar runtime on an emulated aarch64 Debian (Raspberry Pi OS is Debian arm64) and check
# that every model file of a run folder gives the same labels, scores and decisions as on this
# x86 machine.  Correctness only: emulated timing says nothing about a real Pi and is never reported.
#
#   sudo bench/scripts/arm64_check.sh RUN_DIR [ROOTFS_DIR]
#
# Needs root (binfmt_misc, chroot, mounts), Debian's qemu-user-static, binfmt-support and
# debootstrap (installed when missing), and the Debian mirror and PyPI (first run only: the root
# file system, about 530 MB, is kept in ROOTFS_DIR, default ~/.cache/dafar/arm64-rootfs).
# The result lands in RUN_DIR/bench/arm64_crosscheck.json; the exit status is 0 when every model passed.
#
# Three traps, each seen on this kind of machine (see ../shared/notes/arm64-emulation.md):
#  1. onnxruntime segfaults on import when /proc/cpuinfo is the host's x86 one: a Pi 4 style
#     cpuinfo is bind-mounted over it;
#  2. QEMU_CPU=max (qemu's default) gives wrong int8 results (an SVE/SME path): cortex-a72 (Pi 4);
#  3. without /sys, XNNPACK picks other kernels and a few int8 outputs are off by one: /sys is mounted.
set -euo pipefail

RUN=$(realpath "${1:?usage: arm64_check.sh RUN_DIR [ROOTFS_DIR]}")
ROOT=$(realpath -m "${2:-${HOME:-/root}/.cache/dafar/arm64-rootfs}")
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
QEMU_CPU_MODEL=${QEMU_CPU_MODEL:-cortex-a72}
[ "$(id -u)" = 0 ] || { echo "arm64_check: needs root (chroot, mounts, binfmt_misc)" >&2; exit 2; }
[ -f "$RUN/manifest.json" ] || { echo "arm64_check: $RUN is not a dafar run folder" >&2; exit 2; }

log() { echo "[arm64-check $(date +%H:%M:%S)] $*" >&2; }

bash "$(dirname "$0")/arm64_rootfs.sh" "$ROOT"

# ---- dafar itself (a pure-python wheel), the run folder and the x86 reference outputs
WORK="$ROOT/work"
rm -rf "$WORK" && mkdir -p "$WORK/wheel" "$WORK/run"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/wheel" "$REPO" >/dev/null
WHEEL=$(cd "$WORK/wheel" && ls dafar-*.whl | head -1)
QEMU_CPU=$QEMU_CPU_MODEL chroot "$ROOT" /venv/bin/pip install -q --disable-pip-version-check --no-deps \
  --force-reinstall "/work/wheel/$WHEEL"
cp "$RUN/manifest.json" "$WORK/run/"
cp -r "$RUN/export" "$WORK/run/"
log "recording reference outputs on $(uname -m)"
"$PY" -m dafar.bench.reliability.crosscheck record "$RUN" "$WORK/ref.npz" --images "${IMAGES:-200}" >/dev/null

# ---- emulated aarch64 run, with the three traps avoided
source "$(dirname "$0")/arm64_mounts.sh"
trap 'arm64_umount "$ROOT"' EXIT
arm64_mount "$ROOT"
log "comparing on emulated aarch64 (QEMU_CPU=$QEMU_CPU_MODEL)"
set +e
QEMU_CPU=$QEMU_CPU_MODEL chroot "$ROOT" /venv/bin/python -m dafar.bench.reliability.crosscheck compare /work/run /work/ref.npz \
  --json /work/result.json >/dev/null
status=$?
set -e
mkdir -p "$RUN/bench"
cp "$WORK/result.json" "$RUN/bench/arm64_crosscheck.json"
log "result: $RUN/bench/arm64_crosscheck.json (exit $status)"
exit $status
