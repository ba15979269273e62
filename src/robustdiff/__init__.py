"""robustdiff: adversarial training with diffusion-generated data."""

__version__ = "0.1.0"
