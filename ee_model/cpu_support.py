"""What this CPU runs fast: bf16 matrix units (AMX-BF16, AVX512-BF16), int8 dot products (VNNI, AMX-INT8).

Read from the CPU's flags (`/proc/cpuinfo` on Linux), capped as oneDNN is capped by `ONEDNN_MAX_CPU_ISA`
(set it to `AVX512_CORE_VNNI` to run as on a CPU without bf16 or AMX, `AVX2` as on one without VNNI either):
PyTorch's CPU kernels (oneDNN) then use no instruction above the cap, so neither may the choice made here.
On ARM (aarch64) the flags are the `Features` line (bf16; i8mm and asimddp for int8 dot products) and no
cap applies. Elsewhere (macOS) no flag is seen and the choice is fp32.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
ARM_BF16_FLAGS = ("bf16",)
ARM_INT8_FLAGS = ("i8mm", "asimddp")
ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}

# oneDNN's ISA names, lowest first, and the flags each one (and those above it) may use
ISA_ORDER = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX10_1_512",
    "AVX512_CORE_FP16",
    "AVX10_1_512_AMX",
    "AVX512_CORE_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX512_CORE_AMX_FP16",
)
LOWEST_ISA_OF_FLAG = {
    "avx_vnni": "AVX2_VNNI",
    "avx512_vnni": "AVX512_CORE_VNNI",
    "avx512_bf16": "AVX512_CORE_BF16",
    "amx_bf16": "AVX10_1_512_AMX",
    "amx_int8": "AVX10_1_512_AMX",
}


def cpuinfo_field(name: str) -> str | None:
    """The first CPU's `name` field of `/proc/cpuinfo` ("flags", "model name"; Linux), None where it cannot
    be read."""
    if platform.system() != "Linux":
        return None
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def machine_arch() -> str:
    """This machine's architecture: "x86_64", "aarch64", or what `platform.machine()` says."""
    machine = platform.machine()
    return ARCHES.get(machine.lower(), machine)


def read_cpu_flags(arch: str | None = None) -> frozenset[str]:
    """The CPU's feature flags (Linux: `flags` on x86, `Features` on ARM); empty where they cannot be
    read."""
    field = "Features" if (arch or machine_arch()) == "aarch64" else "flags"
    return frozenset((cpuinfo_field(field) or "").split())


def isa_allows(flag: str, cap: str | None) -> bool:
    """Whether oneDNN capped at `cap` (`ONEDNN_MAX_CPU_ISA`, None or "ALL": no cap) may use `flag`."""
    if cap is None or cap.upper() in ("", "ALL", "DEFAULT"):
        return True
    cap = cap.upper()
    if cap not in ISA_ORDER:
        return True  # an unknown name: oneDNN ignores it
    return ISA_ORDER.index(LOWEST_ISA_OF_FLAG[flag]) <= ISA_ORDER.index(cap)


@dataclass(frozen=True)
class CpuSupport:
    """The fast number formats this CPU offers (within the oneDNN cap), and what that was read from."""

    bf16: tuple[str, ...]  # the bf16 flags seen (and allowed)
    int8: tuple[str, ...]  # the int8 dot-product flags seen (and allowed)
    cap: str | None  # ONEDNN_MAX_CPU_ISA
    arch: str = "x86_64"  # `machine_arch`

    @property
    def has_bf16(self) -> bool:
        return bool(self.bf16)

    @property
    def has_int8(self) -> bool:
        return bool(self.int8)

    def describe(self) -> str:
        seen = [*self.bf16, *self.int8] or ["no bf16 or VNNI flag"]
        capped = f", ONEDNN_MAX_CPU_ISA={self.cap}" if self.cap else ""
        arch = "" if self.arch == "x86_64" else f" ({self.arch})"
        return f"CPU flags{arch}: {', '.join(seen)}{capped}"


def cpu_support(
    flags: frozenset[str] | None = None, cap: str | None = None, arch: str | None = None
) -> CpuSupport:
    """What the CPU (`flags`, default this one's) offers under the oneDNN cap (`cap`, default the
    environment's; x86 only). `arch`: default this machine's, or x86_64 for injected `flags` (what tests
    of an x86 CPU's decisions give, on any machine)."""
    arch = arch or (machine_arch() if flags is None else "x86_64")
    flags = read_cpu_flags(arch) if flags is None else flags
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") if cap is None else cap
    if arch == "aarch64":
        return CpuSupport(
            tuple(f for f in ARM_BF16_FLAGS if f in flags),
            tuple(f for f in ARM_INT8_FLAGS if f in flags),
            None,
            arch,
        )
    allowed = [f for f in (*BF16_FLAGS, *INT8_FLAGS) if f in flags and isa_allows(f, cap)]
    return CpuSupport(
        tuple(f for f in BF16_FLAGS if f in allowed),
        tuple(f for f in INT8_FLAGS if f in allowed),
        cap or None,
        arch,
    )
