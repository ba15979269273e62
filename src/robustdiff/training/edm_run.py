"""Run one EDM training job (robustdiff-edm) from a composed config: check the settings before any data is
read, then train, resume or skip the run in its directory (files: see ``training.diffusion``)."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig

from ..data.datamodule import RobustDataModule
from ..models.unet import UNET_PRESETS, resolution_pyramid
from ..utils.io import atomic_write_json, remove_orphan_temporaries
from ..utils.lock import DirectoryLock
from .callbacks import load_checkpoint_file
from .config import ConfigError, check_edm_keys, dataset_info, need
from .diffusion import EDMSnapshot, EDMTraining, edm_summary, network_kwargs
from .resume import EDM_RESUMABLE_CHANGES, check_resume, config_identity, write_run_files
from .trainer import fit_run, is_launching_process, job_warnings, logger_target, make_trainer

# Fields that define what an EDM run is: resuming with any of them changed is refused.
IDENTITY_FIELDS = ("dataset", "resolution", "label_dim", "network", "kwargs", "batch_size", "lr",
                   "lr_rampup_kimg", "duration_kimg", "ema_halflife_kimg", "ema_rampup", "augment_p", "seed",
                   "limit_train", "val_size")


def validate(cfg: DictConfig) -> dict[str, Any]:
    """Range checks that must fail before any data is read; returns the run's description (run.json)."""
    check_edm_keys(cfg)
    info = dataset_info(cfg)
    e = cfg.edm
    need(e.network in UNET_PRESETS, f"edm.network={e.network!r}: choose a SongUNet preset of {sorted(UNET_PRESETS)}")
    size, channels = info.image_shape[0], info.image_shape[2]
    resolution = size if cfg.resolution is None else cfg.resolution
    need(isinstance(resolution, int) and 1 <= resolution <= size,
         f"resolution={cfg.resolution!r}: images are center-cropped to resolution×resolution, so it must be an "
         f"integer in [1, {size}] for dataset {info.name} ({size}×{size}), or null for the full size")
    levels = len(UNET_PRESETS[e.network]["channel_mult"])
    try:
        resolution_pyramid(resolution, levels)
    except ValueError as err:
        where = f"resolution={resolution}" if cfg.resolution is not None else f"dataset {info.name} ({resolution} px)"
        raise ConfigError(f"{where}: the {e.network} network (edm.network) cannot take this image size — {err}") from None
    label_dim = info.num_classes if cfg.label_dim is None else cfg.label_dim
    need(label_dim in (0, info.num_classes),
         f"label_dim={cfg.label_dim!r} but dataset {info.name} has {info.num_classes} classes: use label_dim=null "
         f"(class-conditional on all {info.num_classes}) or label_dim=0 (unconditional)")
    need(isinstance(e.batch_size, int) and e.batch_size >= 1, f"edm.batch_size={e.batch_size!r} must be an integer >= 1")
    need(isinstance(cfg.get("progress", True), bool), f"progress={cfg.get('progress')!r}: true or false")
    val_size = cfg.get("val_size", 0)
    limit = cfg.limit_train or info.n_train
    need(isinstance(val_size, int) and not isinstance(val_size, bool) and 0 <= val_size < limit,
         f"val_size={val_size!r} must be a whole number in [0, {limit}) (the first val_size of the "
         f"{'limit_train=' + str(cfg.limit_train) if cfg.limit_train else str(info.n_train)} training images are "
         f"left out, so the generator never sees the classifier's validation images)")
    devices = cfg.trainer.devices
    world = (devices if isinstance(devices, int) and devices > 0 else 1) * int(cfg.trainer.num_nodes)
    need(e.batch_size % world == 0, f"edm.batch_size={e.batch_size} must be divisible by the {world} processes")
    for key in ("lr", "duration_kimg", "snapshot_kimg"):
        need(float(e[key]) > 0, f"edm.{key}={e[key]} must be > 0")
    for key in ("lr_rampup_kimg", "ema_halflife_kimg"):
        need(float(e[key]) >= 0, f"edm.{key}={e[key]} must be >= 0")
    need(e.ema_rampup is None or float(e.ema_rampup) > 0, f"edm.ema_rampup={e.ema_rampup} must be > 0 or null")
    need(0 <= float(e.augment_p) <= 1, f"edm.augment_p={e.augment_p} must be in [0, 1]")
    need(0 <= float(e.dropout) < 1, f"edm.dropout={e.dropout} must be in [0, 1)")
    kwargs = network_kwargs(e.network, resolution, channels, label_dim, dropout=float(e.dropout),
                            augment=float(e.augment_p) > 0)
    logger_target(cfg)
    return {
        "dataset": info.name, "resolution": resolution, "label_dim": label_dim, "network": e.network,
        "kwargs": kwargs, "batch_size": e.batch_size, "lr": float(e.lr), "lr_rampup_kimg": float(e.lr_rampup_kimg),
        "duration_kimg": float(e.duration_kimg), "ema_halflife_kimg": float(e.ema_halflife_kimg),
        "ema_rampup": None if e.ema_rampup is None else float(e.ema_rampup), "augment_p": float(e.augment_p),
        "seed": cfg.seed, "limit_train": cfg.limit_train, "snapshot_kimg": float(e.snapshot_kimg),
        "max_steps": math.ceil(float(e.duration_kimg) * 1000 / e.batch_size),
        # recorded only when images are left out, so a run without val_size resumes under either spelling
        **({"val_size": val_size} if val_size else {}),
    }


