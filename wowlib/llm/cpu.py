"""What this CPU can do, as the sampler and the trainer see it, and a cap to pretend it can do less.

CPUs of one machine kind differ (an AVX2-only AMD, an AVX-512 Xeon without AMX, one with AMX), and so
do the paths the code takes: bf16 or fp32, the compiled kernels or torch's ops. ``WOW_CPU_ISA`` caps
what the code may use, so that every path runs on any machine (CI runs the suite capped at AVX2):

- ``native`` (default): whatever the CPU has;
- ``avx512``: no AMX tiles (bf16 only where the CPU has AVX512-BF16);
- ``avx2``: no AVX-512 and no hardware bf16: fp32 everywhere, torch's attention and element-wise ops.

The cap governs this project's own choices; pair it with ``ONEDNN_MAX_CPU_ISA=AVX2`` to make
torch's matmuls take their AVX2 kernels too.
"""
from __future__ import annotations

import os

LEVELS = ("avx2", "avx512", "native")


def cap() -> str:
    value = os.environ.get("WOW_CPU_ISA", "native").strip().lower() or "native"
    if value not in LEVELS:
        raise ValueError(f"WOW_CPU_ISA must be one of {LEVELS}, got {value!r}")
    return value


def _torch_has(check: str) -> bool:
    import torch
    try:
        return bool(getattr(torch.cpu, check)())
    except AttributeError:
        return False


def has_amx() -> bool:
    """AMX tiles (bf16 matrix products in hardware; Xeon Sapphire Rapids and later), not capped."""
    return cap() == "native" and _torch_has("_is_amx_tile_supported")


def has_avx512() -> bool:
    return cap() != "avx2" and _torch_has("_is_avx512_supported")


def has_bf16() -> bool:
    """bf16 arithmetic in hardware (AMX or AVX512-BF16); elsewhere bf16 is emulated, slower than fp32."""
    return has_amx() or (cap() != "avx2" and _torch_has("_is_avx512_bf16_supported"))
