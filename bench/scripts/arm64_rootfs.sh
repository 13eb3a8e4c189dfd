#!/usr/bin/env bash
# The emulated aarch64 Debian (Raspberry Pi OS is Debian arm64) that arm64_check.sh and
# arm64_icount.sh run in, built once into ROOTFS_DIR (about 530 MB):
#
#   sudo bench/scripts/arm64_rootfs.sh ROOTFS_DIR
#
# Needs root (binfmt_misc, chroot), Debian's qemu-user-static, binfmt-support and debootstrap
# (installed when missing), and the Debian mirror and PyPI the first time.
set -euo pipefail
ROOT=$(realpath -m "${1:?usage: arm64_rootfs.sh ROOTFS_DIR}")
QEMU_CPU_MODEL=${QEMU_CPU_MODEL:-cortex-a72}
[ "$(id -u)" = 0 ] || { echo "arm64_rootfs: needs root (chroot, binfmt_misc)" >&2; exit 2; }
log() { echo "[arm64-rootfs $(date +%H:%M:%S)] $*" >&2; }

# ---- host: qemu + binfmt
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null || ! command -v update-binfmts >/dev/null; then
  log "installing qemu-user-static binfmt-support debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static binfmt-support debootstrap >/dev/null
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || { echo "arm64_rootfs: qemu-aarch64 binfmt is not registered" >&2; exit 3; }

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

# A Raspberry Pi 4 style /proc/cpuinfo, bind-mounted over the emulated one by the scripts that run
# here: onnxruntime segfaults on import when it reads the host's x86 cpuinfo.
cat >"$ROOT/.pi4-cpuinfo" <<'INFO'
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
INFO
