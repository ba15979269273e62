"""Clean and PGD accuracy over a set of test images, the ε checks of a threat model, the fp32 eval mode every
attack runs in, and the warning for a clean accuracy far below the recorded one. AutoAttack: ``autoattack``.

Every function takes images ``x: (N, C, H, W)`` float in [0, 1] and labels ``y: (N,)`` int64; the
model normalises internally. Models are evaluated in eval mode and fp32 (``evaluation_mode``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..adversarial.attacks import NORMS, accuracy_counts, pgd_attack
from ..adversarial.config import EPS_LIMIT
from ..utils.choices import parse_fraction

# --- ε handling --------------------------------------------------------------------------------------

class EpsilonError(ValueError):
    pass


def check_eps(norm: str, eps: float) -> float:
    """Validate an ε meant for images in [0, 1]; an ε in pixel units gets an error that gives the fix."""
    if norm not in NORMS:
        raise EpsilonError(f"norm must be one of {NORMS}, got {norm!r}")
    eps = float(eps)
    if not eps > 0 or not math.isfinite(eps):
        raise EpsilonError(f"eps must be a positive number, got {eps}")
    if eps > EPS_LIMIT[norm]:
        raise EpsilonError(f"eps={eps:g} is too large for {norm} on images in [0, 1]; it looks like pixel units. "
                           f"Use {eps:g}/255 = {eps / 255:.6f} (e.g. --eps {eps:g}/255)")
    return eps


def parse_eps(text: str | float, norm: str) -> float:
    """'8/255', '0.0313725' or a float -> ε for images in [0, 1] (checked by ``check_eps``)."""
    try:
        value = parse_fraction(text)
    except ValueError as e:
        raise EpsilonError(f"cannot read eps {text!r}: write it as a number or a fraction like 8/255") from e
    return check_eps(norm, value)


# --- model state -------------------------------------------------------------------------------------

@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (restored afterwards), autocast off, and a check that the weights are fp32."""
    bad = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if bad:
        raise TypeError(f"evaluation runs in fp32 but the model has {', '.join(bad)} parameters; call model.float()")
    was_training = model.training
    model.eval()
    device_type = next(model.parameters()).device.type
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            yield model
    finally:
        model.train(was_training)


def on_model_device(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as fp32 and ``y`` as int64 on the model's device, after checking their shapes agree."""
    device = next(model.parameters()).device
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} images but y has {y.shape[0]} labels")
    return x.to(device=device, dtype=torch.float32), y.to(device=device, dtype=torch.long)


def evaluate_clean(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 500) -> dict[str, Any]:
    """Clean accuracy. Returns {'acc' in [0, 1], 'n_correct', 'n'}."""
    x, y = on_model_device(model, x, y)
    with evaluation_mode(model):
        n_correct = int(accuracy_counts(model, x, y, batch_size))
    return {"acc": n_correct / len(y), "n_correct": n_correct, "n": len(y)}


def evaluate_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str = "linf",
    eps: float = 8 / 255,
    step: float | None = None,
    steps: int = 40,
    loss: str = "ce",
    batch_size: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """PGD-``steps`` robust accuracy with a random start; ``step`` defaults to ε/4 (2/255 at ε = 8/255).

    Returns {'acc', 'n_correct', 'n', 'norm', 'eps', 'step', 'steps', 'loss', 'seed'}.
    """
    eps = check_eps(norm, eps)
    step = eps / 4 if step is None else float(step)
    x, y = on_model_device(model, x, y)
    generator = torch.Generator(device=x.device).manual_seed(seed)

    def attack(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return pgd_attack(model, xb, yb, norm=norm, eps=eps, step=step, steps=steps, loss=loss, generator=generator)

    with evaluation_mode(model):
        n_correct = int(accuracy_counts(model, x, y, batch_size, attack=attack))
    return {"acc": n_correct / len(y), "n_correct": n_correct, "n": len(y), "norm": norm, "eps": eps,
            "step": step, "steps": steps, "loss": loss, "seed": seed}


# --- sanity ------------------------------------------------------------------------------------------

def clean_accuracy_warning(measured: float, expected: float | None, n: int, num_classes: int,
                           what: str = "model") -> str | None:
    """A warning when clean accuracy is far below the recorded/reported value, or near chance.

    "Far" means more than max(5 points, 3 binomial standard errors on n points) below.
    """
    likely = ("likely causes: the mean/std normalisation applied twice or the wrong mean/std (the model "
              "normalises inside; feed it images in [0, 1]), wrong or partially loaded weights (EMA vs live, "
              "key prefixes), or the wrong dataset")
    if expected is not None:
        tolerance = max(0.05, 3 * math.sqrt(max(expected * (1 - expected), 1e-4) / max(n, 1)))
        if measured < expected - tolerance:
            return (f"{what}: clean accuracy {100 * measured:.2f}% on {n} points is far below the recorded "
                    f"{100 * expected:.2f}%; {likely}")
    if measured <= 1.5 / num_classes:
        return f"{what}: clean accuracy {100 * measured:.2f}% is near chance ({100 / num_classes:.1f}%); {likely}"
    return None
