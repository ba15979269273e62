"""Feature statistics of a set of images and the Fréchet distance between two of them (FID, classifier FD).

* **Statistics** of a set of images are the mean μ and covariance Σ (float64) of its features, accumulated
  by ``torchmetrics.image.fid.FrechetInceptionDistance`` (sums of features and of their outer products in
  float64), exactly as EDM's ``fid.py``: μ = Σx / n, Σ = (Σxxᵀ − n·μμᵀ) / (n − 1).
* **Fréchet distance** between two sets of statistics, EDM's formula:
  ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2·sqrtm(Σ₁Σ₂)), with ``scipy.linalg.sqrtm`` and the real part.

Reference statistics are ``.npz`` files with ``mu`` and ``sigma`` (EDM's ``fid-refs/*.npz`` layout, so EDM's
published CIFAR-10 file loads as is); robustdiff also stores a ``meta`` JSON string (feature space,
classifier sha256, source of the images) that ``robustdiff-fid score`` checks before comparing. The feature
networks are in ``robustdiff.evaluation.features``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..utils.io import atomic_path
from ..utils.progress import progress_bar


class QualityError(ValueError):
    """Bad input to a generator-quality measurement; the message names the file or field and the fix."""


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2·sqrtm(Σ₁Σ₂)) in float64, the real part (EDM's ``fid.py``)."""
    import scipy.linalg

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise QualityError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                           f"{sigma2.shape} (features of different networks?)")
    m = np.square(mu1 - mu2).sum()
    s = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(m + np.trace(sigma1 + sigma2 - 2 * s)))


@dataclass
class Statistics:
    """μ (D,) and Σ (D, D) in float64 of ``n`` images' features, and what they were computed from."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    meta: dict[str, Any] = field(default_factory=dict)

    def distance(self, other: Statistics) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


def save_statistics(path: str | os.PathLike, stats: Statistics) -> Path:
    """Write ``mu``, ``sigma`` (EDM's layout) plus ``n`` and a ``meta`` JSON string, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n),
                 meta=np.array(json.dumps(stats.meta, sort_keys=True)))
    return path


def load_statistics(path: str | os.PathLike) -> Statistics:
    """Reference statistics from an ``.npz`` with ``mu`` and ``sigma`` (EDM's or ours); never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise QualityError(f"reference statistics {path}: no such file (make one with `robustdiff-fid ref`, or use "
                           f"EDM's fid-refs/*.npz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z or "sigma" not in z:
                raise QualityError(f"reference statistics {path}: needs arrays 'mu' and 'sigma' (EDM's fid-refs "
                                   f"layout), found {sorted(z.files)}")
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            n = int(z["n"]) if "n" in z else 0
            meta = json.loads(str(z["meta"])) if "meta" in z else {"features": "inception", "source": "external"}
    except (OSError, ValueError) as e:
        if isinstance(e, QualityError):
            raise
        raise QualityError(f"reference statistics {path}: not a readable .npz ({e})") from e
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise QualityError(f"reference statistics {path}: mu is {mu.shape} and sigma {sigma.shape}; expected (D,) "
                           f"and (D, D)")
    return Statistics(mu, sigma, n, meta)


def compute_statistics(extractor: nn.Module, batches: Iterable[tuple[np.ndarray, Any]], *,
                       device: str | torch.device | None = "cpu", meta: dict[str, Any] | None = None,
                       progress: bool = False, total: int | None = None) -> Statistics:
    """μ, Σ of ``extractor``'s features of uint8 (b, H, W, C) image batches, accumulated by torchmetrics' FID."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from ..utils.hardware import torch_device

    dev = torch_device(device)
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=True).to(dev)
    bar = progress_bar(total, "features", progress, unit_scale=False)
    with torch.inference_mode():
        for images, _ in batches:
            x = torch.from_numpy(np.ascontiguousarray(images)).to(dev).permute(0, 3, 1, 2)
            metric.update(x, real=False)
            bar.update(len(images))
    bar.close()
    n = int(metric.fake_features_num_samples)
    if n < 2:
        raise QualityError(f"statistics need at least 2 images, got {n}")
    total_sum = metric.fake_features_sum.double().cpu().numpy()
    cov_sum = metric.fake_features_cov_sum.double().cpu().numpy()
    mu = total_sum / n
    sigma = (cov_sum - n * np.outer(mu, mu)) / (n - 1)
    return Statistics(mu, sigma, n, dict(meta or {}))


__all__ = [
    "QualityError", "Statistics", "frechet_distance", "save_statistics", "load_statistics",
    "compute_statistics",
]
