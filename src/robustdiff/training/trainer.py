"""The Trainer every robustdiff job (robustdiff-train and robustdiff-edm) runs in: the logger (built from the
``logger`` group's ``_target_``: csv, wandb or none), the user's callbacks (the ``callbacks`` group), the Trainer
arguments robustdiff sets itself and refuses to see changed, and the warnings Lightning gives about robustdiff's
deliberate choices, silenced while a job runs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from ..utils.hardware import resolve_precision
from ..utils.naming import SWEEP_ENV
from .callbacks import AtomicCheckpointIO, EpochBar
from .config import ConfigError
from .logging import WandbRun, epochs_from_one
from .logging import finish as finish_wandb

# Lightning's advertisement for its hosted logger on every Trainer start: noise in a run's console.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(lambda record: "litlogger" not in record.getMessage())


@contextlib.contextmanager
def job_warnings() -> Iterator[None]:
    """Run a training or evaluation job with the warnings about robustdiff's deliberate choices silenced, and
    the caller's warning filters given back afterwards."""
    with warnings.catch_warnings():
        # Our LightningModule, not the DataModule, moves batches to the device on purpose (augmentation on device).
        warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
        # A resumed run's checkpoints/ holds its own files: that is what resuming means.
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        yield


def is_launching_process() -> bool:
    """True in the process a user started (global rank 0 before any Trainer exists); false in the DDP ranks
    that Lightning or SLURM start for the same job."""
    for var in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value not in (None, "", "0"):
            return False
    return True


# Keys of the logger group that robustdiff reads itself (the option's name; the W&B callback's log_model and
# examples): given to the logger's _target_ only when it takes them (CSVLogger's name is its folder).
LOGGER_OWN_KEYS = ("name", "log_model", "examples")
# What a job knows only at run time, given to the logger's _target_ under these names when it takes them.
LOGGER_RUNTIME = {
    "save_dir": "the run directory",
    "run_dir": "the run directory",
    "run_name": "the run directory's name",
    "job_type": "train or edm",
    "job_config": "the job's config",
    "sweep_group": "the sweep's name under -m",
}


def logger_target(cfg: DictConfig):
    """What the ``logger`` group's ``_target_`` names (None for an option without one, ``logger=none``), refused
    with a one-line ConfigError naming ``logger._target_`` when it cannot be imported, is a class other than a
    ``pytorch_lightning.loggers.Logger`` subclass, or is not callable. Checked before any data is read."""
    import importlib
    import inspect

    node = cfg.get("logger")
    path = node.get("_target_") if isinstance(node, DictConfig) else None
    if not path:
        return None
    module, _, attr = str(path).rpartition(".")
    try:
        target = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"logger._target_={path}: cannot be imported ({type(e).__name__}: {e}); give the full "
                          "import path of a Lightning logger (pytorch_lightning.loggers.<Class>) or choose "
                          "logger=csv|wandb|none") from None
    # A class that is not a Logger is refused unbuilt; a factory function (job_wandb_logger) is checked once built.
    if inspect.isclass(target) and not issubclass(target, pl.loggers.Logger):
        raise ConfigError(f"logger._target_={path}: is the class {target.__module__}.{target.__qualname__}, "
                          "not a Lightning logger (a subclass of pytorch_lightning.loggers.Logger); choose "
                          "logger=csv|wandb|none or give a Logger class or a function returning one")
    if not callable(target):
        raise ConfigError(f"logger._target_={path}: is a {type(target).__name__}, not a Lightning logger class or "
                          "a function returning one; choose logger=csv|wandb|none")
    return target


