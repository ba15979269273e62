"""Build and run one adversarial-training job from a composed config (thin glue, no math)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from ..adversarial.trades import AttackConfig
from ..data.datamodule import RobustDataModule
from ..data.datasets import get_info
from ..models.wrn import WideResNet
from ..utils.extras import missing_extra
from ..utils.hardware import resolve_precision
from ..utils.io import atomic_write_json, atomic_write_text, remove_orphan_temporaries
from ..utils.lock import DirectoryLock
from ..utils.naming import SWEEP_ENV, run_name  # noqa: F401  (run_name: re-exported; importing registers rd_run_name)
from .adversarial import AdversarialTraining
from .callbacks import AtomicCheckpointIO, EpochBar, EpochSummary, RunCheckpoint, fmt_acc, republish
from .config import ConfigError, validate
from .logging import WandbRun, epochs_from_one, wandb_logger
from .logging import finish as finish_wandb

# Our LightningModule, not the DataModule, moves batches to the device on purpose (augmentation on device).
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
# Lightning's advertisement for its hosted logger on every Trainer start: noise in a run's console.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(lambda record: "litlogger" not in record.getMessage())

# Fields that define what a run *is*: resuming with any of them changed is refused.
IDENTITY_FIELDS = ("dataset", "model", "num_classes", "in_channels", "norm", "loss", "epochs", "batch_size",
                   "generated", "ratio", "generated_sampling", "seed", "limit_train", "val_size")


# Keys that may change when a run is resumed: where things are and how the job runs, never what it computes.
# Every other key of the composed config is part of the run's identity (run.json "identity").
RESUMABLE_CHANGES = ("name", "run_root", "data_dir", "download", "progress", "trainer", "logger", "eval.batch_size")
EDM_RESUMABLE_CHANGES = ("name", "run_root", "data_dir", "download", "progress", "trainer", "logger", "grid",
                         "edm.snapshot_kimg")


def config_identity(cfg: DictConfig, resumable: tuple[str, ...] = RESUMABLE_CHANGES) -> dict[str, Any]:
    """The resolved config as flat ``{"a.b": value}`` without the keys that may change on resume."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif not any(prefix == r or prefix.startswith(r + ".") for r in resumable):
            flat[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def is_launching_process() -> bool:
    """True in the process a user started (global rank 0 before any Trainer exists); false in the DDP ranks
    that Lightning or SLURM start for the same job."""
    for var in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value not in (None, "", "0"):
            return False
    return True


def describe(cfg: DictConfig, attack: AttackConfig, n_generated: int) -> dict[str, Any]:
    info = get_info(cfg.dataset.name)
    return {
        "name": None, "dataset": info.name, "data_dir": cfg.data_dir,
        "model": {"name": cfg.model.get("name"), "depth": int(cfg.model.depth), "width": int(cfg.model.width)},
        "num_classes": info.num_classes, "in_channels": info.image_shape[2],
        "norm": {"name": attack.norm, "eps": attack.eps, "step": attack.step, "steps": attack.steps},
        "loss": cfg.loss, "generated": cfg.generated, "n_generated": n_generated,
        "ratio": float(cfg.ratio) if cfg.generated else 1.0, "generated_sampling": cfg.generated_sampling,
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": float(cfg.lr), "beta": float(cfg.beta),
        "seed": cfg.seed, "limit_train": cfg.limit_train, "val_size": cfg.val_size,
        "last_batch": cfg.get("last_batch", "reference"),
        "eval": {"steps": int(cfg.eval.steps), "val_loss": cfg.eval.val_loss, "test_loss": cfg.eval.test_loss,
                 "select": cfg.eval.get("select", "pgd")},
        "precision": str(cfg.precision),
    }


# Config keys added after runs existed, with the value that reproduces what such a run did: a run started before
# the key existed resumes when the command asks for that behaviour (e.g. last_batch=fill), and is refused, saying
# so, when the new default would change its math.
ADDED_KEYS = {"last_batch": "fill", "val_seed": 0, "val_split": None, "debug_mode": None}


def identity_with_added_keys(identity: dict[str, Any], asked: dict[str, Any]) -> dict[str, Any]:
    """A recorded identity completed with the ADDED_KEYS that the ``asked`` identity has (TinyImageNet runs before
    val_split took their first images); an EDM run has none of them."""
    legacy = {k: v for k, v in ADDED_KEYS.items() if k in asked}
    if "val_split" in legacy and identity.get("dataset.name") == "tinyimagenet":
        legacy["val_split"] = "first"
    return {**legacy, **identity}


def check_resume(run_dir: Path, desc: dict[str, Any], fields: tuple[str, ...] = IDENTITY_FIELDS,
                 kind: str = "run", resumable: tuple[str, ...] = RESUMABLE_CHANGES) -> None:
    """Refuse to resume (or overwrite) ``run_dir`` when its run.json differs from ``desc`` in ``fields``."""
    path = run_dir / "run.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); restore it from a backup, or train into another name=... "
                          f"(this directory is left as it is)") from None
    diffs = [f"{k}: run has {json.dumps(old.get(k))}, you asked for {json.dumps(desc.get(k))}" for k in fields
             if json.dumps(old.get(k), sort_keys=True) != json.dumps(desc.get(k), sort_keys=True)]
    if "identity" in old and "identity" in desc:  # every key that changes the math (runs from this version on)
        a, b = identity_with_added_keys(old["identity"], desc["identity"]), desc["identity"]
        diffs += [f"{k}: run has {json.dumps(a.get(k))}, you asked for {json.dumps(b.get(k))}"
                  for k in sorted(set(a) | set(b)) if k not in fields and
                  json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)]
    if diffs:
        raise ConfigError(f"{path}: this run directory holds a different {kind}, refusing to resume or overwrite it:"
                          "\n  " + "\n  ".join(diffs) + "\nChoose another name=... (or run_root=...) for the new run; "
                          f"only {', '.join(resumable)} may change when a run resumes.")


