"""Training augmentation on whole batches, as tensor ops on the device (no per-image PIL).

Matches the reference torchvision pipelines: RandomCrop(size, padding, fill 0),
RandomHorizontalFlip(0.5), and for CIFAR-100 RandomRotation(15) with nearest interpolation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("none", "crop_flip", "crop_flip_rotate")


def draw(kind: str, shape: tuple[int, ...], generator: torch.Generator | None, device, index: torch.Tensor | None = None,
         total: int | None = None, high: int = 2, dtype=torch.float32) -> torch.Tensor:
    """Random numbers for the rows of a batch (uniform "rand", normal "randn", or "randint" in [0, high)).

    With ``index`` (this process's positions in a global batch of ``total`` rows) the numbers are
    drawn for the whole global batch and the rows at ``index`` are returned, so every DDP rank sees
    exactly the randomness a single process would give those images.
    """
    rows = shape[0] if index is None else total
    full = (rows, *shape[1:])
    if kind == "rand":
        out = torch.rand(full, generator=generator, device=device, dtype=dtype)
    elif kind == "randn":
        out = torch.randn(full, generator=generator, device=device, dtype=dtype)
    else:
        out = torch.randint(0, high, full, generator=generator, device=device)
    return out if index is None else out[index]


def to_float_nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) in [0, 1], stored channels_last (no copy of layout)."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None,
                index: torch.Tensor | None = None, total: int | None = None) -> torch.Tensor:
    """Zero-pad by `padding` and crop back to the original size at a random offset per image (any dtype)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = draw("randint", (b,), generator, x.device, index, total, high=2 * padding + 1)
    ox = draw("randint", (b,), generator, x.device, index, total, high=2 * padding + 1)
    # Every crop window as a view (B, C, 2p+1, 2p+1, H, W); one gather picks each image's window — whole
    # rows at a time, about twice as fast on a CPU as indexing every pixel.
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)
    return windows[torch.arange(b, device=x.device), :, oy, ox]


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None,
                 index: torch.Tensor | None = None, total: int | None = None) -> torch.Tensor:
    flip = draw("rand", (x.shape[0],), generator, x.device, index, total) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_rotate(x: torch.Tensor, degrees: float, generator: torch.Generator | None = None,
                  index: torch.Tensor | None = None, total: int | None = None) -> torch.Tensor:
    """Rotate each image by U(−degrees, degrees) about its centre, nearest neighbour, zero fill."""
    angle = (draw("rand", (x.shape[0],), generator, x.device, index, total) * 2 - 1) * math.radians(degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def augment_images(images: torch.Tensor, kind: str, padding: int = 4, generator: torch.Generator | None = None,
                   rotation: float = 15.0, index: torch.Tensor | None = None,
                   total: int | None = None) -> torch.Tensor:
    """uint8 (B, H, W, C) -> augmented float32 (B, C, H, W) in [0, 1]: what the training step feeds the model.

    Bitwise the same as ``augment_batch(to_float_nchw(images), ...)`` with the same generator: cropping,
    zero padding and flipping commute with the conversion, so they run on the uint8 pixels (a quarter of the
    bytes to move); the rotation (bilinear grids need floats) runs after it.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown augmentation {kind!r}; choose one of {KINDS}")
    x = images.permute(0, 3, 1, 2)
    if kind != "none":
        x = random_hflip(random_crop(x, padding, generator, index, total), generator, index, total)
    x = x.float().div_(255.0)
    if kind == "crop_flip_rotate":
        x = random_rotate(x, rotation, generator, index, total)
    return x


def augment_batch(x: torch.Tensor, kind: str, padding: int = 4, generator: torch.Generator | None = None,
                  rotation: float = 15.0, index: torch.Tensor | None = None, total: int | None = None) -> torch.Tensor:
    """Apply a dataset's training augmentation to a float batch (B, C, H, W) in [0, 1].

    ``index``/``total``: this rank's positions in the global batch (see ``draw``).
    """
    if kind == "none":
        return x
    if kind not in KINDS:
        raise ValueError(f"unknown augmentation {kind!r}; choose one of {KINDS}")
    x = random_hflip(random_crop(x, padding, generator, index, total), generator, index, total)
    if kind == "crop_flip_rotate":
        x = random_rotate(x, rotation, generator, index, total)
    return x