def build_logger(cfg: DictConfig, run_dir: Path, name: str, job_type: str = "train"):
    """The ``logger`` group's Lightning logger, built with ``hydra.utils.instantiate`` from its ``_target_``
    (checked by `logger_target`), its settings and the run-time arguments the target takes (LOGGER_RUNTIME), with
    the ``epoch`` it logs counted from 1; False (no logger) for an option without a ``_target_``
    (``logger=none``). A target that builds something other than a Logger is a one-line ConfigError naming
    ``logger._target_``."""
    import inspect

    from hydra.utils import instantiate

    target = logger_target(cfg)
    if target is None:
        return False
    node, path = cfg.logger, cfg.logger._target_
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): it gets no run-time arguments
        params = {}
    settings = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
                if k not in LOGGER_OWN_KEYS or k in params}
    runtime = {"save_dir": str(run_dir), "run_dir": str(run_dir), "run_name": name, "job_type": job_type,
               "job_config": cfg, "sweep_group": os.environ.get(SWEEP_ENV)}
    runtime = {k: v for k, v in runtime.items() if k in params}
    if taken := sorted(set(settings) & set(runtime)):
        raise ConfigError(f"logger.{taken[0]}: robustdiff sets this itself ({LOGGER_RUNTIME[taken[0]]}); remove "
                          "the override")
    try:
        logger = instantiate(OmegaConf.create(settings), _partial_=True)(**runtime)
    except TypeError as e:
        raise ConfigError(f"logger._target_={path}: {e}; remove the logger.<key> setting it does not "
                          "take, or fix its spelling") from None
    if not isinstance(logger, pl.loggers.Logger):
        raise ConfigError(f"logger._target_={path}: builds a {type(logger).__name__}, not a Lightning logger "
                          "(pytorch_lightning.loggers.Logger); choose logger=csv|wandb|none")
    return epochs_from_one(logger)


def user_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The ``callbacks`` group's entries (``{name: {_target_: ..., **kwargs}}``, lightning-hydra-template style),
    instantiated and checked before any data is read; make_trainer adds them after robustdiff's own callbacks.
    A null entry is skipped (``callbacks.<name>=null`` removes one)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    entries = cfg.get("callbacks")
    if entries is None:  # configs without the group (robustdiff-train-edm, runs saved before it existed)
        return []
    if not isinstance(entries, DictConfig):
        raise ConfigError(f"callbacks={entries!r}: choose a group option (callbacks=none|early_stopping) or give "
                          "entries such as +callbacks.<name>._target_=pytorch_lightning.callbacks.<Class>")
    select = cfg.eval.get("select", "pgd")
    monitored = ("val_pgd_acc", "val_clean_acc") if select == "clean" else ("val_pgd_acc",)
    built: list[pl.Callback] = []
    for name, entry in entries.items():
        key = f"callbacks.{name}"
        if entry is None:
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ConfigError(f"{key}: needs a _target_ (e.g. {key}._target_=pytorch_lightning.callbacks."
                              f"EarlyStopping), or {key}=null to drop the entry")
        try:
            callback = instantiate(entry)
        except InstantiationException as e:
            raise ConfigError(f"{key}._target_={entry._target_}: cannot be built ({e}); give the full import path "
                              "of a Lightning callback (pytorch_lightning.callbacks.<Class>) and its arguments") \
                from None
        kind = type(callback).__name__
        if not isinstance(callback, pl.Callback):
            raise ConfigError(f"{key}._target_={entry._target_}: builds a {kind}, not a Lightning callback "
                              "(pytorch_lightning.Callback); use a callback class or drop the entry")
        if isinstance(callback, pl.callbacks.Checkpoint):
            raise ConfigError(f"{key}._target_={entry._target_}: robustdiff owns checkpointing: its RunCheckpoint "
                              "(a ModelCheckpoint on val_pgd_acc, ties -> later epoch) writes best.ckpt, model.pt "
                              "and last.ckpt in the order that lets a run resume bit for bit and never leaves the "
                              "run files ahead of last.ckpt; a second checkpoint callback (or OnExceptionCheckpoint, "
                              "which saves wherever an exception strikes, possibly mid-step) would break that. "
                              "Drop the entry; the best model is checkpoints/best.ckpt and model.pt")
        if isinstance(callback, pl.callbacks.ProgressBar):
            raise ConfigError(f"{key}._target_={entry._target_}: robustdiff adds its own progress bar (turn it off "
                              "with progress=false); drop the entry")
        if isinstance(callback, pl.callbacks.EarlyStopping):
            if callback.monitor not in monitored:
                raise ConfigError(f"{key}.monitor={callback.monitor!r}: robustdiff logs {' and '.join(monitored)} "
                                  "once per epoch (val_clean_acc with eval.select=clean); monitor one of them")
            if callback.mode != "max":
                raise ConfigError(f"{key}.mode={callback.mode!r}: {callback.monitor} is an accuracy; use mode=max")
            if callback._check_on_train_epoch_end:
                raise ConfigError(f"{key}.check_on_train_epoch_end=true: the decision must be taken at the end of "
                                  "validation, before the epoch's last.ckpt is written, so that the checkpoint "
                                  "records it (and a resumed run continues the patience count); set it to false")
            callback._check_on_train_epoch_end = False  # null would mean true here (validation once per epoch)
        built.append(callback)
    return built


