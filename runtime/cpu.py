"""What this CPU does to int8 ONNX models (standard library only: it ships with the runtime).

ONNX Runtime's x86 int8 convolutions and matrix products multiply uint8 activations by int8
weights with ``VPMADDUBSW`` unless the CPU has VNNI (AVX512-VNNI or AVX-VNNI, whose
``VPDPBUSD`` accumulates in 32 bits).  ``VPMADDUBSW`` adds two products into a signed 16-bit
lane that saturates: with full-range weights (-127..127) and activations up to 255 two products
reach 64,770 > 32,767, so an int8 model loses accuracy on such a CPU and only there.  Measured
here on an AMD EPYC with AVX2 and no VNNI: the test suite's small MNIST model kept 76% top-1
agreement with float (the check asks 97%; it passes on a VNNI CPU); 7-bit weights (-64..63, ONNX Runtime's ``reduce_range``) keep
every pair sum within 16 bits.  ARM CPUs (phones, Raspberry Pi) do not have this problem.
"""
from __future__ import annotations

import platform

__all__ = ["int8_saturation_risk", "cpu_flags"]

_VNNI = ("avx512_vnni", "avx_vnni", "avx512vnni", "avxvnni")


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The CPU feature flags from ``/proc/cpuinfo`` (Linux), or None where they cannot be read."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return None


def int8_saturation_risk(machine: str | None = None, cpuinfo: str | None = None) -> bool | None:
    """True where ONNX Runtime's int8 kernels saturate with full-range 8-bit weights (x86 without
    VNNI), False where they do not (x86 with VNNI, ARM and other CPUs), None where unknown (an x86
    machine whose flags cannot be read)."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return None
    return not any(f in flags for f in _VNNI)
