"""Non-leaky augmentation for EDM training (Karras et al. 2022, App. F.2; SPEC §7).

Each image is augmented with probability-weighted geometric transforms and the network is told which
ones through a 9-vector, so it learns the augmented distribution as a *separate, labelled* task. At
sampling time the conditioning is absent (None), so augmentations don't leak into samples.

Conditioning layout (always 9 columns; a disabled or not-drawn op contributes zeros):

    [xflip, yflip, scale, cos θ − 1, sin θ, aniso·cos r, aniso·sin r, tx, ty]

xflip/yflip ∈ {0, 1}; scale = log2 isotropic scale / scale_std (a standard-normal draw); θ rotation
angle; aniso = log2 anisotropic scale / aniso_std, r the angle of its axis; tx, ty = translation in
units of translate_frac_std × image size (standard-normal draws).

Defaults are EDM's CIFAR-10 setting: overall p = 0.12, x-flip multiplier 1e8 (so a fair coin flip is
always drawn), all other ops with multiplier 1 (probability 0.12 each). Geometric ops are composed into
one inverse affine map per image and applied with ``grid_sample`` (bilinear, reflection padding) to the
images that drew a non-identity transform; NVIDIA's release instead resamples through a 2× wavelet
up-sampling, which aliases less but is not needed for the conditioning semantics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["AUGMENT_DIM", "AugmentPipe"]

AUGMENT_DIM = 9


def _rotate(theta: torch.Tensor) -> torch.Tensor:
    c, s = theta.cos(), theta.sin()
    z, o = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack([c, -s, z, s, c, z, z, z, o], dim=-1).reshape(-1, 3, 3)


def _scale(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    z, o = torch.zeros_like(sx), torch.ones_like(sx)
    return torch.stack([sx, z, z, z, sy, z, z, z, o], dim=-1).reshape(-1, 3, 3)


def _translate(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    z, o = torch.zeros_like(tx), torch.ones_like(tx)
    return torch.stack([o, z, tx, z, o, ty, z, z, o], dim=-1).reshape(-1, 3, 3)


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
        N, _, H, W = images.shape
        dev = images.device
        f32 = torch.float32

        def rand(*shape):
            return torch.rand(shape, device=dev, generator=generator, dtype=f32)

        def randn(*shape):
            return torch.randn(shape, device=dev, generator=generator, dtype=f32)

        def gate(w: torch.Tensor, multiplier: float) -> torch.Tensor:
            # Keep w where this op is drawn (probability multiplier·p), else 0 (= identity).
            drawn = rand(*w.shape[-1:]) < multiplier * self.p
            return torch.where(drawn, w, torch.zeros_like(w))

        zeros = torch.zeros(N, device=dev, dtype=f32)
        labels = torch.zeros(N, AUGMENT_DIM, device=dev, dtype=f32)

        # Pixel blitting: flips are exact.
        if self.xflip > 0:
            w = gate(torch.randint(2, (N,), device=dev, generator=generator).to(f32), self.xflip)
            images = torch.where(w.bool()[:, None, None, None], images.flip(3), images)
            labels[:, 0] = w
        if self.yflip > 0:
            w = gate(torch.randint(2, (N,), device=dev, generator=generator).to(f32), self.yflip)
            images = torch.where(w.bool()[:, None, None, None], images.flip(2), images)
            labels[:, 1] = w

        # Geometric ops, composed as the inverse map G_inv: output pixel → input pixel, in pixel units
        # centred on the image (x right, y down).
        G_inv = torch.eye(3, device=dev, dtype=f32).expand(N, 3, 3)
        moved = torch.zeros(N, dtype=torch.bool, device=dev)
        if self.scale > 0:
            w = gate(randn(N), self.scale)
            s = torch.exp2(w * self.scale_std)
            G_inv = G_inv @ _scale(1 / s, 1 / s)
            labels[:, 2] = w
            moved |= w != 0
        if self.rotate_frac > 0:
            theta = gate((rand(N) * 2 - 1) * (math.pi * self.rotate_frac_max), self.rotate_frac)
            G_inv = G_inv @ _rotate(theta)
            labels[:, 3] = theta.cos() - 1
            labels[:, 4] = theta.sin()
            moved |= theta != 0
        if self.aniso > 0:
            w = gate(randn(N), self.aniso)
            r = (rand(N) * 2 - 1) * math.pi
            r = torch.where(rand(N) < self.aniso_rotate_prob, r, zeros)
            s = torch.exp2(w * self.aniso_std)
            # Scale by (s, 1/s) along axes rotated by r; inverse = R(-r)·S(1/s, s)·R(r).
            G_inv = G_inv @ _rotate(-r) @ _scale(1 / s, s) @ _rotate(r)
            labels[:, 5] = w * r.cos()
            labels[:, 6] = w * r.sin()
            moved |= w != 0
        if self.translate_frac > 0:
            drawn = rand(N) < self.translate_frac * self.p
            t = torch.where(drawn, randn(2, N), torch.zeros(2, N, device=dev))
            G_inv = G_inv @ _translate(-t[0] * (W * self.translate_frac_std), -t[1] * (H * self.translate_frac_std))
            labels[:, 7] = t[0]
            labels[:, 8] = t[1]
            moved |= drawn & (t != 0).any(0)

        if moved.any():
            idx = moved.nonzero().flatten()
            # Pixel-centred units → grid_sample's normalised units (align_corners=False): x_n = 2·x_c / W.
            to_norm = torch.diag(torch.tensor([2 / W, 2 / H, 1.0], device=dev))
            from_norm = torch.diag(torch.tensor([W / 2, H / 2, 1.0], device=dev))
            theta = (to_norm @ G_inv[idx] @ from_norm)[:, :2]
            sub = images[idx]
            grid = F.affine_grid(theta.to(sub.dtype), list(sub.shape), align_corners=False)
            warped = F.grid_sample(sub, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
            images = images.index_copy(0, idx, warped)
        return images, labels