def build_logger(cfg: DictConfig, run_dir: Path, name: str, job_type: str = "train"):
    kind = cfg.logger.name
    if kind == "none":
        return False
    if kind == "csv":
        # csv/version_<k>/metrics.csv: a resumed run starts a new version rather than overwriting the old log.
        return epochs_from_one(pl.loggers.CSVLogger(save_dir=str(run_dir), name="csv"))
    if kind == "wandb":
        if missing := missing_extra("wandb", "logger=wandb"):
            raise ConfigError(missing)
        return epochs_from_one(wandb_logger(cfg, run_dir, name, job_type, group=os.environ.get(SWEEP_ENV)))
    raise ConfigError(f"logger.name={kind!r}: choose csv, wandb or none")


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


def write_run_files(trainer: pl.Trainer, run_dir: Path, desc: dict[str, Any], cfg: DictConfig) -> None:
    """run.json (what the run is; checked on resume) and the resolved config.yaml, by rank 0."""
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "run.json", desc)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def build_datamodule(cfg: DictConfig) -> RobustDataModule:
    return RobustDataModule(
        get_info(cfg.dataset.name).name, cfg.batch_size, data_dir=cfg.data_dir, download=cfg.download,
        generated=cfg.generated, ratio=float(cfg.ratio), generated_sampling=cfg.generated_sampling, seed=cfg.seed,
        limit_train=cfg.limit_train, limit_test=cfg.limit_test, val_size=cfg.val_size,
        val_split=cfg.get("val_split"), val_seed=int(cfg.get("val_seed", 0)),
        last_batch=cfg.get("last_batch", "reference"),
        eval_batch_size=cfg.eval.batch_size, repeat_first_epoch=cfg.get("debug_mode") == "overfit",
    )


def build_module(cfg: DictConfig, attack: AttackConfig, iterations_per_epoch: int) -> AdversarialTraining:
    info = get_info(cfg.dataset.name)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = WideResNet(depth=int(cfg.model.depth), width=int(cfg.model.width), num_classes=info.num_classes,
                       in_channels=info.image_shape[2], mean=info.mean, std=info.std)
    return AdversarialTraining(
        model, attack, epochs=cfg.epochs, iterations_per_epoch=iterations_per_epoch, loss=cfg.loss,
        beta=float(cfg.beta), label_smoothing=float(cfg.label_smoothing), lr=float(cfg.lr),
        momentum=float(cfg.momentum), nesterov=bool(cfg.nesterov), weight_decay=float(cfg.weight_decay),
        schedule=cfg.schedule, cycle_momentum=bool(cfg.cycle_momentum), ema_decay=float(cfg.ema_decay),
        ema_warmup=float(cfg.ema_warmup), augmentation=info.augmentation, crop_padding=info.crop_padding,
        seed=cfg.seed, eval_batch_size=cfg.eval.batch_size, eval_steps=cfg.eval.steps,
        val_loss=cfg.eval.val_loss, test_loss=cfg.eval.test_loss, test_every=cfg.eval.test_every,
        select=cfg.eval.get("select", "pgd"),
        channels_last=bool(cfg.channels_last), compile=cfg.get("compile", False),
    )


