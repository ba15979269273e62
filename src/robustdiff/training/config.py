"""robustdiff-train's settings checked before any work against their schema (conf/schema.py: unknown keys, types,
choices, bounds), then against each other; each error names the key and the fix. Imports no torch or Lightning, so the command line answers a bad value at once."""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..adversarial.config import AttackConfig
from ..conf.schema import TrainSchema, top_level_keys, walk
from ..data.datasets import get_info
from ..utils.choices import parse_fraction


class ConfigError(ValueError):
    pass


def need(cond: bool, msg: str) -> None:
    """A ConfigError with ``msg`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(msg)


def dataset_info(cfg: DictConfig):
    """The DatasetInfo of ``dataset.name``; an unknown name is a ConfigError listing the datasets."""
    try:
        return get_info(cfg.dataset.name)
    except ValueError as e:
        raise ConfigError(f"dataset.name: {e}") from None


DEFAULT_RATIO = 0.3  # real fraction per batch with generated data when none is given (the paper's 1M recipes)


def parse_number(value: Any, field: str) -> float:
    """Accept 0.0314, "0.0314" or "8/255"."""
    try:
        return parse_fraction(value)
    except ValueError as e:
        raise ConfigError(f"{field}={value!r} is not a number (write e.g. 0.0314 or 8/255)") from e


def attack_config(norm: DictConfig) -> AttackConfig:
    steps = norm.steps
    if not isinstance(steps, int) or isinstance(steps, bool):
        raise ConfigError(f"norm.steps={steps!r} must be an integer >= 1")
    try:
        return AttackConfig(norm=str(norm.name), eps=parse_number(norm.eps, "norm.eps"),
                            step=parse_number(norm.step, "norm.step"), steps=steps)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def check_keys(cfg: DictConfig, known: set[str] | None = None, prog: str = "robustdiff-train",
               effect: str = "would change nothing but the run's name", prefix: str = "") -> None:
    """A key the command does not know (``+epoch=3`` for ``epochs=3``) is a typo, not a setting. ``known``: the
    keys of ``cfg`` (default: robustdiff-train's schema); ``prefix``: where ``cfg`` sits (``"edm."``)."""
    import difflib

    known = top_level_keys() if known is None else known
    for key in cfg:
        if key not in known and key != "hydra":
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"did you mean {prefix}{close[0]}=...?" if close else f"see {prog} --help for the keys"
            raise ConfigError(f"{prefix}{key}: not a {prog} setting (added with +{prefix}{key}=...); {hint} — an "
                              f"unknown key {effect}")


def check_edm_keys(cfg: DictConfig) -> None:
    """robustdiff-edm's keys: the top level of train_edm.yaml and the keys of its ``edm`` group's options."""
    from pathlib import Path

    from ..conf.compose import CONF_DIR, primary_keys

    check_keys(cfg, primary_keys("train_edm"), "robustdiff-edm")
    options = sorted((Path(CONF_DIR) / "edm").glob("*.yaml"))
    check_keys(cfg.edm, set().union(*(primary_keys(f"edm/{p.stem}") for p in options)), "robustdiff-edm",
               prefix="edm.")


def _shown(value: Any) -> str:
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def _written(value: Any) -> str:
    """A value as it is written on the command line."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _choice_text(meta: dict) -> str:
    options = [_written(v) + (f" ({what})" if what else "") for v, what in meta["choices"].items()]
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


def _bounds_text(meta: dict) -> str:
    low = ("ge", ">=") if "ge" in meta else ("gt", ">") if "gt" in meta else None
    high = ("le", "<=") if "le" in meta else ("lt", "<") if "lt" in meta else None
    if low and high:
        return (f"in {'[' if low[0] == 'ge' else '('}{meta[low[0]]:g}, {meta[high[0]]:g}"
                f"{']' if high[0] == 'le' else ')'}")
    bound = low or high
    return f"{bound[1]} {meta[bound[0]]:g}" if bound else ""


def _in_bounds(value: float, meta: dict) -> bool:
    return (("ge" not in meta or value >= meta["ge"]) and ("gt" not in meta or value > meta["gt"])
            and ("le" not in meta or value <= meta["le"]) and ("lt" not in meta or value < meta["lt"]))


def check_value(key: str, value: Any, kind: Any, meta: dict) -> None:
    """One setting against its schema field (type ``kind``, metadata ``meta``): a ConfigError names the key, the
    accepted values or bounds, and how to write one."""
    optional = typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)
    if optional:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    help_text = f" ({meta['help']})" if "help" in meta else ""
    null_text = f", or null ({meta['null']})" if optional and "null" in meta else ", or null" if optional else ""
    if "choices" in meta:
        accepted = meta["choices"]
        plain = str(value) if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool) \
            else value
        if not any(plain == v and type(plain) is type(v) for v in accepted):
            raise ConfigError(f"{key}={_shown(value)}: choose {_choice_text(meta)}")
        return
    if value is None and optional:
        return
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={_shown(value)} must be true or false")
    elif kind is int:
        if not isinstance(value, int) or isinstance(value, bool) or not _in_bounds(value, meta):
            bounds = _bounds_text(meta)
            raise ConfigError(f"{key}={_shown(value)} must be an integer{' ' + bounds if bounds else ''}"
                              f"{help_text}{null_text}")
    elif kind is float:
        example = meta.get("example", "0.1")
        try:
            if isinstance(value, bool):
                raise TypeError
            number = parse_fraction(value)
        except (TypeError, ValueError):
            or_null = f" (or null: {meta['null']})" if optional and "null" in meta else " (or null)" if optional \
                else ""
            raise ConfigError(f"{key}={_shown(value)} is not a number{help_text}: write e.g. {key}={example}"
                              f"{or_null}") from None
        if not _in_bounds(number, meta):
            raise ConfigError(f"{key}={_shown(value)} must be {_bounds_text(meta)}{help_text}{null_text}")


def check_schema(cfg: DictConfig) -> None:
    """Every key of ``cfg`` that the schema (conf/schema.py) describes, checked against it: unknown top-level keys,
    unknown keys of its nested nodes (``norm``, ``eval``), types, choices and bounds. A key the config lacks (a run
    saved before it existed) is left to the code's default."""
    check_keys(cfg)
    for key, f, nested in walk(TrainSchema):
        if not f.metadata and nested is None:
            continue  # an open node or a free-form value (a path, a name)
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        if nested is not None:
            if not isinstance(value, DictConfig):
                raise ConfigError(f"{key}={_shown(value)}: {key} is a group of settings "
                                  f"({', '.join(x.name for x in fields(nested))}); set them as {key}.<name>=...")
            unknown = sorted(set(map(str, value)) - {x.name for x in fields(nested)})
            if unknown:
                raise ConfigError(f"{key}.{unknown[0]}: not a robustdiff-train setting; {key} has "
                                  f"{', '.join(x.name for x in fields(nested))}")
            continue
        check_value(key, value, f.type, dict(f.metadata))


_ABSENT = object()


def validate(cfg: DictConfig) -> AttackConfig:
    """Every check that must fail before any data is read or any step is taken: the schema's (types, choices,
    bounds), then the ones that relate settings to each other or to the dataset."""
    check_schema(cfg)
    info = dataset_info(cfg)
    if "depth" in cfg.model:  # a WideResNet
        depth = cfg.model.depth
        need(isinstance(depth, int) and depth >= 10 and (depth - 4) % 6 == 0,
             f"model.depth={depth!r}: a WideResNet's depth is 6·n + 4 (10, 16, 22, 28, 34, 40, 70, ...)")
    if "width" in cfg.model:
        check_value("model.width", cfg.model.width, int, {"ge": 1})
    ratio = None if cfg.ratio is None else parse_fraction(cfg.ratio)
    if not cfg.generated:
        need(ratio in (None, 1.0), f"ratio={cfg.ratio} needs generated data: it is the fraction of REAL images in each "
             "batch, the rest coming from generated=<store>; give generated=... or drop ratio (real data only)")
        cfg.ratio = 1.0
    else:
        cfg.ratio = DEFAULT_RATIO if ratio is None else ratio
    need(cfg.limit_train is None or cfg.limit_train > cfg.val_size + 1,
         f"limit_train={cfg.limit_train!r} must leave training images after the {cfg.val_size} validation images: "
         f"use limit_train > {cfg.val_size + 1} or a smaller val_size")
    n_real = min(cfg.limit_train or info.n_train, info.n_train) - cfg.val_size
    need(cfg.batch_size <= n_real, f"batch_size={cfg.batch_size} is larger than the {n_real:,} real training images "
         f"of {info.name} ({'limit_train=' + str(cfg.limit_train) if cfg.limit_train else info.n_train} minus "
         f"val_size={cfg.val_size}); use batch_size <= {n_real}")
    devices = cfg.trainer.devices
    world = (devices if isinstance(devices, int) and devices > 0 else 1) * int(cfg.trainer.num_nodes)
    need(cfg.batch_size % world == 0, f"batch_size={cfg.batch_size} must be divisible by the {world} DDP processes")
    attack = attack_config(cfg.norm)
    # Last, as it imports torch: every other check answers at once. The network's class imports, and is an
    # nn.Module, before any data is read.
    from ..models.build import model_class

    model_class(OmegaConf.select(cfg, "model._target_"), error=ConfigError)
    check_datamodule(cfg)
    from .trainer import logger_target

    logger_target(cfg)
    return attack


def check_datamodule(cfg: DictConfig) -> None:
    """``data._target_`` names a RobustDataModule class that takes the data node's own keys (imports torch)."""
    import inspect

    from ..data.datamodule import RobustDataModule, datamodule_class, datamodule_kwargs

    node = OmegaConf.to_container(cfg.data, resolve=True) if "data" in cfg else {}
    cls = datamodule_class(node.get("_target_"), error=ConfigError)
    own = datamodule_kwargs(node)
    fed = [k for k in own if k in inspect.signature(RobustDataModule).parameters]
    if fed:
        raise ConfigError(f"data.{fed[0]} is set from a top-level key: write {fed[0]}=... instead (the data node "
                          "holds _target_ and only the arguments your own DataModule adds)")
    params = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in own if k not in params]
        if unknown:
            raise ConfigError(f"data.{unknown[0]}: {node['_target_']} takes no argument {unknown[0]!r}; remove "
                              f"+data.{unknown[0]}=... (it takes: {', '.join(params)})")
