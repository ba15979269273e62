"""Non-leaky augmentation for EDM training (Karras et al. 2022, App. F.2; docs/method.md, "The generator (EDM)").

Each image is augmented with probability-weighted geometric transforms and the network is told which
ones through a 9-vector, so it learns the augmented distribution as a *separate, labelled* task. At
sampling time the conditioning is absent (None), so augmentations don't leak into samples.

Conditioning layout (always 9 columns; a disabled or not-drawn op contributes zeros):

    [xflip, yflip, scale, cos θ − 1, sin θ, aniso·cos r, aniso·sin r, tx, ty]

xflip/yflip ∈ {0, 1}; scale = log2 isotropic scale / scale_std (a standard-normal draw); θ rotation
angle; aniso = log2 anisotropic scale / aniso_std, r the angle of its axis; tx, ty = translation in
units of translate_frac_std × image size (standard-normal draws).

Defaults are EDM's CIFAR-10 setting: overall p = 0.12, x-flip multiplier 1e8 (so a fair coin flip is
always drawn), all other ops with multiplier 1 (probability 0.12 each).

This is NVIDIA's pipe (NVlabs/edm ``training/augment.py``, the geometric part of StyleGAN2-ADA's):
for the same RNG state it makes the same draws, in the same order and shapes, so one seed gives the
same augmentations and labels. The geometric ops are composed into one inverse matrix per image and
applied by (1) reflect-padding by the batch's largest transformed-corner overhang plus the filter's
reach, (2) 2× upsampling with the sym6 wavelet low-pass filter, (3) bilinear ``grid_sample`` into a
2× canvas, (4) sym6 low-pass filtering and 2× downsampling — which aliases less than a plain
bilinear warp. Differences from NVIDIA's code (none beyond float round-off at EDM's settings):

- images that drew no geometric op are returned untouched (only flipped); NVIDIA's runs them through
  the filters too, which changes them by float round-off only (≤ ~1e-5 for images in [−1, 1]). At
  p = 0.12 about 40% of the images are resampled instead of all of them. The padding is still sized
  from the whole batch, so the resampled images are NVIDIA's;
- the label vector always has 9 columns (NVIDIA's drops the columns of disabled ops);
- an optional ``generator`` replaces the global RNG (None = the global RNG, as NVIDIA's);
- NVIDIA's integer rotation/translation and colour ops, which EDM never enables, are not provided.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["AUGMENT_DIM", "SYM6", "AugmentPipe"]

AUGMENT_DIM = 9

# Low-pass decomposition filter of Daubechies' symlet 6 (12 taps, orthonormal: Σh = √2,
# Σ h[k]·h[k+2n] = δ(n), so upsampling then downsampling with it is the identity).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)


def _matrix(entries: list, device: torch.device) -> torch.Tensor:
    """Row-major 3×3 entries (numbers or equal-shaped tensors) → (..., 3, 3) float32."""
    ref = next((e for e in entries if isinstance(e, torch.Tensor)), None)
    if ref is None:
        return torch.tensor(entries, dtype=torch.float32, device=device).reshape(3, 3)
    entries = [e.to(torch.float32) if isinstance(e, torch.Tensor)
               else torch.full(ref.shape, e, dtype=torch.float32, device=device) for e in entries]
    return torch.stack(entries, dim=-1).reshape(*ref.shape, 3, 3)


def _rotate(theta, device):
    return _matrix([theta.cos(), (-theta).sin(), 0, theta.sin(), theta.cos(), 0, 0, 0, 1], device)


def _scale(sx, sy, device):
    return _matrix([sx, 0, 0, 0, sy, 0, 0, 0, 1], device)


def _translate(tx, ty, device):
    return _matrix([1, 0, tx, 0, 1, ty, 0, 0, 1], device)


def _depthwise(x: torch.Tensor, taps: torch.Tensor, dim: int, **kwargs) -> torch.Tensor:
    """1-D filter `taps` along dim 2 (rows) or 3 (columns) of every channel; kwargs go to conv."""
    B, C, H, W = x.shape
    k = taps.reshape((1, 1, -1, 1) if dim == 2 else (1, 1, 1, -1))
    conv = kwargs.pop("conv", F.conv2d)
    out = conv(x.reshape(B * C, 1, H, W), k, **kwargs)
    return out.reshape(B, C, *out.shape[2:])


def _warp(images: torch.Tensor, G_inv: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """Apply the inverse maps G_inv (N, 3, 3) — output pixel → input pixel, centred pixel units, x right,
    y down — to the images with ``moved`` set, through NVIDIA's 2× sym6 resampling. The padding is
    sized from all N maps, as NVIDIA's is, so each image's result doesn't depend on which are skipped."""
    N, C, H, W = images.shape
    dev = images.device
    taps = torch.tensor(SYM6, dtype=images.dtype, device=dev)
    reach = len(SYM6) // 4  # the filter's reach in input pixels (3 for sym6)

    # Padding: the largest overhang of any transformed corner, plus the reach, within [0, size − 1].
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = torch.tensor([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1, 1, 1, 1]], dtype=torch.float32, device=dev)
    xy = (G_inv @ corners)[:, :2].transpose(0, 1).reshape(2, -1)  # (xy, N·4)
    over = torch.cat([-xy, xy]).amax(dim=1)  # left, top, right, bottom
    over = over + torch.tensor([reach * 2 - cx, reach * 2 - cy] * 2, device=dev)
    over = over.clamp(min=0).minimum(torch.tensor([W - 1, H - 1] * 2, dtype=torch.float32, device=dev))
    left, top, right, bottom = over.ceil().to(torch.int32).tolist()

    idx = moved.nonzero().flatten()
    x, G = images[idx], G_inv[idx]
    M = x.shape[0]
    x = F.pad(x, [left, right, top, bottom], mode="reflect")
    G = _translate((left - right) / 2, (top - bottom) / 2, dev) @ G

    # 2× upsampling: zero-interleave and filter with the reversed taps = a stride-2 transposed conv.
    x = _depthwise(x, taps, 3, conv=F.conv_transpose2d, stride=(1, 2), padding=(0, len(SYM6) // 2 - 1))
    x = _depthwise(x, taps, 2, conv=F.conv_transpose2d, stride=(2, 1), padding=(len(SYM6) // 2 - 1, 0))
    G = _scale(2, 2, dev) @ G @ _scale(1 / 2, 1 / 2, dev)
    G = _translate(-0.5, -0.5, dev) @ G @ _translate(0.5, 0.5, dev)

    # Resample into a 2× canvas of the image plus `reach` pixels each side (normalised coordinates).
    out_h, out_w = (H + reach * 2) * 2, (W + reach * 2) * 2
    G = _scale(2 / x.shape[3], 2 / x.shape[2], dev) @ G @ _scale(1 / (2 / out_w), 1 / (2 / out_h), dev)
    grid = F.affine_grid(G[:, :2, :].to(x.dtype), [M, C, out_h, out_w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Low-pass and 2× downsampling, keeping the centre H×W: output i reads canvas 2i + 1 … 2i + 12.
    x = _depthwise(x[:, :, :, 1:], taps, 3, stride=(1, 2))[:, :, :, :W]
    x = _depthwise(x[:, :, 1:, :], taps, 2, stride=(2, 1))[:, :, :H, :]
    return images.index_copy(0, idx, x)


class AugmentPipe:
    """images (B, C, H, W) float → (augmented images, conditioning (B, 9) float32). See module docstring."""

    def __init__(self, p: float = 0.12, xflip: float = 1e8, yflip: float = 1, scale: float = 1,
                 rotate_frac: float = 1, aniso: float = 1, translate_frac: float = 1, scale_std: float = 0.2,
                 rotate_frac_max: float = 1, aniso_std: float = 0.2, aniso_rotate_prob: float = 0.5,
                 translate_frac_std: float = 0.125):
        self.p = float(p)
        self.xflip = float(xflip)
        self.yflip = float(yflip)
        self.scale = float(scale)
        self.rotate_frac = float(rotate_frac)
        self.aniso = float(aniso)
        self.translate_frac = float(translate_frac)
        self.scale_std = float(scale_std)
        self.rotate_frac_max = float(rotate_frac_max)
        self.aniso_std = float(aniso_std)
        self.aniso_rotate_prob = float(aniso_rotate_prob)
        self.translate_frac_std = float(translate_frac_std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """Draws come from ``generator`` (on the images' device), or the global RNG when None."""
        N, _, H, W = images.shape
        dev = images.device

        # Every draw below matches NVIDIA's in order and shape; reordering them changes what a seed gives.
        def rand(*shape):
            return torch.rand(shape, device=dev, generator=generator)

        def randn(*shape):
            return torch.randn(shape, device=dev, generator=generator)

        def coin(shape):
            return torch.randint(2, shape, device=dev, generator=generator)

        labels = torch.zeros(N, AUGMENT_DIM, device=dev, dtype=torch.float32)

        # Pixel blitting: flips are exact. A fair coin, kept with probability multiplier·p.
        for col, on, dim in ((0, self.xflip, 3), (1, self.yflip, 2)):
            if on > 0:
                w = coin((N, 1, 1, 1))
                w = torch.where(rand(N, 1, 1, 1) < on * self.p, w, torch.zeros_like(w))
                images = torch.where(w == 1, images.flip(dim), images)
                labels[:, col] = w.flatten().to(torch.float32)

        # Geometric ops, composed left to right into the inverse map G_inv: output pixel → input pixel.
        G_inv = None

        def compose(*ms):
            nonlocal G_inv
            for m in ms:
                G_inv = m if G_inv is None else G_inv @ m

        zeros = torch.zeros(N, device=dev)
        if self.scale > 0:
            w = randn(N)
            w = torch.where(rand(N) < self.scale * self.p, w, zeros)
            s = (w * self.scale_std).exp2()
            compose(_scale(1 / s, 1 / s, dev))
            labels[:, 2] = w
        if self.rotate_frac > 0:
            theta = (rand(N) * 2 - 1) * (math.pi * self.rotate_frac_max)
            theta = torch.where(rand(N) < self.rotate_frac * self.p, theta, zeros)
            compose(_rotate(theta, dev))
            labels[:, 3] = theta.cos() - 1
            labels[:, 4] = theta.sin()
        if self.aniso > 0:
            w = randn(N)
            r = (rand(N) * 2 - 1) * math.pi
            w = torch.where(rand(N) < self.aniso * self.p, w, zeros)
            r = torch.where(rand(N) < self.aniso_rotate_prob, r, zeros)
            s = (w * self.aniso_std).exp2()
            # Scale by (s, 1/s) along axes rotated by r; its inverse is R(−r)·S(1/s, s)·R(r).
            compose(_rotate(-r, dev), _scale(1 / s, 1 / (1 / s), dev), _rotate(r, dev))
            labels[:, 5] = w * r.cos()
            labels[:, 6] = w * r.sin()
        if self.translate_frac > 0:
            t = randn(2, N)
            t = torch.where(rand(1, N) < self.translate_frac * self.p, t, torch.zeros_like(t))
            compose(_translate(-(t[0] * (W * self.translate_frac_std)), -(t[1] * (H * self.translate_frac_std)), dev))
            labels[:, 7] = t[0]
            labels[:, 8] = t[1]

        moved = labels[:, 2:].ne(0).any(dim=1)  # an unrotated aniso axis r alone is the identity
        if G_inv is not None and moved.any():
            images = _warp(images, G_inv.expand(N, 3, 3), moved)
        return images, labels
