"""What this CPU can run: the instruction-set flags that decide whether bf16 is worth offering.

bf16 is a per-op choice only where the CPU computes in bf16 natively (AVX-512 BF16 or AMX-BF16):
elsewhere oneDNN emulates it in fp32 with extra conversions, slower than fp32 itself, so offering
it would only waste trials. The decision is a pure function of a flag set, so it is testable
without the CPU at hand.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Iterable, Optional

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
NO_BF16 = "bf16 not offered: this CPU has neither avx512_bf16 nor amx_bf16"


def parse_cpuinfo(text: str) -> frozenset[str]:
    """The flags of the first processor listed in a Linux ``/proc/cpuinfo`` text."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags (Linux); an empty set elsewhere, so nothing optional is offered."""
    if not sys.platform.startswith("linux"):
        return frozenset()
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


def supports_bf16(flags: Iterable[str]) -> bool:
    return any(flag in BF16_FLAGS for flag in flags)


def bf16_unavailable_reason(flags: Optional[Iterable[str]] = None) -> Optional[str]:
    """None when bf16 is offered; otherwise the sentence saying why not."""
    return None if supports_bf16(cpu_flags() if flags is None else flags) else NO_BF16
