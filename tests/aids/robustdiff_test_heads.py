"""Test-only networks for classifier features: one without an nn.Linear head (refused as a feature network)."""

from __future__ import annotations

from torch import nn


class ConvHeadNet(nn.Module):
    """Logits from a 1×1 convolution and global pooling: no nn.Linear anywhere."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, channels: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.body(x)
