"""robustdiff-train's settings checked before any work: unknown keys, ranges and choices, each error naming the key
and the fix. Imports no torch or Lightning, so the command line answers a bad value at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..adversarial.config import AttackConfig
from ..data.datasets import get_info
from ..utils.choices import COMPILE_CHOICES, COMPILE_MODES, parse_fraction


class ConfigError(ValueError):
    pass


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


def _known_keys() -> set[str]:
    """The top-level keys of robustdiff-train's config: train.yaml's own and its groups."""
    base = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "train.yaml"))
    groups = {next(iter(d)) if isinstance(d, dict) else d for d in base.get("defaults", [])}
    groups = {g.split("/")[0] for g in groups if not g.startswith(("_self_", "override"))}
    return {str(k) for k in base if k != "defaults"} | groups


def check_keys(cfg: DictConfig) -> None:
    """A top-level key robustdiff-train does not know (``+epoch=3`` for ``epochs=3``) is a typo, not a setting."""
    import difflib

    known = _known_keys()
    for key in cfg:
        if key not in known and key != "hydra":
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"did you mean {close[0]}=...?" if close else "see robustdiff-train --help for the keys"
            raise ConfigError(f"{key}: not a robustdiff-train setting (added with +{key}=...); {hint} — an unknown "
                              f"key would change nothing but the run's name")


def validate(cfg: DictConfig) -> AttackConfig:
    """Every range check that must fail before any data is read or any step is taken."""
    check_keys(cfg)
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(isinstance(cfg.get("progress", True), bool), f"progress={cfg.get('progress')!r}: true or false")

    def number(key: str) -> float:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not a number")
        try:
            return parse_fraction(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not a number (write e.g. 0.1)") from None

    def integer(key: str, low: int) -> int:
        value = OmegaConf.select(cfg, key)
        need(isinstance(value, int) and not isinstance(value, bool) and value >= low,
             f"{key}={value!r} must be an integer >= {low}")
        return value

    try:
        info = get_info(cfg.dataset.name)
    except ValueError as e:
        raise ConfigError(f"dataset.name: {e}") from None
    integer("epochs", 1)
    integer("batch_size", 2)
    integer("seed", 0)
    need(number("lr") > 0, f"lr={cfg.lr} must be > 0")
    need(0 <= number("momentum") < 1, f"momentum={cfg.momentum} must be in [0, 1)")
    need(number("beta") >= 0, f"beta={cfg.beta} must be >= 0")
    need(0 <= number("label_smoothing") < 1, f"label_smoothing={cfg.label_smoothing} must be in [0, 1)")
    need(0 < number("ema_decay") < 1, f"ema_decay={cfg.ema_decay} must be in (0, 1)")
    need(0 <= number("ema_warmup") <= 1, f"ema_warmup={cfg.ema_warmup} must be in [0, 1]")
    need(cfg.schedule in ("cosinew", "constant"), f"schedule={cfg.schedule!r}: choose cosinew (the reference's "
         "one-cycle schedule) or constant")
    need(cfg.generated_sampling in ("with_replacement", "permutation"), f"generated_sampling="
         f"{cfg.generated_sampling!r}: choose with_replacement (the reference) or permutation")
    depth = cfg.model.depth
    need(isinstance(depth, int) and depth >= 10 and (depth - 4) % 6 == 0,
         f"model.depth={depth!r}: a WideResNet's depth is 6·n + 4 (10, 16, 22, 28, 34, 40, 70, ...)")
    integer("model.width", 1)
    try:
        ratio = None if cfg.ratio is None else float(cfg.ratio)
    except (TypeError, ValueError):
        raise ConfigError(f"ratio={cfg.ratio!r} is not a number: the real fraction of each batch, in [0, 1]") from None
    if not cfg.generated:
        need(ratio in (None, 1.0), f"ratio={cfg.ratio} needs generated data: it is the fraction of REAL images in each "
             "batch, the rest coming from generated=<store>; give generated=... or drop ratio (real data only)")
        cfg.ratio = 1.0
    else:
        cfg.ratio = DEFAULT_RATIO if ratio is None else ratio
    need(0 <= float(cfg.ratio) <= 1, f"ratio={cfg.ratio} is the real fraction of each batch and must be in [0, 1]")
    need(number("weight_decay") >= 0, f"weight_decay={cfg.weight_decay} must be >= 0")
    integer("val_size", 1)
    need(cfg.get("val_split") in (None, "first", "stratified"), f"val_split={cfg.get('val_split')!r}: choose first "
         "(the first val_size training images, the reference), stratified (a seeded sample of every class) or null "
         "(the dataset's rule: stratified for class-sorted sets such as tinyimagenet, first otherwise)")
    integer("val_seed", 0)
    need(cfg.get("last_batch", "reference") in ("reference", "fill"), f"last_batch={cfg.get('last_batch')!r}: "
         "choose reference (a short batch where a permutation of the real images ends, topped up with generated "
         "images when there are any) or fill (every batch full, continuing into the next permutation)")
    need(cfg.limit_test is None or (isinstance(cfg.limit_test, int) and not isinstance(cfg.limit_test, bool)
                                    and cfg.limit_test >= 1),
         f"limit_test={cfg.limit_test!r} must be a whole number >= 1 (the first N test images), or null for the "
         "whole test set")
    need(cfg.limit_train is None or (isinstance(cfg.limit_train, int) and cfg.limit_train > cfg.val_size + 1),
         f"limit_train={cfg.limit_train!r} must leave training images after the {cfg.val_size} validation images")
    n_real = min(cfg.limit_train or info.n_train, info.n_train) - cfg.val_size
    need(cfg.batch_size <= n_real, f"batch_size={cfg.batch_size} is larger than the {n_real:,} real training images "
         f"of {info.name} ({'limit_train=' + str(cfg.limit_train) if cfg.limit_train else info.n_train} minus "
         f"val_size={cfg.val_size}); use batch_size <= {n_real}")
    need(isinstance(cfg.eval.steps, int) and cfg.eval.steps >= 1, f"eval.steps={cfg.eval.steps!r} must be >= 1")
    need(cfg.loss in ("trades", "pgd_at", "pgd_at_train", "ce"), f"loss={cfg.loss!r}: choose trades (the paper), "
         "pgd_at (the reference's: eval-mode attack, plain CE), pgd_at_train (batch-statistics attack, label "
         "smoothing) or ce (standard training, no attack: for the classifiers that measure generated data)")
    need(cfg.eval.get("select", "pgd") in ("pgd", "clean"), f"eval.select={cfg.eval.get('select')!r}: choose pgd "
         "(best epoch = highest validation PGD accuracy, the reference) or clean")
    need(isinstance(cfg.eval.test_every, int) and cfg.eval.test_every >= 1,
         f"eval.test_every={cfg.eval.test_every!r} must be >= 1")
    precisions = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "auto")
    need(str(cfg.precision) in precisions, f"precision={cfg.precision!r}: choose one of {', '.join(precisions)} "
         "(32-true is the reference; bf16-mixed autocasts the network and keeps fp32 weights and losses; auto picks "
         "bf16-mixed where the hardware has bf16 units)")
    need(cfg.get("compile", False) in COMPILE_CHOICES, f"compile={cfg.get('compile')!r}: choose false, true or a "
         f"torch.compile mode ({', '.join(COMPILE_MODES)})")
    devices = cfg.trainer.devices
    world = (devices if isinstance(devices, int) and devices > 0 else 1) * int(cfg.trainer.num_nodes)
    need(cfg.batch_size % world == 0, f"batch_size={cfg.batch_size} must be divisible by the {world} DDP processes")
    return attack_config(cfg.norm)
