"""Load a WideResNet from a checkpoint: ours, the reference's or RobustBench's.

Every file is read with ``torch.load(..., weights_only=True)``: a checkpoint is data, never code.

Accepted layouts (keys are those of ``robustdiff.models.wrn.WideResNet`` = RobustBench's
``DMWideResNet``):

- a plain state dict, possibly prefixed (``module.`` from DataParallel, ``module.0.`` from the
  reference's ``Sequential(normalize, net)`` wrapper, or a Lightning attribute path);
- the reference's ``{'model_state_dict': EMA, 'unaveraged_model_state_dict': live, ...}``;
- ``{'state_dict': ...}`` (RobustBench, Lightning).

The architecture (depth, width, classes, input channels) is read from the tensor shapes. Mean/std
are not part of a state dict: they come from the dataset.

- `load_wideresnet`: a file or a loaded checkpoint → the model, with every check below;
- `load_model`: the same for a run directory's model.pt, rebuilding from run.json's ``model`` record
  (`load_recorded_model`) when the run trained another ``nn.Module`` (``model._target_``);
- `read_checkpoint`, `extract_state_dict`, `infer_architecture`, `check_layout`, `build_wideresnet`:
  its steps, for callers that read a checkpoint their own way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.datasets import get_info
from ..utils.io import UnreadableWeightsError, load_weights
from .wrn import WideResNet

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


def read_checkpoint(path: str | os.PathLike, what: str = "a model checkpoint") -> Any:
    """The checkpoint file at ``path``, loaded weights-only on the CPU (``what`` names it in errors).

    FileNotFoundError when there is no such file; CheckpointError when it is truncated, corrupt or pickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return load_weights(path, what)
    except UnreadableWeightsError as e:
        raise CheckpointError(str(e)) from None


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


def check_layout(state_dict: dict[str, torch.Tensor], arch: Architecture, source: str = "checkpoint") -> None:
    """Check that ``state_dict`` has exactly the keys and shapes of a WideResNet of ``arch``; a CheckpointError names
    the missing, unexpected and misshapen ones. BatchNorm step counters that older checkpoints lack (they don't
    affect the forward pass) are added to ``state_dict`` in place."""
    with torch.device("meta"):  # the expected keys and shapes, without allocating or initialising weights
        expected = WideResNet(arch.depth, arch.width, arch.num_classes, arch.in_channels, mean=(0.0,),
                              std=(1.0,)).state_dict()
    for k, v in expected.items():
        if k.endswith("num_batches_tracked") and k not in state_dict:
            state_dict[k] = torch.zeros_like(v, device="cpu")
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe_keys(unexpected)}")
        raise CheckpointError(f"{source}: not a {arch.robustbench_name} state dict in the DMWideResNet layout — "
                              + "; ".join(parts))
    wrong = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if state_dict[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{source}: shapes don't fit {arch.robustbench_name}: {_describe_keys(wrong, 5)}")


def build_wideresnet(state_dict: Mapping[str, torch.Tensor], arch: Architecture, *, mean, std) -> WideResNet:
    """A WideResNet of ``arch`` normalising by ``mean``/``std``, with the weights of ``state_dict`` loaded strictly,
    in float32 and eval mode on the CPU. A key or shape that does not fit raises ``load_state_dict``'s RuntimeError
    (`check_layout` first says which, as a CheckpointError)."""
    model = WideResNet(arch.depth, arch.width, arch.num_classes, arch.in_channels, mean=mean, std=std)
    model.load_state_dict(state_dict, strict=True)
    return model.float().eval()


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
    obj = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
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
    check_layout(state_dict, arch, where)
    return build_wideresnet(state_dict, arch, mean=mean, std=std)


WIDERESNET_TARGET = "robustdiff.models.wrn.WideResNet"


def is_wideresnet_record(record: Mapping[str, Any] | None) -> bool:
    """Whether a run.json ``model`` record is a WideResNet (no ``_target_``: a WideResNet by name/depth/width)."""
    return not record or record.get("_target_") in (None, WIDERESNET_TARGET)


def load_recorded_model(path: str | os.PathLike, record: Mapping[str, Any], *, dataset: str,
                        source: str | None = None) -> torch.nn.Module:
    """The network a run.json ``model`` record describes (``_target_`` and its kwargs), with the weights of the
    state dict at ``path`` loaded strictly, in float32 and eval mode on the CPU.

    ``_target_`` must name a ``torch.nn.Module`` subclass (a CheckpointError otherwise): a run.json is data, so
    nothing but a module class is ever called. The dataset supplies num_classes, in_channels, mean and std."""
    from .build import build_model

    where = source or str(path)
    obj = read_checkpoint(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: expected a state dict (a mapping of names to tensors), got "
                              f"{type(obj).__name__}")
    info = get_info(dataset)
    try:
        model = build_model(record, num_classes=info.num_classes, in_channels=info.image_shape[2], mean=info.mean,
                            std=info.std, where="run.json model._target_")
    except ValueError as e:
        raise CheckpointError(f"{where}: cannot rebuild the run's model: {e}") from None
    except TypeError as e:
        raise CheckpointError(f"{where}: run.json's model kwargs don't fit {record.get('_target_')}: {e}") from None
    try:
        model.load_state_dict(dict(obj), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: the weights don't fit the model run.json records "
                              f"({record.get('_target_')}): {str(e).splitlines()[0]} …") from None
    return model.float().eval()


def load_model(path: str | os.PathLike, *, dataset: str, weights: str = "ema",
               record: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """A run's (or a bare file's) model: a WideResNet read from the tensor shapes (`load_wideresnet`) unless
    ``record`` (run.json's ``model``) names another ``_target_``, which `load_recorded_model` rebuilds."""
    if is_wideresnet_record(record):
        return load_wideresnet(path, dataset=dataset, weights=weights)
    return load_recorded_model(path, record, dataset=dataset)


def model_name(model: torch.nn.Module, record: Mapping[str, Any] | None = None) -> str:
    """"wrn-<depth>-<width>" for a WideResNet, else the record's name (or the class name)."""
    if isinstance(model, WideResNet):
        return f"wrn-{model.depth}-{model.width}"
    return (record or {}).get("name") or str((record or {}).get("_target_") or type(model).__name__).rsplit(".", 1)[-1]