# Trainer arguments robustdiff sets itself (cfg.trainer may repeat them only with the same value), and why.
CONTROLLED = {
    "default_root_dir": "the run directory is run_root/<name>",
    "logger": "choose logger=csv|wandb|none",
    "callbacks": "robustdiff's checkpoint callback publishes the run files in order (add yours with callbacks=...)",
    "plugins": "checkpoints are written atomically and read with weights_only=True",
    "precision": "set precision=... (top level): run.json records it",
    "enable_checkpointing": "checkpoints are how a run resumes",
    "use_distributed_sampler": "each rank takes its rows of the same global batch (the batch plan)",
    "inference_mode": "the evaluation attacks need input gradients",
    "num_sanity_val_steps": "an evaluation before training would attack an untrained model for nothing",
    "max_epochs": "set epochs=... (the schedule and EMA warm-up depend on it)",
    "max_steps": "set epochs=... (the schedule and EMA warm-up depend on it)",
    "min_epochs": "a run is `epochs` long (shorter only when a callbacks= entry such as EarlyStopping stops it)",
    "min_steps": "a run is `epochs` long (shorter only when a callbacks= entry such as EarlyStopping stops it)",
    "max_time": "stop a run with a signal (SIGTERM/SIGUSR1/Ctrl-C): it then saves at a step boundary",
    "check_val_every_n_epoch": "every epoch is evaluated (best epoch by validation PGD; docs/method.md, TRADES)",
    "val_check_interval": "every epoch is evaluated once, at its end",
    "accumulate_grad_batches": "one optimiser step per global batch (EMA, schedule and resume count steps)",
    "reload_dataloaders_every_n_epochs": "the batch plan already changes every epoch",
}
# Shorten or repeat the loops: only in a debug run (debug=fdr|limit|overfit, its own run root).
DEBUG_ONLY = ("fast_dev_run", "limit_train_batches", "limit_val_batches", "limit_test_batches",
              "limit_predict_batches", "overfit_batches")
DEBUG_NEUTRAL = {"fast_dev_run": 0, "overfit_batches": 0}  # limit_*: 1.0


def _neutral(key: str, value: Any) -> bool:
    return value is False or (not isinstance(value, bool) and value == DEBUG_NEUTRAL.get(key, 1.0))


def trainer_arguments(cfg: DictConfig, controlled: dict[str, Any]) -> dict[str, Any]:
    """cfg.trainer as pl.Trainer keyword arguments (null = Lightning's default), checked: every key must be a
    Trainer argument; keys in CONTROLLED may only repeat robustdiff's value; DEBUG_ONLY keys need debug=..."""
    import inspect

    accepted = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    user = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if v is not None}
    for key, value in user.items():
        if key not in accepted:
            raise ConfigError(f"trainer.{key}: not an argument of Lightning's Trainer (see `python -c 'import "
                              f"pytorch_lightning as pl; help(pl.Trainer)'`); remove it or fix its spelling")
        if key in CONTROLLED and (key not in controlled or value != controlled[key]):
            raise ConfigError(f"trainer.{key}={value!r}: robustdiff sets this itself"
                              f"{f' (to {controlled[key]!r})' if key in controlled else ''} because "
                              f"{CONTROLLED[key]}; remove the override")
        if key in DEBUG_ONLY and not cfg.get("debug_mode") and not _neutral(key, value):
            raise ConfigError(f"trainer.{key}={value!r} shortens the run, so it is allowed in a debug run only: "
                              f"use debug=fdr (fast_dev_run), debug=limit (limit_*_batches) or debug=overfit "
                              f"(overfit_batches); debug runs go to <run_root>/debug/ and never resume a real run")
    return user


