"""Import WideResNet checkpoints (ours, the reference's, RobustBench's) and export RobustBench models.

Every file is read with ``torch.load(..., weights_only=True)``: a checkpoint is data, never code.

Accepted layouts (keys are those of ``robustdiff.models.wrn.WideResNet`` = RobustBench's
``DMWideResNet``):

- a plain state dict, possibly prefixed (``module.`` from DataParallel, ``module.0.`` from the
  reference's ``Sequential(normalize, net)`` wrapper, or a Lightning attribute path);
- the reference's ``{'model_state_dict': EMA, 'unaveraged_model_state_dict': live, ...}``;
- ``{'state_dict': ...}`` (RobustBench, Lightning).

The architecture (depth, width, classes, input channels) is read from the tensor shapes. Mean/std
are not part of a state dict: they come from the dataset.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.datasets import get_info
from ..models.wrn import WideResNet
from ..utils.io import UnreadableWeightsError, atomic_torch_save, atomic_write_json, load_weights
from .robustness import check_eps, format_count, format_eps

ANCHOR = "init_conv.weight"
WEIGHTS = ("ema", "live")

class CheckpointError(ValueError):
    """A checkpoint that is not a WideResNet state dict, or does not fit the dataset."""


@dataclass(frozen=True)
class Architecture:
    depth: int
    width: int
    num_classes: int
    in_channels: int

    @property
    def name(self) -> str:
        return f"wrn-{self.depth}-{self.width}"

    @property
    def robustbench_name(self) -> str:
        return f"WideResNet-{self.depth}-{self.width}"


def _describe_keys(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def extract_state_dict(obj: Any, *, weights: str = "ema", source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The WideResNet state dict inside a loaded checkpoint, with any key prefix removed.

    ``weights``: 'ema' (the averaged weights, default) or 'live' (the reference's
    ``unaveraged_model_state_dict``, or a prefix without 'ema' in a file holding both).
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    if "model_state_dict" in obj or "unaveraged_model_state_dict" in obj:
        key = "model_state_dict" if weights == "ema" else "unaveraged_model_state_dict"
        if key not in obj:
            raise CheckpointError(f"{source}: has no {key!r} (keys: {_describe_keys(obj)}); "
                                  f"choose weights={'live' if weights == 'ema' else 'ema'}")
        obj = obj[key]
    elif isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    prefixes = sorted({k[: -len(ANCHOR)] for k in tensors if k.endswith(ANCHOR)})
    if not prefixes:
        raise CheckpointError(
            f"{source}: not a WideResNet state dict — no '{ANCHOR}' key. Expected keys like init_conv.weight, "
            f"layer.0.block.0.conv_0.weight, batchnorm.weight, logits.weight; found: {_describe_keys(obj)}")
    if len(prefixes) > 1:
        ema = [p for p in prefixes if "ema" in p.lower() or "averag" in p.lower()]
        live = [p for p in prefixes if p not in ema]
        chosen = ema if weights == "ema" else live
        if len(chosen) != 1:
            raise CheckpointError(f"{source}: holds several WideResNets under prefixes {prefixes}; cannot tell "
                                  f"which one holds the {weights} weights")
        prefixes = chosen
    prefix = prefixes[0]
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def infer_architecture(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> Architecture:
    """Depth, width, classes and input channels from the shapes of a (prefix-free) WRN state dict."""
    try:
        init = state_dict["init_conv.weight"]
        first = state_dict["layer.0.block.0.conv_0.weight"]
        head = state_dict["logits.weight"]
    except KeyError as e:
        raise CheckpointError(f"{source}: not a WideResNet state dict — missing {e.args[0]!r}; found: "
                              f"{_describe_keys(state_dict)}") from None
    blocks = {int(k.split(".")[3]) for k in state_dict if k.startswith("layer.0.block.")}
    n = max(blocks) + 1
    if init.dim() != 4 or first.shape[0] % 16 != 0 or head.dim() != 2:
        raise CheckpointError(f"{source}: tensor shapes don't fit a WideResNet (init_conv {tuple(init.shape)}, "
                              f"layer.0.block.0.conv_0 {tuple(first.shape)}, logits {tuple(head.shape)})")
    return Architecture(depth=6 * n + 4, width=first.shape[0] // 16, num_classes=head.shape[0],
                        in_channels=init.shape[1])


def load_wideresnet(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    dataset: str | None = None,
    weights: str = "ema",
    mean=None,
    std=None,
) -> WideResNet:
    """A WideResNet with the checkpoint's weights, loaded strictly, in eval mode on the CPU.

    ``source``: a file path or an already loaded checkpoint. ``dataset`` supplies mean/std and is
    checked against the head (class count) and the first conv (input channels); give ``mean``/``std``
    directly otherwise.
    """
    where = str(source) if isinstance(source, (str, os.PathLike)) else "checkpoint"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            obj = load_weights(path, "a model checkpoint")
        except UnreadableWeightsError as e:
            raise CheckpointError(str(e)) from None
    else:
        obj = source
    state_dict = extract_state_dict(obj, weights=weights, source=where)
    arch = infer_architecture(state_dict, where)
    if dataset is not None:
        info = get_info(dataset)
        if arch.num_classes != info.num_classes:
            raise CheckpointError(
                f"{where}: the model has a {arch.num_classes}-class head (logits.weight is "
                f"{tuple(state_dict['logits.weight'].shape)}) but dataset {dataset} has {info.num_classes} classes; "
                "pass the dataset the model was trained on")
        if arch.in_channels != info.image_shape[2]:
            raise CheckpointError(f"{where}: the model takes {arch.in_channels}-channel images but dataset {dataset} "
                                  f"has {info.image_shape[2]}")
        mean = info.mean if mean is None else mean
        std = info.std if std is None else std
    if mean is None or std is None:
        raise ValueError("load_wideresnet needs a dataset or an explicit mean and std")
    model = WideResNet(arch.depth, arch.width, arch.num_classes, arch.in_channels, mean=mean, std=std)
    expected = model.state_dict()
    # Some older checkpoints lack BatchNorm's step counters; they don't affect the forward pass.
    for k, v in expected.items():
        if k.endswith("num_batches_tracked") and k not in state_dict:
            state_dict[k] = v
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe_keys(unexpected)}")
        raise CheckpointError(f"{where}: not a {arch.robustbench_name} state dict in the DMWideResNet layout — "
                              + "; ".join(parts))
    wrong = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if state_dict[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{where}: shapes don't fit {arch.robustbench_name}: {_describe_keys(wrong, 5)}")
    model.load_state_dict(state_dict, strict=True)
    return model.float().eval()


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
