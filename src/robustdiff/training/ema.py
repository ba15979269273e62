"""Weight averaging exactly as the reference trains it (docs/method.md, "TRADES"), as one fused multi-tensor update."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(step: int, warmup_steps: float, tau: float = 0.995) -> float:
    """Decay of the update after optimiser step ``step``: the 1-based count of optimiser steps including the
    current one, as the reference passes its global step after incrementing it (docs/method.md, "TRADES").

    Before the warm-up (step < W) the average equals the live weights (decay 0); then
    min(τ, (1 + Δ) / (10 + Δ)) with Δ = step − W.
    """
    if step < warmup_steps:
        return 0.0
    delta = step - warmup_steps
    return min(tau, (1.0 + delta) / (10.0 + delta))


class EMA(nn.Module):
    """Holds the averaged model. Only parameters are averaged; BN statistics are copied at epoch end."""

    def __init__(self, model: nn.Module, tau: float = 0.995, warmup_steps: float = 0.0):
        super().__init__()
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.tau = tau
        self.warmup_steps = warmup_steps
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # A host copy of num_updates, so that a step never reads the device buffer (a GPU sync). The buffer stays
        # the checkpointed truth: after a load the copy is re-read once.
        self._host_updates: int | None = 0

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._host_updates = None
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        if self._host_updates is None:
            self._host_updates = int(self.num_updates)
        decay = ema_decay(self._host_updates + 1, self.warmup_steps, self.tau)  # this update's 1-based step
        ema_params = list(self.module.parameters())
        live_params = [p.detach() for p in model.parameters()]
        if decay == 0.0:
            torch._foreach_copy_(ema_params, live_params)
        else:
            # ema = decay·ema + (1 − decay)·live
            torch._foreach_lerp_(ema_params, live_params, 1.0 - decay)
        self.num_updates += 1
        self._host_updates += 1
        return decay

    @torch.no_grad()
    def copy_buffers(self, model: nn.Module) -> None:
        """The averaged model takes the live model's BatchNorm running statistics."""
        for (name, dst), (name2, src) in zip(self.module.named_buffers(), model.named_buffers()):
            assert name == name2, (name, name2)
            dst.copy_(src)
