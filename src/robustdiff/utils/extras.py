"""Optional dependencies (pyproject's extras): a feature that needs one says which extra to install."""

from __future__ import annotations

import importlib.util

# import name -> the extra that installs it
EXTRAS = {"wandb": "wandb", "hydra_plugins.hydra_submitit_launcher": "slurm", "robustbench": "robustbench"}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def missing_extra(module: str, feature: str) -> str | None:
    """None when ``module`` is importable, else the message: which extra ``feature`` needs."""
    if installed(module):
        return None
    extra = EXTRAS[module]
    return (f"{feature} needs the optional dependency {module.split('.')[-1]}: install it with "
            f"pip install 'robustdiff[{extra}]'")
