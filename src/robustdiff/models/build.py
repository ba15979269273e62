"""The classifier of a run from its ``model`` config node: ``_target_`` (an ``nn.Module`` class) and its kwargs.

- `model_class`: the ``_target_`` class, checked to be an ``nn.Module`` subclass (never any other callable: a
  run.json read back from disk is data, so nothing but a module class is ever called);
- `model_kwargs`: the node's kwargs (``name`` and Hydra's ``_..._`` keys dropped);
- `dataset_kwargs`: which of num_classes, in_channels, mean, std the class's constructor accepts;
- `build_model`: the network, wrapped in `Normalized` when it does not take mean/std itself.

Training builds through ``hydra.utils.instantiate``; loading a saved run uses `build_model` on run.json's record.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..utils.targets import resolve_class
from .normalize import Normalized

DATASET_ARGS = ("num_classes", "in_channels", "mean", "std")


class ModelTargetError(ValueError):
    """A ``model._target_`` that cannot be imported or is not a ``torch.nn.Module`` class."""


def model_class(target: Any, where: str = "model._target_",
                error: type[Exception] = ModelTargetError) -> type[nn.Module]:
    """The class ``target`` names (a dotted path), refused (``error``) unless it is a ``torch.nn.Module``
    subclass."""
    return resolve_class(target, nn.Module, what="torch.nn.Module", where=where, error=error,
                         example="model=wrn-28-10 or model._target_=my_package.MyNet",
                         hint="point it at the network's class (its constructor gets the kwargs of the model "
                              "node, plus num_classes/in_channels/mean/std where it accepts them)")


def model_kwargs(node: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor kwargs recorded in a model node: everything but ``name`` and Hydra's ``_target_``-style
    keys."""
    return {k: v for k, v in node.items() if k != "name" and not (k.startswith("_") and k.endswith("_"))}


def dataset_kwargs(cls: type[nn.Module], *, num_classes: int, in_channels: int, mean, std) -> dict[str, Any]:
    """num_classes, in_channels, mean and std, those that ``cls``'s constructor accepts (all for ``**kwargs``)."""
    values = {"num_classes": num_classes, "in_channels": in_channels, "mean": tuple(mean), "std": tuple(std)}
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return values
    return {k: v for k, v in values.items() if k in params}


def unknown_kwargs(cls: type[nn.Module], kwargs: Mapping[str, Any]) -> list[str]:
    """The keys of ``kwargs`` that ``cls``'s constructor does not accept (none when it takes ``**kwargs``)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [k for k in kwargs if k not in params or k in DATASET_ARGS]


def normalizes_itself(accepted: Mapping[str, Any]) -> bool:
    return "mean" in accepted and "std" in accepted


def wrap(net: nn.Module, accepted: Mapping[str, Any], *, in_channels: int, mean, std) -> nn.Module:
    """``net`` itself when its constructor took mean/std, else ``Normalized(net, mean, std)``."""
    return net if normalizes_itself(accepted) else Normalized(net, mean, std, in_channels)


def build_model(node: Mapping[str, Any], *, num_classes: int, in_channels: int, mean, std,
                where: str = "model._target_") -> nn.Module:
    """The network a model node (a plain mapping, e.g. run.json's ``model``) describes, freshly initialised."""
    cls = model_class(node.get("_target_"), where)
    accepted = dataset_kwargs(cls, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
    net = cls(**model_kwargs(node), **accepted)
    return wrap(net, accepted, in_channels=in_channels, mean=mean, std=std)
