"""Export a WideResNet for RobustBench: a plain state dict its ``DMWideResNet`` loads strictly, and a model card.

Checkpoints are read by ``robustdiff.models.loading`` (`load_wideresnet`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..models.loading import Architecture
from ..models.wrn import WideResNet
from ..utils.io import atomic_torch_save, atomic_write_json
from .robustness import check_eps, format_count, format_eps


def export_robustbench(model: WideResNet, path: str | os.PathLike) -> Path:
    """Save the model as a plain, unprefixed state dict (what RobustBench's DMWideResNet loads strictly)."""
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_torch_save(state_dict, path)
    return Path(path)


def _pct(v: float | None) -> str | None:
    return None if v is None else f"{100 * v:.2f}"


def model_card(
    *,
    dataset: str,
    norm: str,
    eps: float,
    architecture: Architecture | str,
    clean_acc: float | None,
    autoattack_acc: float | None,
    n_generated: int,
    reported: float | None = None,
    name: str | None = None,
    link: str | None = None,
    authors: str | None = None,
    venue: str | None = None,
) -> dict[str, Any]:
    """A RobustBench model-info card. Accuracies are fractions in [0, 1] here, written as '%.2f' percent.

    ``reported`` defaults to ``autoattack_acc``. name/link/authors/venue describe *your* model: they are
    what you pass (None leaves the field empty; RobustBench needs them filled for a submission), never the
    paper whose method trained it.
    """
    eps = check_eps(norm, eps)
    arch = architecture.robustbench_name if isinstance(architecture, Architecture) else architecture
    footnote = (f"It uses additional {format_count(n_generated)} synthetic images in training."
                if n_generated else None)
    return {
        "link": link,
        "name": name,
        "authors": authors,
        "additional_data": False,  # RobustBench counts generated images as no additional data (see footnote)
        "number_forward_passes": 1,
        "dataset": dataset,
        "venue": venue,
        "architecture": arch,
        "eps": format_eps(eps),
        "clean_acc": _pct(clean_acc),
        "reported": _pct(reported if reported is not None else autoattack_acc),
        "autoattack_acc": _pct(autoattack_acc),
        "footnote": footnote,
        "unreliable": False,
    }


def write_model_card(card: Mapping[str, Any], path: str | os.PathLike) -> Path:
    atomic_write_json(path, dict(card))
    return Path(path)
