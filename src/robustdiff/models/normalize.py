"""A wrapper that puts a dataset's mean/std normalisation in front of any classifier.

robustdiff's models take images in [0, 1] and normalise inside ``forward`` (attacks work in pixel space). A
network whose constructor takes no ``mean``/``std`` is wrapped in `Normalized`, so it sees normalised inputs the
same way; its weights then sit under ``net.`` in the state dict.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalized(nn.Module):
    """``net((x - mean) / std)`` for images x: (B, C, H, W) in [0, 1]; mean/std are non-persistent buffers."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], in_channels: int):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean_t.numel() not in (1, in_channels) or std_t.numel() not in (1, in_channels):
            raise ValueError(f"Normalized: mean/std need 1 or {in_channels} values, got {mean_t.tolist()} / "
                             f"{std_t.tolist()}")
        self.net = net
        self.register_buffer("mean", mean_t.expand(in_channels).clone().view(1, in_channels, 1, 1), persistent=False)
        self.register_buffer("std", std_t.expand(in_channels).clone().view(1, in_channels, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)
