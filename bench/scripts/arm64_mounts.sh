# Sourced by arm64_check.sh and arm64_icount.sh: what the emulated aarch64 root needs mounted while
# the runtimes run in it, with the traps of ../shared/notes/arm64-emulation.md avoided.
#   arm64_mount ROOT     /proc; /sys (without it XNNPACK picks other kernels, and a few int8 outputs
#                        differ by one); a Raspberry Pi 4 cpuinfo (written by arm64_rootfs.sh) over
#                        /proc/cpuinfo (onnxruntime segfaults on the host's x86 one)
#   arm64_umount ROOT    undo it (call from an EXIT trap)
arm64_mount() {
  mkdir -p "$1/proc" "$1/sys"
  mountpoint -q "$1/proc" || mount -t proc proc "$1/proc"
  mountpoint -q "$1/sys" || mount --bind /sys "$1/sys"
  mount --bind "$1/.pi4-cpuinfo" "$1/proc/cpuinfo"
}

arm64_umount() {
  umount "$1/proc/cpuinfo" 2>/dev/null || true
  umount "$1/proc" 2>/dev/null || true
  umount "$1/sys" 2>/dev/null || true
}
