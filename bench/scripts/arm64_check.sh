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

# ---- host: qemu + binfmt
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null || ! command -v update-binfmts >/dev/null; then
  log "installing qemu-user-static binfmt-support debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static binfmt-support debootstrap >/dev/null
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || { echo "arm64_check: qemu-aarch64 binfmt is not registered" >&2; exit 3; }

# ---- the root file system (once)
if [ ! -x "$ROOT/venv/bin/python" ]; then
  MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  log "debootstrap (first stage) from $MIRROR into $ROOT"
  mkdir -p "$ROOT"
  debootstrap --arch=arm64 --foreign --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$ROOT" "$MIRROR" >/dev/null
  # The second stage runs every maintainer script under emulation (5-7 minutes); unpacking the
  # downloaded packages natively is enough for python, venv and pip (apt/dpkg inside are not needed).
  log "unpacking $(ls "$ROOT"/var/cache/apt/archives/*.deb | wc -l) packages"
  for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
  mkdir -p "$ROOT/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
  log "python venv + numpy, ai-edge-litert, onnxruntime (aarch64 wheels)"
  QEMU_CPU=$QEMU_CPU_MODEL chroot "$ROOT" /usr/bin/python3 -m venv /venv
  QEMU_CPU=$QEMU_CPU_MODEL chroot "$ROOT" /venv/bin/pip install -q --disable-pip-version-check \
    --cert /etc/ssl/certs/ca-certificates.crt "numpy>=1.26,<3" "ai-edge-litert>=2.0,<3" "onnxruntime>=1.18,<2"
fi

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
CPUINFO=$(mktemp)
cat >"$CPUINFO" <<'EOF'
processor	: 0
BogoMIPS	: 108.00
Features	: fp asimd evtstrm crc32 cpuid
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x0
CPU part	: 0xd08
CPU revision	: 3

Hardware	: BCM2835
Model		: Raspberry Pi 4 Model B Rev 1.4
EOF
cleanup() {
  umount "$ROOT/proc/cpuinfo" 2>/dev/null || true
  umount "$ROOT/proc" 2>/dev/null || true
  umount "$ROOT/sys" 2>/dev/null || true
  rm -f "$CPUINFO"
}
trap cleanup EXIT
mkdir -p "$ROOT/proc" "$ROOT/sys"
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
mountpoint -q "$ROOT/sys" || mount --bind /sys "$ROOT/sys"
mount --bind "$CPUINFO" "$ROOT/proc/cpuinfo"
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
