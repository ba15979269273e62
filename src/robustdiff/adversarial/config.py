"""The threat model of an attack (norm, ε, step, steps), checked on construction; importable without torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..conf.schema import choices

NORMS = choices("norm.name")
# The largest ε robustdiff accepts for images in [0, 1], by norm (training and evaluation alike): ℓ∞ cannot exceed
# the pixel range, and an ℓ2 ε above 16 (the paper's is 128/255 ≈ 0.5) is an ε written in pixel units.
EPS_LIMIT = {"linf": 1.0, "l2": 16.0}


@dataclass(frozen=True)
class AttackConfig:
    norm: str = "linf"  # linf | l2
    eps: float = 8 / 255
    step: float = 2 / 255  # ignored for l2 TRADES, as in the reference (step = 2ε/K)
    steps: int = 10

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm.name={self.norm!r}: choose {' or '.join(NORMS)}")
        if not 0 < self.eps <= EPS_LIMIT[self.norm]:
            hint = f" — did you mean {self.eps:g}/255 = {self.eps / 255:.5f}?" if self.eps > 1 else ""
            raise ValueError(f"norm.eps={self.eps} is out of range for {self.norm}: images are in [0, 1]{hint}")
        if not self.step > 0:
            raise ValueError(f"norm.step must be > 0, got {self.step}")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"norm.steps must be an integer >= 1, got {self.steps}")
