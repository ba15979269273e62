"""EDM sampling: the σ schedule, the Heun sampler (EDM Algorithm 2), and batch-invariant noise.

The sampler only needs a denoiser ``net(x, sigma, class_labels, **kw) -> D(x; σ)`` (k-diffusion style),
so any preconditioned network can be swapped in.

Reproducibility across batch sizes and GPU counts: image ``i`` (a *global* index into the generated
set) always gets its noise from its own ``torch.Generator`` (CPU), seeded by ``image_seed(seed, i)``,
and its class label is ``i % num_classes``. Any partition of the indices into batches or processes
therefore yields the same images, up to float32 differences between convolution kernels at different
batch sizes (observed ≤ 1e-6 in the float64 solver state on CPU).
Class balance: among indices 0..N−1 every class appears ⌊N/K⌋ or ⌈N/K⌉ times, exactly N/K when K
divides N (SPEC §7: the reference reuses the same seeds per class; we use distinct seeds).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from robustdiff.diffusion.edm import to_uint8

__all__ = [
    "edm_sampler",
    "generators_for_indices",
    "image_seed",
    "labels_for_indices",
    "latents_for_indices",
    "sample_images",
    "sigma_schedule",
]

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def image_seed(seed: int, index: int) -> int:
    """64-bit seed of image ``index`` under run seed ``seed``: splitmix64(splitmix64(seed) XOR index).
    Both must be non-negative ints below 2**64. Changing this changes every generated image."""
    if not (0 <= seed <= _MASK64 and 0 <= index <= _MASK64):
        raise ValueError(f"seed {seed} and index {index} must be integers in [0, 2**64)")
    return _splitmix64(_splitmix64(seed) ^ index)


def generators_for_indices(indices: Sequence[int], seed: int) -> list[torch.Generator]:
    """One CPU generator per global image index (CPU so the stream is the same on every device)."""
    return [torch.Generator().manual_seed(image_seed(seed, int(i))) for i in indices]


def _draw(generators: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators])


def latents_for_indices(indices: Sequence[int], shape: Sequence[int], seed: int) -> torch.Tensor:
    """Standard-normal float32 latents (len(indices), *shape) on the CPU; row j depends only on
    (seed, indices[j])."""
    return _draw(generators_for_indices(indices, seed), shape)


def labels_for_indices(indices: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class label of each global image index: ``index % num_classes`` (int64 tensor)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
    return torch.as_tensor(np.asarray(indices, dtype=np.int64)) % num_classes


def sigma_schedule(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                   device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """EDM time steps: σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ for i < N, then σ_N = 0.

    Returns N + 1 values (decreasing, trailing 0). For N = 1 the single step goes from σ_max to 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be ≥ 1, got {num_steps}")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    if num_steps == 1:
        sigmas = torch.full([1], float(sigma_max), dtype=torch.float64, device=device)
    else:
        a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        sigmas = (a + i / (num_steps - 1) * (b - a)) ** rho
    return torch.cat([sigmas, torch.zeros_like(sigmas[:1])]).to(dtype)


@torch.no_grad()
def edm_sampler(net: Callable, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
                num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
                dtype: torch.dtype = torch.float64, autocast_dtype: torch.dtype | None = None,
                randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like) -> torch.Tensor:
    """Heun's 2nd-order sampler with optional churn (EDM Algorithm 2).

    latents: (B, C, R, R) standard normal; class_labels as the denoiser accepts them (e.g. (B,) ints).
    The solver state is ``dtype`` (float64); the network runs in float32, or under autocast with
    ``autocast_dtype``. ``randn_like`` supplies churn noise (only called when S_churn > 0).
    Network evaluations: 2·num_steps − 1. Returns the final x (B, C, R, R) in ``dtype``, ≈[−1, 1]
    (not clipped; ``to_uint8`` clips).
    """
    # Respect the network's supported σ range (EDMPrecond: [0, ∞); VPPrecond: finite).
    sigma_min = max(sigma_min, getattr(net, "sigma_min", 0.0))
    sigma_max = min(sigma_max, getattr(net, "sigma_max", float("inf")))
    t_steps = sigma_schedule(num_steps, sigma_min, sigma_max, rho, device=latents.device, dtype=dtype)
    net_kwargs = {} if autocast_dtype is None else {"autocast_dtype": autocast_dtype}

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(x, t.expand(x.shape[0]), class_labels, **net_kwargs).to(dtype)

    x_next = latents.to(dtype) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(itertools.pairwise(t_steps)):
        x_cur = x_next

        # Churn: temporarily raise the noise level to t_hat = (1 + γ)·t_cur.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= float(t_cur) <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if gamma > 0:
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step from t_hat to t_next.
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # 2nd-order (trapezoidal) correction, except on the last step into σ = 0.
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def sample_images(net, indices: Sequence[int], num_classes: int, seed: int, num_steps: int = 18,
                  batch_size: int = 256, device: torch.device | str | None = None,
                  autocast_dtype: torch.dtype | None = None, **sampler_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Generate the images with the given global indices.

    net: an EDMPrecond/VPPrecond (uses img_channels, img_resolution, label_dim). Labels are
    ``labels_for_indices(indices, num_classes)``; for an unconditional net (label_dim 0) the returned
    labels are −1. Returns (uint8 (N, R, R, C) numpy, int64 (N,) numpy), in the order of ``indices``.
    Churn noise (S_churn > 0) is also drawn from each image's own generator, so it stays batch-invariant.
    """
    indices = [int(i) for i in indices]
    device = torch.device(device) if device is not None else next(net.parameters()).device
    conditional = getattr(net, "label_dim", 0) > 0
    if conditional and net.label_dim != num_classes:
        raise ValueError(f"sample_images: network has label_dim {net.label_dim} but num_classes is {num_classes}")
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    labels = labels_for_indices(indices, num_classes)
    images = np.empty((len(indices), shape[1], shape[2], shape[0]), dtype=np.uint8)
    was_training = net.training
    net.eval()  # dropout off; restored below
    try:
        _sample_into(net, images, indices, labels if conditional else None, seed, shape, num_steps, batch_size,
                     device, autocast_dtype, sampler_kwargs)
    finally:
        net.train(was_training)
    out_labels = labels.numpy() if conditional else np.full(len(indices), -1, dtype=np.int64)
    return images, out_labels


def _sample_into(net, images, indices, labels, seed, shape, num_steps, batch_size, device, autocast_dtype,
                 sampler_kwargs) -> None:
    for start in range(0, len(indices), batch_size):
        batch_idx = indices[start:start + batch_size]
        gens = generators_for_indices(batch_idx, seed)
        latents = _draw(gens, shape).to(device)

        def churn_noise(x: torch.Tensor, gens=gens) -> torch.Tensor:
            return _draw(gens, x.shape[1:]).to(device=x.device, dtype=x.dtype)

        batch_labels = None if labels is None else labels[start:start + batch_size].to(device)
        x = edm_sampler(net, latents, batch_labels, num_steps=num_steps, autocast_dtype=autocast_dtype,
                        randn_like=churn_noise, **sampler_kwargs)
        images[start:start + len(batch_idx)] = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