def short_run_warning(total_steps: int, ema_decay: float) -> str | None:
    """A run too short for its own evaluation: the EMA model that is evaluated and saved averages the weights of
    about 1 / (1 − decay) optimiser steps (200 at the reference's 0.995) and takes BatchNorm statistics from the
    live model, so with fewer steps than that its accuracy lags the live model's by far."""
    memory = round(1 / (1 - ema_decay)) if ema_decay < 1 else None
    if memory is None or total_steps >= memory:
        return None
    return (f"this run has {total_steps} optimiser steps in all, fewer than the ~{memory} steps the EMA model "
            f"(decay {ema_decay:g}) averages over: the evaluated EMA model will lag the live model and its "
            f"accuracies mean little — train more steps (epochs, limit_train) for numbers worth reading")


def train(cfg: DictConfig, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Train (or resume, or skip if finished) the run in ``run_dir``; returns summary.json's content.

    With ``debug_mode`` set (the debug=fdr|limit|overfit config group) the run always starts from scratch:
    a debug run never resumes, and Hydra puts it under <run_root>/debug/, away from real runs."""
    run_dir = Path(run_dir)
    attack = validate(cfg)
    extra = user_callbacks(cfg)
    cfg.precision = resolve_precision(str(cfg.precision), str(cfg.trainer.accelerator))  # run.json records the choice
    info = get_info(cfg.dataset.name)
    dm = build_datamodule(cfg)
    store = dm.open_store()  # shape/class checks before anything long
    # One process per run directory for the life of the job (DDP ranks started for it don't take it).
    lock = DirectoryLock(run_dir, "robustdiff-train") if is_launching_process() else contextlib.nullcontext()
    with lock:
        return _train(cfg, run_dir, attack, info, dm, store, extra)


def _train(cfg: DictConfig, run_dir: Path, attack: AttackConfig, info, dm: RobustDataModule, store,
           extra_callbacks: list) -> dict[str, Any]:
    debug = cfg.get("debug_mode")
    if is_launching_process():
        remove_orphan_temporaries(run_dir)  # half-written files of a process that died mid-write
    desc = describe(cfg, attack, len(store) if store is not None else 0)
    desc["name"] = run_dir.name
    desc["identity"] = config_identity(cfg)
    if store is not None:  # the generated data's measured quality (robustdiff-fid score), not part of the identity
        desc["generated_quality"] = store.manifest.get("quality", [])
    summary_path = run_dir / "summary.json"
    select = cfg.eval.get("select", "pgd")
    if not debug:
        check_resume(run_dir, desc)
        # last.ckpt is the commit record: history and summary are re-derived from it, so a crash between two
        # publications of an epoch never leaves a run that looks finished (or unfinished) when it is not.
        if is_launching_process():
            committed = republish(run_dir, cfg.epochs, select)
        else:
            committed = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        if committed is not None and committed.get("finished"):
            stopped = committed.get("stopped_early")
            early = f", stopped early at epoch {stopped['epoch']}" if stopped else ""
            print(f"robustdiff: {run_dir} is already finished (best epoch {committed.get('best_epoch')}{early}); "
                  "nothing to do.")
            return committed
    else:
        desc["debug_mode"] = debug

    dm.setup("fit")
    module = build_module(cfg, attack, dm.iterations_per_epoch)
    desc["val_split"] = dm.val_split_info  # rule, seed, size and classes covered of the validation images
    checkpoint = RunCheckpoint(run_dir, monitor=f"val_{select}_acc")
    trainer = make_trainer(cfg, run_dir, [checkpoint, EpochSummary()], extra_callbacks=extra_callbacks,
                           max_epochs=cfg.epochs)
    write_run_files(trainer, run_dir, desc, cfg)
    resume = checkpoint.last_path if checkpoint.last_path.is_file() and not debug else None
    if resume is not None and trainer.is_global_zero:
        print(f"robustdiff: resuming {run_dir} from {resume}")
    short = short_run_warning(cfg.epochs * dm.iterations_per_epoch, module.ema.tau)
    if short and trainer.is_global_zero and resume is None:  # once, when the run starts
        print(f"robustdiff: warning: {short}", flush=True)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None, weights_only=True)
    finally:
        finish_wandb(trainer)
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"finished": False}
    if module.interrupted:
        summary["interrupted"] = True
        if checkpoint.received is not None:
            summary["signal"] = int(checkpoint.received)
    if debug:
        summary["debug_mode"] = debug
    if trainer.is_global_zero:
        print_summary(run_dir, summary)
    return summary


def print_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    if summary.get("interrupted"):
        print(f"robustdiff: stopped by a signal; state saved in {run_dir}/checkpoints/last.ckpt — "
              "run the same command again to resume (it continues from the saved step, bit for bit).")
        return
    if summary.get("debug_mode"):
        print(f"robustdiff: debug run ({summary['debug_mode']}) in {run_dir} done; debug runs never resume and "
              "are not real results.")
    if "best_epoch" not in summary:
        return
    if stopped := summary.get("stopped_early"):
        print(f"robustdiff: stopped early after epoch {stopped['epoch']} of {stopped['epochs']} by {stopped['by']}: "
              f"{stopped['reason']}")
    print(f"robustdiff: {run_dir}\n"
          f"  best epoch {summary['best_epoch']}: val PGD {fmt_acc(summary['best_val_pgd_acc'])}, "
          f"test clean {fmt_acc(summary['test_clean_acc_best'])}\n"
          f"  last epoch {summary['last_epoch']}: test clean {fmt_acc(summary['test_clean_acc_last'])}, "
          f"test PGD {fmt_acc(summary.get('test_pgd_acc_last'))}\n"
          f"  best model (EMA weights): {run_dir / 'model.pt'} (full state: {run_dir / 'checkpoints' / 'best.ckpt'})\n"
          f"  attack it (clean, PGD, AutoAttack): {eval_suggestion(run_dir)}")


def eval_suggestion(run_dir: Path, cuda: bool | None = None) -> str:
    """The robustdiff-eval command to print after training, sized for this machine: the full test set with
    standard AutoAttack on a GPU; on a CPU, where that takes many hours, a subset with APGD-CE first."""
    import torch

    cmd = f"robustdiff-eval {shlex.quote(str(run_dir))}"
    if torch.cuda.is_available() if cuda is None else cuda:
        return cmd
    return (f"{cmd} --n-examples 200 --aa-attacks apgd-ce\n"
            f"    (a subset: about a minute for a WRN-10-1 on 2 CPU cores; full standard AutoAttack of the whole "
            f"test set takes many hours on a CPU — run `{cmd}` on a GPU)")


def revalidate(run_dir: str | os.PathLike, ckpt: str = "best") -> dict[str, float]:
    """Re-evaluate a saved run with Lightning's ``trainer.validate(ckpt_path=...)``: the EMA model of
    ``checkpoints/<ckpt>.ckpt`` on the validation and test splits (clean and PGD), with the attack noise of the
    epoch that saved it, so the numbers equal the ones recorded in history.json for that epoch.
    Returns {"epoch/val_pgd_acc": ..., "epoch/test_clean_acc": ..., "epoch/test_pgd_acc": ...}."""
    run_dir = Path(run_dir)
    path = run_dir / "checkpoints" / f"{ckpt}.ckpt"
    config = run_dir / "config.yaml"
    if not path.is_file() or not config.is_file():
        raise ConfigError(f"{path if config.is_file() else config}: not found; give a run directory written by "
                          "robustdiff-train and a checkpoint name (best or last)")
    cfg = OmegaConf.load(config)
    cfg.logger = {"name": "none"}
    cfg.trainer.enable_progress_bar = False
    attack = validate(cfg)
    dm = build_datamodule(cfg)
    dm.setup("validate")
    module = build_module(cfg, attack, dm.iterations_per_epoch)
    trainer = make_trainer(cfg, run_dir, [], max_epochs=cfg.epochs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
        # The checkpoint's RunCheckpoint state is not needed to evaluate it.
        warnings.filterwarnings("ignore", message=r".*callbacks used to create the checkpoint need to be provided")
        results = trainer.validate(module, datamodule=dm, ckpt_path=str(path), weights_only=True, verbose=False)
    return {k: float(v) for k, v in results[0].items()}