def make_trainer(cfg: DictConfig, run_dir: Path, callbacks: list, validation: bool = True,
                 job_type: str = "train", extra_callbacks: list | tuple = (), **kwargs: Any) -> pl.Trainer:
    """The Trainer every robustdiff job uses, built from cfg.trainer (any Trainer argument) plus what robustdiff
    controls: atomic weights-only checkpoints through our callbacks, our own per-rank data sharding, the
    validation loop once per epoch (``validation``: the job has one), the job's length (``kwargs``:
    max_epochs/steps) and SLURM auto-requeue on SIGUSR1 through Lightning's SLURMEnvironment.
    ``job_type``: train or edm (W&B). ``extra_callbacks`` (the user's, from user_callbacks) come after all of
    robustdiff's own."""
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1))
    logger = build_logger(cfg, run_dir, run_dir.name, job_type)
    if isinstance(logger, pl.loggers.WandbLogger):
        callbacks = [*callbacks, WandbRun(run_dir, log_model=bool(cfg.logger.get("log_model", True)),
                                          examples=int(cfg.logger.get("examples", 8)))]
    controlled: dict[str, Any] = {
        "default_root_dir": str(run_dir), "precision": resolve_precision(str(cfg.precision),
                                                                          str(cfg.trainer.accelerator)),
        "enable_checkpointing": True, "use_distributed_sampler": False, "inference_mode": False,
        "num_sanity_val_steps": 0, "check_val_every_n_epoch": 1, "accumulate_grad_batches": 1, **kwargs,
    }
    user = trainer_arguments(cfg, controlled)
    if cfg.get("progress") is False:  # robustdiff's spelling; trainer.enable_progress_bar=false does the same
        user["enable_progress_bar"] = False
    if not validation:
        user["limit_val_batches"] = 0
    if logger:
        callbacks = [*callbacks, pl.callbacks.LearningRateMonitor(logging_interval="epoch")]
    if user.get("enable_progress_bar", True):
        # The bar reads the step loss (a device->host sync); refreshing it every log interval keeps GPU steps async.
        callbacks = [*callbacks, EpochBar(refresh_rate=user.get("log_every_n_steps", 50))]
    user.setdefault("enable_model_summary", False)
    callbacks = [*callbacks, *extra_callbacks]
    return pl.Trainer(**{**user, **controlled}, logger=logger, callbacks=callbacks, plugins=plugins)


class SignalWatcher(Protocol):
    """The callback of a job that stops it at a step boundary on a signal (RunCheckpoint, EDMSnapshot)."""

    received: int | None  # the signal that came (summary.json "signal"), None if none did


def fit_run(trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule,
            resume: Path | None, summary_path: Path, watcher: SignalWatcher, quiet: Sequence[str] = (),
            **fit_kwargs: Any) -> dict[str, Any]:
    """Run ``trainer.fit`` (from the checkpoint ``resume``, if not None) and end the job's W&B run, even when fit
    fails; returns the run's summary read back from ``summary_path`` (``{"finished": False}`` if none was
    written), marked ``interrupted`` (and with the ``signal`` that ``watcher`` received, if any) when a signal
    stopped the run. ``quiet``: regexes of warning messages silenced during fit; ``fit_kwargs`` go to
    ``trainer.fit`` (e.g. ``weights_only``). Printing what the run achieved is the caller's."""
    try:
        with warnings.catch_warnings() if quiet else contextlib.nullcontext():
            for message in quiet:
                warnings.filterwarnings("ignore", message=message)
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None, **fit_kwargs)
    finally:
        finish_wandb(trainer)
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"finished": False}
    if module.interrupted:
        summary["interrupted"] = True
        if watcher.received is not None:
            summary["signal"] = int(watcher.received)
    return summary
