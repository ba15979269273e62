"""Test-only networks for ``model._target_=...``: modules robustdiff knows nothing about."""

from __future__ import annotations

from torch import nn


class TinyNet(nn.Module):
    """A small CNN with no mean/std arguments (robustdiff wraps it in its normalising module)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, channels: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def not_a_module(**kwargs):
    """A callable that is not an nn.Module class (refused as a model._target_)."""
    return nn.Linear(1, 1)
