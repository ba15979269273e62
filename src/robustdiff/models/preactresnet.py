"""PreAct-ResNet-18 (He et al. 2016, "Identity Mappings in Deep Residual Networks"): the usual adversarial-training
baseline next to the WideResNet.

Blocks are BN → ReLU → conv(stride) → BN → ReLU → conv, with a 1×1 projection shortcut (on the activated input)
where the stride or the channel count changes; four stages of two blocks with ``width``, 2·, 4·, 8·``width``
channels, a final BN → ReLU, global average pooling and a linear head. As in ``robustdiff.models.wrn``, the
dataset's mean/std live inside the model as non-persistent buffers, so callers and attacks feed images in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .normalize import register_normalization


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
                         if stride != 1 or in_planes != planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        skip = self.shortcut(act) if self.shortcut is not None else x
        out = self.conv1(act)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """PreAct-ResNet with ``num_blocks`` blocks per stage. forward(x: (B, C, H, W) in [0, 1]) -> logits."""

    def __init__(
        self,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] = (0.4914, 0.4822, 0.4465),
        std: Sequence[float] = (0.2471, 0.2435, 0.2616),
        width: int = 64,
    ):
        super().__init__()
        if width < 1 or num_classes < 2 or in_channels < 1:
            raise ValueError(f"PreActResNet: width >= 1, num_classes >= 2, in_channels >= 1 (got {width}, "
                             f"{num_classes}, {in_channels})")
        self.width, self.num_classes, self.in_channels = width, num_classes, in_channels
        register_normalization(self, mean, std, in_channels, "PreActResNet")
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        planes, layers = width, []
        for i, n in enumerate(num_blocks):
            out_planes = width * 2 ** i
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(planes, out_planes, stride if j == 0 else 1))
                planes = out_planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, 8·width) of images x: (B, C, H, W) in [0, 1] (the input of ``linear``)."""
        out = self.conv1((x - self.mean) / self.std)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


class PreActResNet18(PreActResNet):
    """PreAct-ResNet-18: stages of [2, 2, 2, 2] blocks, ``width`` base channels (64 in the standard network)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 mean: Sequence[float] = (0.4914, 0.4822, 0.4465), std: Sequence[float] = (0.2471, 0.2435, 0.2616),
                 width: int = 64):
        super().__init__((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, mean=mean, std=std,
                         width=width)
