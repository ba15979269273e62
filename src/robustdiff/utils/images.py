"""Image grids for figures: ``torchvision.utils.make_grid`` with padding, small images upscaled (nearest) so that
they can be seen, and text labels beside each row (and optionally under each image)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .io import atomic_path

SMALL = 32  # images of at most this many pixels a side are upscaled


def as_float_nchw(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) (numpy or torch) or float (N, C, H, W) in [0, 1] → float (N, C, H, W) in [0, 1] on the CPU."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        return x.permute(0, 3, 1, 2).float().div(255)
    return x.detach().float().cpu().clamp(0, 1)


def image_grid(images: torch.Tensor | np.ndarray, nrow: int, upscale: int = 4, padding: int = 2) -> np.ndarray:
    """Images (see ``as_float_nchw``) in rows of ``nrow`` → uint8 (H', W', C) with C as given (1 or 3), white
    padding; images of ≤ 32 px a side are upscaled ``upscale``× (nearest)."""
    from torchvision.utils import make_grid

    x = as_float_nchw(images)
    if x.shape[-1] <= SMALL and upscale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=upscale, mode="nearest")
    grid = make_grid(x, nrow=nrow, padding=padding, pad_value=1.0)
    if x.shape[1] == 1:
        grid = grid[:1]  # make_grid repeats a single channel three times
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def labelled_grid(images: torch.Tensor | np.ndarray, nrow: int, row_labels: Sequence[str],
                  cell_labels: Sequence[str] | None = None, cell_ok: Sequence[bool] | None = None,
                  upscale: int = 4, padding: int = 2, font_size: int = 14) -> np.ndarray:
    """``image_grid`` with ``row_labels[i]`` left of row i and, given ``cell_labels``, a caption under every image
    (green where ``cell_ok`` is true, red where false). Returns uint8 RGB (H, W, 3)."""
    from PIL import Image, ImageDraw

    x = as_float_nchw(images)
    n, side = x.shape[0], x.shape[-1] * (upscale if x.shape[-1] <= SMALL and upscale > 1 else 1)
    rows = -(-n // nrow)
    if len(row_labels) != rows:
        raise ValueError(f"labelled_grid: {rows} rows of {nrow} images but {len(row_labels)} row labels")
    if cell_labels is not None and len(cell_labels) != n:
        raise ValueError(f"labelled_grid: {n} images but {len(cell_labels)} cell labels")
    grid = image_grid(x, nrow, upscale, padding)
    if grid.shape[-1] == 1:
        grid = np.repeat(grid, 3, axis=-1)
    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max((measure.textbbox((0, 0), t, font=font)[2] for t in row_labels), default=0) + 2 * padding + 12
    cell = side + padding
    band = font_size + 4 if cell_labels is not None else 0  # caption band under each row of images
    height = padding + rows * (cell + band)
    canvas = Image.new("RGB", (margin + grid.shape[1], height), "white")
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        top = padding + r * (cell + band)
        canvas.paste(Image.fromarray(grid[r * cell:r * cell + cell + padding]), (margin, top - padding))
        draw.text((margin - padding - 4, top + side // 2), row_labels[r], fill="black", font=font, anchor="rm")
        if cell_labels is None:
            continue
        for c in range(nrow):
            i = r * nrow + c
            if i >= n:
                break
            colour = "black" if cell_ok is None else ("darkgreen" if cell_ok[i] else "red")
            draw.text((margin + padding + c * cell + side // 2, top + side + 2), cell_labels[i], fill=colour,
                      font=font, anchor="mt")
    return np.asarray(canvas)


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """uint8 (H, W, C) with C in {1, 3} → PNG, written atomically."""
    from PIL import Image

    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
    return Path(path)
