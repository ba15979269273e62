"""EDM sampling: the σ schedule, the Heun sampler (EDM Algorithm 2), and batch-invariant noise.

The sampler only needs a denoiser ``net(x, sigma, class_labels, **kw) -> D(x; σ)`` (k-diffusion style),
so any preconditioned network can be swapped in.

Reproducibility across batch sizes and GPU counts: image ``i`` (a *global* index into the generated
set) always gets its noise from its own ``torch.Generator`` (CPU), seeded by ``image_seed(seed, i)``,
and its class label is ``i % num_classes``. Any partition of the indices into batches or processes
therefore yields the same images, up to float32 differences between convolution kernels at different
batch sizes (observed ≤ 1e-6 in the float64 solver state on CPU).
Class balance: among indices 0..N−1 every class appears ⌊N/K⌋ or ⌈N/K⌉ times, exactly N/K when K
divides N (the reference reuses the same seeds per class; we use distinct seeds).

``seeding="nvidia"`` instead reproduces NVIDIA's ``generate.py`` seed for seed: image i uses a generator
on the sampling device seeded with (seed + i) mod 2³² (so seed 0 ⇔ ``--seeds=0-(N−1)``); from it come the
latents, then a random class label (``randint(label_dim)``, so the classes are not balanced), then the
churn noise of *every* step in the solver's dtype, used only where the step churns. Also batch-invariant,
but the images depend on the device type (CPU and CUDA generators differ), as NVIDIA's do.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from robustdiff.diffusion.edm import to_uint8

__all__ = [
    "SEEDINGS",
    "edm_sampler",
    "generators_for_indices",
    "image_seed",
    "labels_for_indices",
    "latents_for_indices",
    "nvidia_generators",
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


def nvidia_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """NVIDIA generate.py's per-image generators: one on ``device`` per seed, seeded with seed mod 2³²."""
    return [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]


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
                randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
                noise_every_step: bool = False) -> torch.Tensor:
    """Heun's 2nd-order sampler with optional churn (EDM Algorithm 2).

    latents: (B, C, R, R) standard normal; class_labels as the denoiser accepts them (e.g. (B,) ints).
    The solver state is ``dtype`` (float64); the network runs in float32, or under autocast with
    ``autocast_dtype``. ``randn_like`` supplies churn noise: by default it is called only on steps that
    churn (γ > 0); with ``noise_every_step`` it is called on every step and the noise is added with
    weight sqrt(t_hat² − t_cur²), zero where the step does not churn — NVIDIA's generate.py, which keeps
    a seeded noise stream identical to theirs when S_min/S_max exclude some steps.
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
        if gamma > 0 or noise_every_step:
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step from t_hat to t_next.
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # 2nd-order (trapezoidal) correction, except on the last step into σ = 0.
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


SEEDINGS = ("robustdiff", "nvidia")


def sample_images(net, indices: Sequence[int], num_classes: int, seed: int, num_steps: int = 18,
                  batch_size: int = 256, device: torch.device | str | None = None,
                  autocast_dtype: torch.dtype | None = None, seeding: str = "robustdiff",
                  **sampler_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Generate the images with the given global indices.

    net: an EDMPrecond/VPPrecond (uses img_channels, img_resolution, label_dim).
    seeding "robustdiff" (default): labels are ``labels_for_indices(indices, num_classes)`` (class-balanced),
    noise from ``generators_for_indices`` on the CPU; churn noise (S_churn > 0) also comes from each image's
    own generator, so the images do not depend on the batch size.
    seeding "nvidia": NVIDIA generate.py's images for seeds ``seed + i`` (module docstring): random labels.
    For an unconditional net (label_dim 0) the returned labels are −1.
    Returns (uint8 (N, R, R, C) numpy, int64 (N,) numpy), in the order of ``indices``.
    """
    if seeding not in SEEDINGS:
        raise ValueError(f"seeding {seeding!r}: choose one of {', '.join(SEEDINGS)}")
    indices = [int(i) for i in indices]
    device = torch.device(device) if device is not None else next(net.parameters()).device
    conditional = getattr(net, "label_dim", 0) > 0
    if conditional and net.label_dim != num_classes:
        raise ValueError(f"sample_images: network has label_dim {net.label_dim} but num_classes is {num_classes}")
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    images = np.empty((len(indices), shape[1], shape[2], shape[0]), dtype=np.uint8)
    labels = np.full(len(indices), -1, dtype=np.int64)
    was_training = net.training
    net.eval()  # dropout off; restored below
    try:
        for start in range(0, len(indices), batch_size):
            batch_idx = indices[start:start + batch_size]
            draw = _nvidia_draws if seeding == "nvidia" else _robustdiff_draws
            latents, batch_labels, churn_noise = draw(batch_idx, seed, shape, num_classes if conditional else 0,
                                                      device)
            x = edm_sampler(net, latents, batch_labels, num_steps=num_steps, autocast_dtype=autocast_dtype,
                            randn_like=churn_noise, noise_every_step=seeding == "nvidia", **sampler_kwargs)
            images[start:start + len(batch_idx)] = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
            if batch_labels is not None:
                labels[start:start + len(batch_idx)] = batch_labels.cpu().numpy()
    finally:
        net.train(was_training)
    return images, labels


def _robustdiff_draws(batch_idx, seed, shape, num_classes, device):
    """Latents, labels (or None) and churn noise of our batch-invariant, class-balanced scheme."""
    gens = generators_for_indices(batch_idx, seed)

    def churn_noise(x: torch.Tensor) -> torch.Tensor:
        return _draw(gens, x.shape[1:]).to(device=x.device, dtype=x.dtype)

    labels = labels_for_indices(batch_idx, num_classes).to(device) if num_classes else None
    return _draw(gens, shape).to(device), labels, churn_noise


def _nvidia_draws(batch_idx, seed, shape, num_classes, device):
    """NVIDIA generate.py: per-image generators on ``device``; latents first, then a label per image, then
    churn noise drawn in the solver state's dtype and layout."""
    gens = nvidia_generators([seed + i for i in batch_idx], device)
    latents = torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])
    labels = None
    if num_classes:
        labels = torch.stack([torch.randint(num_classes, size=[], generator=g, device=device) for g in gens])

    def churn_noise(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, layout=x.layout, device=x.device)
                            for g in gens])

    return latents, labels, churn_noise
