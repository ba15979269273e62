"""PGD attacks (ℓ∞ / ℓ2) with CE or CW-margin loss, and the BatchNorm handling that attacks need.

All images are (B, C, H, W) in [0, 1]; the model normalises internally.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..conf.schema import ATTACK_LOSSES

NORMS = ("linf", "l2")


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Batch statistics are used (in train mode) but running statistics are not updated."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.track_running_stats for m in bns]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, s in zip(bns, saved):
            m.track_running_stats = s


@contextlib.contextmanager
def input_grad_only(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad, so backward passes compute input gradients alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def cw_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """Carlini–Wagner margin, summed over the batch: -clamp(z_y - max_{j≠y} z_j, min=-kappa).

    Maximising it pushes the true logit below the best other one. κ = 0 is the reference's: a point stops
    moving (zero loss and gradient) once it is misclassified. κ > 0 keeps pushing it up to a margin of κ.
    """
    onehot = F.one_hot(y, logits.shape[1]).bool()
    correct = logits.gather(1, y[:, None]).squeeze(1)  # not logits[onehot]: a boolean mask waits for the device
    other = logits.masked_fill(onehot, float("-inf")).amax(dim=1)
    return -torch.clamp(correct - other, min=-kappa).sum()


def _ce_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="sum")


# The names (and their order) are the schema's eval.val_loss/eval.test_loss choices (conf.schema.ATTACK_LOSSES):
# a loss named there without a function here fails at import.
_LOSS_FUNCTIONS = {"ce": _ce_sum, "cw": cw_loss}
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    name: _LOSS_FUNCTIONS[name] for name in ATTACK_LOSSES}


def _rand_like(x: torch.Tensor, generator: torch.Generator | None, normal: bool = False) -> torch.Tensor:
    if normal:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _l2_norm(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (v.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project x_adv onto the ε-ball around x and onto [0, 1]."""
    if norm == "linf":
        return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
    delta = (x_adv - x).clamp(-x, 1.0 - x)
    return x + delta.renorm(p=2, dim=0, maxnorm=eps)


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str = "linf",
    eps: float = 8 / 255,
    step: float = 2 / 255,
    steps: int = 40,
    loss: str = "ce",
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PGD with uniform random start (ℓ∞) or a random point on the ε-sphere (ℓ2). Returns x_adv in [0, 1].

    Parameters are not differentiated; the model's mode (train/eval) is left as the caller set it.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {loss!r}")
    loss_fn = LOSSES[loss]
    x = x.detach()
    if random_start:
        if norm == "linf":
            x_adv = x + (2 * _rand_like(x, generator) - 1) * eps
        else:
            # The reference's start: a random direction at radius exactly ε (then clipped to [0, 1] and projected).
            d = _rand_like(x, generator, normal=True)
            x_adv = x + d / _l2_norm(d).clamp_min(1e-12) * eps
        x_adv = project(x_adv, x, norm, eps)
    else:
        x_adv = x.clone()
    with input_grad_only(model):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                value = loss_fn(model(x_adv), y)
                (grad,) = torch.autograd.grad(value, x_adv)
            with torch.no_grad():
                if norm == "linf":
                    x_adv = x_adv + step * grad.sign()
                else:
                    x_adv = x_adv + step * grad / _l2_norm(grad).clamp_min(1e-12)
                x_adv = project(x_adv, x, norm, eps)
    return x_adv.detach()


@torch.no_grad()
def accuracy_counts(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Number of correctly classified points (a 0-d tensor on the device; no host sync), optionally under attack."""
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        if attack is not None:
            xb = attack(xb, yb)
        correct += (model(xb).argmax(1) == yb).sum()
    return correct
