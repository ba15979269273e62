"""EDM preconditioning and training loss (Karras et al., 2022, Table 1), docs/method.md, "The generator (EDM)".

    D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ), labels)

EDM:  c_skip = σ_d² / (σ² + σ_d²),  c_out = σ·σ_d / sqrt(σ² + σ_d²),  c_in = 1 / sqrt(σ² + σ_d²),
      c_noise = ln(σ) / 4,  with σ_d = 0.5.
Loss: ln σ ~ N(P_mean, P_std²) = N(−1.2, 1.2²), n ~ N(0, σ²I),
      λ(σ) = (σ² + σ_d²) / (σ·σ_d)²,  loss = λ(σ)·|D(y + n; σ) − y|².

Images inside the generator are in [−1, 1] (``to_model_range``); ``to_uint8`` maps back.
F (a ``SongUNet``) runs in float32, or under ``torch.autocast`` when ``autocast_dtype`` is given; the
combination with the skip path is always float32. The wrapped network is the attribute ``model``, so a
pretrained EDM ``ema`` state dict (keys ``model.*``) loads strictly.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from robustdiff.models.unet import SongUNet

__all__ = [
    "EDMPrecond",
    "VPPrecond",
    "edm_coefficients",
    "edm_loss",
    "edm_loss_weight",
    "to_model_range",
    "to_uint8",
]


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in, c_noise) for noise levels ``sigma`` (any shape, same shape out)."""
    sd2 = sigma_data ** 2
    c_skip = sd2 / (sigma ** 2 + sd2)
    c_out = sigma * sigma_data / (sigma ** 2 + sd2).sqrt()
    c_in = 1 / (sd2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²) / (σ·σ_d)² = 1 / c_out(σ)²: makes the effective target of F unit-variance."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def _class_labels(class_labels: torch.Tensor | None, label_dim: int, batch: int,
                  device: torch.device) -> torch.Tensor | None:
    """Labels → (B, label_dim) float32 one-hot. Accepts int class indices (B,), one-hot (B, label_dim),
    or None (all-zero vector, as EDM does for a conditional net called without labels)."""
    if label_dim == 0:
        if class_labels is not None:
            raise ValueError("class_labels given to an unconditional network (label_dim 0)")
        return None
    if class_labels is None:
        return torch.zeros([batch, label_dim], device=device)
    class_labels = class_labels.to(device)
    if not class_labels.is_floating_point():
        if class_labels.ndim != 1:
            raise ValueError(f"integer class_labels must have shape (B,), got {tuple(class_labels.shape)}")
        if class_labels.numel() and (class_labels.min() < 0 or class_labels.max() >= label_dim):
            raise ValueError(f"class_labels must lie in [0, {label_dim}); got range "
                             f"[{int(class_labels.min())}, {int(class_labels.max())}]")
        return nn.functional.one_hot(class_labels.long(), label_dim).to(torch.float32)
    return class_labels.to(torch.float32).reshape(-1, label_dim)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class _Precond(nn.Module):
    """Shared forward: D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise, labels), all in float32 outside F."""

    img_resolution: int
    img_channels: int
    label_dim: int
    model: SongUNet

    def coefficients(self, sigma: torch.Tensor):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None,
                autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x: (B, C, R, R) noisy images (any float dtype); sigma: scalar or (B,) noise level(s);
        class_labels: (B,) ints or (B, label_dim) one-hot or None; augment_labels: (B, augment_dim) or None;
        autocast_dtype: None/float32 for plain float32, or e.g. torch.bfloat16 to run F under autocast.
        Returns the float32 denoised estimate D(x; σ), same shape as x."""
        x = x.to(torch.float32)
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(batch) if sigma.numel() == 1 else sigma
        labels = _class_labels(class_labels, self.label_dim, batch, x.device)
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in self.coefficients(sigma))
        with _autocast(x.device, autocast_dtype):
            F_x = self.model(c_in * x, c_noise.flatten(), labels, augment_labels)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class EDMPrecond(_Precond):
    """EDM-preconditioned denoiser around a ``SongUNet``; kwargs beyond the listed ones go to SongUNet.

    Attributes mirror NVIDIA's EDMPrecond (img_resolution, img_channels, label_dim, sigma_min,
    sigma_max, sigma_data, model), so a pickle's saved values map one to one.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, sigma_min: float = 0.0,
                 sigma_max: float = float("inf"), sigma_data: float = 0.5, **unet_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = SongUNet(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                              label_dim=label_dim, **unet_kwargs)

    def coefficients(self, sigma: torch.Tensor):
        return edm_coefficients(sigma, self.sigma_data)


class VPPrecond(_Precond):
    """Variance-preserving preconditioning (Song et al. 2021 as written in EDM Table 1), for loading the
    'baseline-*-vp' checkpoints. σ(t) = sqrt(exp(β_d t²/2 + β_min t) − 1); c_skip = 1, c_out = −σ,
    c_in = 1/sqrt(σ² + 1), c_noise = (M − 1)·σ⁻¹(σ). Not used for training here (edm_loss is EDM's).

    ``sigma_min``/``sigma_max`` are σ(ε_t) and σ(1) in float32 (NVIDIA's values); the ``.pkl`` loader
    replaces them with the values stored in the pickle."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, beta_d: float = 19.9,
                 beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5, **unet_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))
        self.model = SongUNet(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                              label_dim=label_dim, **unet_kwargs)

    def sigma(self, t):
        """σ(t). A Python number is computed in float32, as NVIDIA's code does (σ_min = σ(ε_t) = 0.0009765625,
        not the float64 0.0010004976); a tensor keeps its dtype."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma: torch.Tensor):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise


def edm_loss(net: EDMPrecond, images: torch.Tensor, labels: torch.Tensor | None = None, augment_pipe=None,
             P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float | None = None,
             generator: torch.Generator | None = None, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """EDM denoising loss of one batch: a float32 scalar.

    images: (B, C, R, R) clean images in [−1, 1]; labels: (B,) ints, (B, label_dim) one-hot, or None.
    augment_pipe: optional callable images → (augmented images, (B, augment_dim) conditioning).
    Reduction: the per-pixel loss λ(σ)·(D − y)² is summed over C×H×W and averaged over the batch
    (NVIDIA sums everything and divides by the batch size, which is the same number).
    ``sigma_data`` defaults to ``net.sigma_data`` (pass it when ``net`` is a DDP/compile wrapper).
    ``generator`` (on the images' device) makes σ and the noise reproducible.
    """
    batch = images.shape[0]
    device = images.device
    rnd_normal = torch.randn([batch, 1, 1, 1], device=device, generator=generator)
    sigma = (rnd_normal * P_std + P_mean).exp()
    weight = edm_loss_weight(sigma, net.sigma_data if sigma_data is None else sigma_data)
    y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
    y = y.to(torch.float32)
    n = torch.randn(y.shape, device=device, generator=generator) * sigma
    D_yn = net(y + n, sigma.flatten(), labels, augment_labels=augment_labels, autocast_dtype=autocast_dtype)
    per_pixel = weight * (D_yn - y) ** 2
    return per_pixel.sum(dim=(1, 2, 3)).mean()


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] or float in [0, 1] → float32 in [−1, 1] (layout unchanged)."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 127.5 - 1
    if not images.is_floating_point():
        raise ValueError(f"to_model_range: expected uint8 or float images, got {images.dtype}")
    return images.to(torch.float32) * 2 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Generator output (≈[−1, 1]) → uint8 via clip(x·127.5 + 128, 0, 255) (truncation = round half up)."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)

