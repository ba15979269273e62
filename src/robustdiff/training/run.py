"""Build and run one adversarial-training (TRADES) job from a composed config: train, resume or skip the run in
its directory, print what it achieved, and re-evaluate a saved checkpoint (thin glue, no math)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..adversarial.trades import AttackConfig
from ..data.datamodule import RobustDataModule, datamodule_class, datamodule_kwargs
from ..data.datasets import get_info
from ..models.build import ModelTargetError, dataset_kwargs, model_class, model_kwargs, unknown_kwargs, wrap
from ..models.wrn import BN_MOMENTUM, set_bn_momentum
from ..utils import naming  # noqa: F401  (importing it registers the rd_* resolvers the configs use)
from ..utils.formatting import percent
from ..utils.hardware import resolve_precision
from ..utils.io import remove_orphan_temporaries
from ..utils.lock import DirectoryLock
from .adversarial import AdversarialTraining
from .callbacks import EpochSummary, RunCheckpoint, republish
from .config import ConfigError, validate
from .resume import check_resume, config_identity, write_run_files
from .trainer import fit_run, is_launching_process, job_warnings, make_trainer, user_callbacks


def model_record(cfg: DictConfig) -> dict[str, Any]:
    """run.json's ``model``: the resolved model node (``_target_``, ``name`` and the constructor's kwargs), checked
    to name an importable ``nn.Module`` class (a ConfigError otherwise, before any data is read)."""
    node = OmegaConf.to_container(cfg.model, resolve=True)
    if not isinstance(node, dict):
        raise ConfigError(f"model={node!r}: choose a model config (model=wrn-28-10, model=preactresnet18) or give "
                          "model._target_=<package.Class> with its kwargs")
    try:
        cls = model_class(node.get("_target_"))
    except ModelTargetError as e:
        raise ConfigError(str(e)) from None
    if extra := unknown_kwargs(cls, model_kwargs(node)):
        raise ConfigError(
            f"model._target_={node['_target_']!r} does not take {', '.join('model.' + k for k in extra)}: "
            f"remove {'them' if len(extra) > 1 else 'it'} ({' '.join('~model.' + k for k in extra)} on the command "
            "line) or choose a model config of its own; num_classes, in_channels, mean and std come from the dataset")
    record = {"name": node.get("name"), **node}
    for key in ("depth", "width"):  # WideResNet readers (reports, export) read these as integers
        if key in record:
            record[key] = int(record[key])
    return record


def describe(cfg: DictConfig, attack: AttackConfig, n_generated: int) -> dict[str, Any]:
    info = get_info(cfg.dataset.name)
    return {
        "name": None, "dataset": info.name, "data_dir": cfg.data_dir,
        "model": model_record(cfg),
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


def build_datamodule(cfg: DictConfig) -> RobustDataModule:
    """The ``data`` node's DataModule (`RobustDataModule` or a subclass), its arguments from the top-level keys."""
    node = OmegaConf.to_container(cfg.data, resolve=True)
    cls = datamodule_class(node.get("_target_"), error=ConfigError)
    return cls(
        get_info(cfg.dataset.name).name, cfg.batch_size, data_dir=cfg.data_dir, download=cfg.download,
        generated=cfg.generated, ratio=float(cfg.ratio), generated_sampling=cfg.generated_sampling, seed=cfg.seed,
        limit_train=cfg.limit_train, limit_test=cfg.limit_test, val_size=cfg.val_size,
        val_split=cfg.get("val_split"), val_seed=int(cfg.get("val_seed", 0)),
        last_batch=cfg.get("last_batch", "reference"),
        eval_batch_size=cfg.eval.batch_size, repeat_first_epoch=cfg.get("debug_mode") == "overfit",
        **datamodule_kwargs(node),
    )


def build_module(cfg: DictConfig, attack: AttackConfig, iterations_per_epoch: int) -> AdversarialTraining:
    info = get_info(cfg.dataset.name)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    record = model_record(cfg)
    cls = model_class(record["_target_"])
    accepted = dataset_kwargs(cls, num_classes=info.num_classes, in_channels=info.image_shape[2], mean=info.mean,
                              std=info.std)
    node = OmegaConf.create({k: v for k, v in record.items() if k != "name"})
    model = instantiate(node, **accepted, _convert_="all")
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model._target_={record['_target_']!r} built a {type(model).__name__}, not a "
                          "torch.nn.Module; point it at the network's class")
    model = wrap(model, accepted, in_channels=info.image_shape[2], mean=info.mean, std=info.std)
    # Training's BatchNorm momentum (1 on the first step, then 0.01) from the start, whatever the network's default:
    # a run resumed from a checkpoint trains on with the same momentum as one that never stopped.
    set_bn_momentum(model, BN_MOMENTUM)
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
    with job_warnings():
        attack = validate(cfg)
        extra = user_callbacks(cfg)
        cfg.precision = resolve_precision(str(cfg.precision), str(cfg.trainer.accelerator))  # run.json records it
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
    summary = fit_run(trainer, module, dm, resume, summary_path, checkpoint, weights_only=True)
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
          f"  best epoch {summary['best_epoch']}: val PGD {percent(summary['best_val_pgd_acc'])}, "
          f"test clean {percent(summary['test_clean_acc_best'])}\n"
          f"  last epoch {summary['last_epoch']}: test clean {percent(summary['test_clean_acc_last'])}, "
          f"test PGD {percent(summary.get('test_pgd_acc_last'))}\n"
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
    with job_warnings():
        trainer = make_trainer(cfg, run_dir, [], max_epochs=cfg.epochs)
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
        # The checkpoint's RunCheckpoint state is not needed to evaluate it.
        warnings.filterwarnings("ignore", message=r".*callbacks used to create the checkpoint need to be provided")
        results = trainer.validate(module, datamodule=dm, ckpt_path=str(path), weights_only=True, verbose=False)
    return {k: float(v) for k, v in results[0].items()}
