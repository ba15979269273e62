"""What the hardware runs fast: used to resolve ``precision=auto``."""

from __future__ import annotations

import torch


def fast_bf16(device: torch.device | str) -> bool:
    """True where bf16 matrix arithmetic has hardware support: CUDA GPUs with bf16 (Ampere and newer), CPUs with
    AMX tiles (Sapphire Rapids and newer) or AVX512-BF16. Elsewhere bf16 is emulated and slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return False


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto`` -> ``bf16-mixed`` where :func:`fast_bf16` holds for the accelerator the run uses, else ``32-true``."""
    if precision != "auto":
        return precision
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        device = "cuda"
    else:
        device = "cpu"
    return "bf16-mixed" if fast_bf16(device) else "32-true"
