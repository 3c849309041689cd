"""Which autocast a recipe's `train.amp` gets on this device, and why (the train run prints both).

On a GPU, bf16 where it has it, else fp16 with a grad scaler. On a CPU, bf16 autocast only pays where the
CPU computes bf16 natively (avx512_bf16 or AMX on x86): elsewhere oneDNN emulates it, and a training step
runs 10-30x slower than in fp32, so such CPUs train in fp32.

Attention under CPU bf16 autocast: torch's fused attention kernel on the CPU is 2-4x slower than plain
matmul + softmax at ViT token counts (65-257 tokens; equal at about 1,000), and its backward 3-5x
(benchmarks/RESULTS.md), so training steps there run timm's attention unfused (`explicit_attention`). The
same function, computed in other kernels: outputs agree within bf16 rounding. fp32 and GPUs keep the fused
kernel, which is as fast or faster there.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import time
from typing import Iterator

import torch
from torch import nn

# The flags that decide CPU training speed, as lscpu names them, and torch's check for each.
CPU_FLAG_CHECKS = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported",
                   "avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported"}
X86 = ("x86_64", "amd64", "i386", "i686")
PROBE_MIN_SPEEDUP = 1.2  # where no flag tells (not x86): bf16 must beat fp32 clearly to be chosen


def cpu_flags() -> dict[str, bool]:
    """What torch finds this CPU (and OS) can run: {"avx2": True, "avx512_bf16": False, ...}."""
    return {flag: bool(getattr(torch.cpu, check, lambda: False)()) for flag, check in CPU_FLAG_CHECKS.items()}


def cpu_flags_line() -> str:
    """`avx2 yes, avx512f no, ...`: the CPU facts a speed figure depends on."""
    return ", ".join(f"{flag} {'yes' if on else 'no'}" for flag, on in cpu_flags().items())


def _matmul_seconds(dtype: torch.dtype | None, n: int = 384, repeats: int = 3) -> float:
    a, b = torch.randn(n, n, generator=torch.Generator().manual_seed(0)), torch.randn(n, n)
    best = float("inf")
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        a @ b  # warm-up: kernel selection and packing
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - started)
    return best


def probe_bf16_speedup() -> float:
    """fp32 time / bf16-autocast time of one matmul (best of a few; a fraction of a second)."""
    return _matmul_seconds(None) / max(_matmul_seconds(torch.bfloat16), 1e-9)


@functools.cache
def cpu_bf16() -> tuple[bool, str]:
    """(bf16 autocast pays on this CPU, why); decided once per process."""
    flags = cpu_flags()
    native = [flag for flag in ("avx512_bf16", "amx_tile") if flags[flag]]
    if native:
        return True, f"this CPU computes bf16 natively ({', '.join(native)})"
    if platform.machine().lower() in X86:
        return False, ("this CPU has no native bf16 (no avx512_bf16 or AMX): bf16 autocast would be emulated, "
                       "many times slower than fp32")
    speedup = probe_bf16_speedup()
    if speedup >= PROBE_MIN_SPEEDUP:
        return True, f"a probe matmul ran {speedup:.1f}x faster in bf16 than in fp32 on this CPU"
    return False, f"a probe matmul ran {speedup:.2f}x as fast in bf16 as in fp32 on this CPU: fp32 is faster"


def choose_autocast(amp: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """(the autocast dtype for a recipe's `amp` on `device` (None: full precision), why)."""
    if amp == "off":
        return None, "train.amp: off"
    if device.type != "cuda":
        fast, why = cpu_bf16()  # CPU autocast has no fp16 path worth having
        return (torch.bfloat16 if fast else None), f"train.amp: {amp}; {why}"
    # bf16 has fp32's range: no grad scaler, no overflow, and as fast as fp16 on the GPUs that have it.
    # fp16 (with the scaler) only where bf16 is missing (pre-Ampere).
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16, f"train.amp: {amp}; this GPU computes bf16 natively"
    return torch.float16, f"train.amp: {amp}; this GPU has no native bf16"


def unfused_attention_modules(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> list[nn.Module]:
    """The timm attention modules a training step should run unfused (see the module comment): all of
    them under bf16 autocast on a CPU, none elsewhere."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return []
    return [m for m in model.modules() if getattr(m, "fused_attn", None) is True]


@contextlib.contextmanager
def explicit_attention(modules: list[nn.Module]) -> Iterator[None]:
    """These attention modules compute q·kᵀ, softmax and ·v as separate ops inside the block (timm's
    `fused_attn` switch, read at every forward), fused again after it."""
    for module in modules:
        module.fused_attn = False
    try:
        yield
    finally:
        for module in modules:
            module.fused_attn = True
