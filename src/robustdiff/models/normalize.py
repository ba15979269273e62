"""A wrapper that puts a dataset's mean/std normalisation in front of any classifier.

robustdiff's models take images in [0, 1] and normalise inside ``forward`` (attacks work in pixel space). A
network whose constructor takes no ``mean``/``std`` is wrapped in `Normalized`, so it sees normalised inputs the
same way; its weights then sit under ``net.`` in the state dict.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def register_normalization(module: nn.Module, mean: Sequence[float], std: Sequence[float], in_channels: int,
                           owner: str) -> None:
    """Give ``module`` the non-persistent buffers ``mean``/``std`` of shape (1, C, 1, 1) that its ``forward``
    normalises with; one value is broadcast to every channel. ``owner`` names the model in the error."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    if mean_t.numel() not in (1, in_channels) or std_t.numel() not in (1, in_channels):
        raise ValueError(f"{owner}: mean/std need 1 or {in_channels} values, got {mean_t.tolist()} / "
                         f"{std_t.tolist()}")
    module.register_buffer("mean", mean_t.expand(in_channels).clone().view(1, in_channels, 1, 1), persistent=False)
    module.register_buffer("std", std_t.expand(in_channels).clone().view(1, in_channels, 1, 1), persistent=False)


class Normalized(nn.Module):
    """``net((x - mean) / std)`` for images x: (B, C, H, W) in [0, 1]; mean/std are non-persistent buffers."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], in_channels: int):
        super().__init__()
        register_normalization(self, mean, std, in_channels, "Normalized")
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)
