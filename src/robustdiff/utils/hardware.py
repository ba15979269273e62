"""What the hardware runs fast (``precision=auto``) and how torch.compile is set up for our steps."""

from __future__ import annotations

import torch

# Accepted values of the `compile` settings: off, on (torch.compile's default mode), or a torch.compile mode.


def torch_device(name: str | torch.device | None) -> torch.device:
    """The device a ``--device`` flag names: ``auto`` (or None) = the GPU when there is one, else the CPU; ``gpu``
    and ``gpu:N`` as the Hydra commands' ``trainer=gpu`` say it (= ``cuda``, ``cuda:N``); anything else as torch
    reads it (``cpu``, ``cuda``, ``cuda:1``)."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    given = name
    if isinstance(name, str) and (name == "gpu" or name.startswith("gpu:")):
        name = "cuda" + name[3:]
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {given}: not a device ({e}); choose auto, cpu, gpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {given}: no CUDA GPU is visible here; use --device cpu (or auto)")
    return device


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


def allow_graphs(n: int) -> None:
    """Let torch.compile keep at least ``n`` graphs per function before it falls back to eager (default 8).

    A TRADES step needs 3 (clean forward without grad, attack with frozen parameters, outer step) and the
    first step's BN momentum of 1 another 3; a second compiled model in the process (a benchmark) doubles
    that. Past the limit dynamo silently runs eager, a quiet performance cliff."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name and the older one
        if hasattr(config, name):
            setattr(config, name, max(int(getattr(config, name)), n))
