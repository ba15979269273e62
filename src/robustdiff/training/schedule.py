"""The reference's "cosinew" schedule: PyTorch's OneCycleLR over *epochs*, stepped once per epoch.

Re-implemented (same formula as ``torch.optim.lr_scheduler.OneCycleLR`` with its defaults: cosine
annealing, div 25, final div 1e4, momentum 0.95 → 0.85 → 0.95) so that one edge case does not crash:
with pct_start 0.025 and exactly 40 epochs the warm-up phase has zero length and OneCycleLR divides
by zero. Everywhere else the values are identical (tested against OneCycleLR).
"""

from __future__ import annotations

import math

import torch


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


class CosineW(torch.optim.lr_scheduler.LRScheduler):
    def __init__(self, optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int, pct_start: float = 0.025,
                 div_factor: float = 25.0, final_div_factor: float = 1e4, cycle_momentum: bool = True,
                 base_momentum: float = 0.85, max_momentum: float = 0.95, last_epoch: int = -1):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps, self.cycle_momentum = total_steps, cycle_momentum
        initial = max_lr / div_factor
        # (end step, lr start, lr end, momentum start, momentum end)
        self.phases = [
            (float(pct_start * total_steps) - 1, initial, max_lr, max_momentum, base_momentum),
            (float(total_steps) - 1, max_lr, initial / final_div_factor, base_momentum, max_momentum),
        ]
        if cycle_momentum:
            for group in optimizer.param_groups:
                group["momentum"] = max_momentum
        super().__init__(optimizer, last_epoch)

    def _values(self, step: int) -> tuple[float, float]:
        start = 0.0
        for i, (end, lr0, lr1, m0, m1) in enumerate(self.phases):
            if step <= end or i == len(self.phases) - 1:
                pct = (step - start) / (end - start) if end != start else 1.0
                return _cos(lr0, lr1, pct), _cos(m0, m1, pct)
            start = end
        raise AssertionError("unreachable")

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(f"cosinew stepped {step} times but was built for {self.total_steps} epochs")
        lr, momentum = self._values(step)
        if self.cycle_momentum:
            for group in self.optimizer.param_groups:
                group["momentum"] = momentum
        return [lr for _ in self.optimizer.param_groups]
