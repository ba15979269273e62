"""TRADES (Zhang et al., 2019) exactly as the reference trains it, plus PGD-AT.

Images are (B, C, H, W) in [0, 1]. The model is in train mode throughout: the attack uses
batch statistics with BatchNorm running statistics frozen, the outer step updates them with
two separate forwards (clean, adversarial).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import draw
from .attacks import _l2_norm, frozen_bn_stats, input_grad_only, pgd_attack, project
from .config import AttackConfig


def kl_batchmean(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) ‖ softmax(q)) summed over classes, averaged over the batch, in fp32."""
    log_p = F.log_softmax(logits_p.float(), dim=1)
    log_q = F.log_softmax(logits_q.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum() / logits_p.shape[0]


def smoothed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """(1 − s)·NLL + s·mean over classes of (−log p), batch mean, fp32."""
    log_p = F.log_softmax(logits.float(), dim=1)
    nll = -log_p.gather(1, y[:, None]).squeeze(1)
    uniform = -log_p.mean(dim=1)
    return ((1 - smoothing) * nll + smoothing * uniform).mean()


def trades_adversary(
    model: nn.Module, x: torch.Tensor, cfg: AttackConfig, generator: torch.Generator | None = None,
    index: torch.Tensor | None = None, total: int | None = None,
) -> torch.Tensor:
    """Inner maximisation of KL(p_nat ‖ p_adv). Returns detached x_adv in [0, 1].

    ``index``/``total``: this rank's rows of a global batch, so the random start equals a single process's.
    """
    x = x.detach()
    with frozen_bn_stats(model), input_grad_only(model):
        with torch.no_grad():
            logits_nat = model(x).detach()
        if cfg.norm == "linf":
            noise = draw("rand", tuple(x.shape), generator, x.device, index, total, dtype=x.dtype)
            x_adv = (x + (2 * noise - 1) * cfg.eps).clamp(0.0, 1.0)
            for _ in range(cfg.steps):
                x_adv.requires_grad_(True)
                with torch.enable_grad():
                    (grad,) = torch.autograd.grad(kl_batchmean(logits_nat, model(x_adv)), x_adv)
                with torch.no_grad():
                    x_adv = project(x_adv + cfg.step * grad.sign(), x, "linf", cfg.eps)
            return x_adv.detach()
        # ℓ2: normalised gradient ascent on δ with step 2ε/K (the reference ignores the configured step).
        lr = 2 * cfg.eps / cfg.steps
        delta = 0.001 * draw("randn", tuple(x.shape), generator, x.device, index, total, dtype=x.dtype)
        for _ in range(cfg.steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(kl_batchmean(logits_nat, model(x + delta)), delta)
            with torch.no_grad():
                norms = _l2_norm(grad)
                # A zero gradient gets a random direction (the reference's rule). The noise is drawn every step
                # rather than after a host-side `any()`: no device sync, and the draw is the same on every rank.
                noise = draw("randn", tuple(x.shape), generator, x.device, index, total, dtype=x.dtype)
                grad = torch.where(norms == 0, noise, grad / norms.clamp_min(torch.finfo(norms.dtype).tiny))
                delta = delta + lr * grad
                delta = ((x + delta).clamp(0.0, 1.0) - x).renorm(p=2, dim=0, maxnorm=cfg.eps)
        return (x + delta).detach()


@dataclass
class StepOutput:
    loss: torch.Tensor
    loss_natural: torch.Tensor
    loss_robust: torch.Tensor
    logits_natural: torch.Tensor
    logits_adv: torch.Tensor


def trades_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: AttackConfig,
    *,
    beta: float = 5.0,
    label_smoothing: float = 0.1,
    generator: torch.Generator | None = None,
    index: torch.Tensor | None = None,
    total: int | None = None,
) -> StepOutput:
    """CE_ls(f(x), y) + β·KL(softmax f(x) ‖ softmax f(x_adv)); two separate forwards, both differentiated."""
    x_adv = trades_adversary(model, x, cfg, generator, index, total)
    logits_nat = model(x)
    logits_adv = model(x_adv)
    loss_nat = smoothed_cross_entropy(logits_nat, y, label_smoothing)
    loss_rob = kl_batchmean(logits_nat, logits_adv)
    return StepOutput(loss_nat + beta * loss_rob, loss_nat.detach(), loss_rob.detach(), logits_nat, logits_adv)


def pgd_at_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: AttackConfig,
    *,
    label_smoothing: float = 0.0,
    generator: torch.Generator | None = None,
    attack_mode: str = "eval",
) -> StepOutput:
    """Madry et al. PGD-AT: CE on adversarial examples only.

    ``attack_mode="eval"`` (the reference): the attack runs the model in eval mode (BN running statistics used,
    not updated) and the loss is plain CE. ``"train"``: the attack uses batch statistics with the running
    statistics frozen, as TRADES' attack does (``loss=pgd_at_train``).
    """
    if attack_mode == "eval":
        was_training = model.training
        model.eval()
        try:
            x_adv = pgd_attack(model, x, y, norm=cfg.norm, eps=cfg.eps, step=cfg.step, steps=cfg.steps,
                               loss="ce", generator=generator)
        finally:
            model.train(was_training)
    else:
        with frozen_bn_stats(model):
            x_adv = pgd_attack(model, x, y, norm=cfg.norm, eps=cfg.eps, step=cfg.step, steps=cfg.steps,
                               loss="ce", generator=generator)
    logits_adv = model(x_adv)
    loss = smoothed_cross_entropy(logits_adv, y, label_smoothing)
    zero = torch.zeros((), device=x.device)
    return StepOutput(loss, zero, loss.detach(), logits_adv.detach(), logits_adv)


def standard_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, label_smoothing: float = 0.1) -> StepOutput:
    """Standard (non-adversarial) training: label-smoothed CE on the clean images, no attack.

    Not part of the paper's method: robustdiff trains the classifiers that measure generated data with it
    (classifier FD, label agreement, confidence filtering). ``logits_adv`` is the clean logits.
    """
    logits = model(x)
    loss = smoothed_cross_entropy(logits, y, label_smoothing)
    zero = torch.zeros((), device=x.device)
    return StepOutput(loss, loss.detach(), zero, logits.detach(), logits.detach())