def edm_datamodule(cfg: DictConfig, desc: dict[str, Any]) -> RobustDataModule:
    """The real images an EDM run trains on: the first limit_train, less the val_size that robustdiff-train
    (same dataset, limit_train and val_size, its default split) validates on. Set up, ready to iterate."""
    dm = RobustDataModule(desc["dataset"], cfg.edm.batch_size, data_dir=cfg.data_dir, download=cfg.download,
                          seed=cfg.seed, limit_train=cfg.limit_train, val_size=int(desc.get("val_size", 0)),
                          last_batch="fill")
    dm.setup("fit")
    return dm


def train_edm(cfg: DictConfig, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Train (or resume, or skip if finished) the EDM run in ``run_dir``; returns summary.json's content."""
    run_dir = Path(run_dir)
    desc = validate(cfg)
    desc["name"] = run_dir.name
    lock = DirectoryLock(run_dir, "robustdiff-edm") if is_launching_process() else contextlib.nullcontext()
    with job_warnings(), lock:
        return _train_edm(cfg, run_dir, desc)


def _train_edm(cfg: DictConfig, run_dir: Path, desc: dict[str, Any]) -> dict[str, Any]:
    if is_launching_process():
        remove_orphan_temporaries(run_dir, ("", "checkpoints", "snapshots", "samples"))
    desc["identity"] = config_identity(cfg, EDM_RESUMABLE_CHANGES)
    check_resume(run_dir, desc, IDENTITY_FIELDS, kind="EDM run", resumable=EDM_RESUMABLE_CHANGES)
    summary_path = run_dir / "summary.json"
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file() and is_launching_process():
        # last.ckpt is the commit record: summary.json is re-derived from it (a crash between the two must not
        # leave a run that looks finished).
        step = int(load_checkpoint_file(last, mmap=True)["global_step"])
        atomic_write_json(summary_path, edm_summary(step >= desc["max_steps"], step * int(cfg.edm.batch_size), step))
    if last.is_file() and summary_path.is_file() and json.loads(summary_path.read_text()).get("finished"):
        summary = json.loads(summary_path.read_text())
        print(f"robustdiff-edm: {run_dir} is already finished ({summary.get('kimg')} kimg); nothing to do.")
        return summary

    e = cfg.edm
    # last_batch=fill: every batch full, a continuous stream of permutations like EDM's infinite sampler (images
    # are counted as steps × batch_size).
    dm = edm_datamodule(cfg, desc)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the initial weights
    module = EDMTraining(desc["kwargs"], batch_size=e.batch_size, lr=desc["lr"], lr_rampup_kimg=desc["lr_rampup_kimg"],
                         ema_halflife_kimg=desc["ema_halflife_kimg"], ema_rampup=desc["ema_rampup"],
                         augment_p=desc["augment_p"], seed=cfg.seed, crop=desc["resolution"])
    snapshot = EDMSnapshot(run_dir, desc["snapshot_kimg"], grid_rows=cfg.grid.rows, grid_steps=cfg.grid.steps,
                           grid_seed=cfg.grid.seed, extra={"dataset": desc["dataset"]})
    trainer = make_trainer(cfg, run_dir, [snapshot], job_type="edm", validation=False, max_steps=desc["max_steps"],
                           max_epochs=-1)
    write_run_files(trainer, run_dir, desc, cfg)
    resume = snapshot.last_path if snapshot.last_path.is_file() else None
    if resume is not None and trainer.is_global_zero:
        print(f"robustdiff-edm: resuming {run_dir} from {resume}")
    every = trainer.log_every_n_steps
    if resume is None and trainer.is_global_zero and desc["max_steps"] < every:  # said once, when the run starts
        print(f"robustdiff-edm: warning: this run has {desc['max_steps']} optimiser steps and the loss is logged "
              f"every {every} (trainer.log_every_n_steps): no loss curve will be recorded — set "
              f"trainer.log_every_n_steps={max(1, desc['max_steps'] // 10)} for one", flush=True)
    quiet = (r".*module\(s\) in eval mode",  # the EMA copy, on purpose
             r".*val_dataloader` but have no `validation_step")  # no evaluation
    summary = fit_run(trainer, module, dm, resume, summary_path, snapshot, quiet=quiet)
    if module.interrupted:
        if trainer.is_global_zero:
            print(f"robustdiff-edm: stopped by a signal; state saved in {snapshot.last_path} — run the same "
                  f"command again to resume.")
    elif trainer.is_global_zero:
        print(f"robustdiff-edm: {run_dir}: {summary.get('kimg')} kimg; EMA network in {run_dir / 'network.pt'}")
    return summary


__all__ = ["edm_datamodule", "train_edm", "validate"]
