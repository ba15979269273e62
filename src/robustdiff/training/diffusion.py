"""The Lightning module for EDM training of a class-conditional SongUNet, its snapshot callback and the
network file it writes (docs/method.md, "The generator (EDM)"); ``edm_run`` runs the job.

The math (preconditioning, loss, augmentation, sampler) lives in ``robustdiff.diffusion``; this module
owns the loop around it, following NVIDIA's ``training_loop.py``:

* Adam(0.9, 0.999, eps 1e-8), no weight decay; lr ramped linearly over the first ``lr_rampup_kimg``
  thousand images (lr·min(images_before_step / rampup, 1), so the very first step has lr 0), then
  constant. Gradients pass through nan_to_num (nan → 0, ±inf → ±1e5); no clipping.
* EMA with half-life h = min(ema_halflife_kimg·1000, ema_rampup·images_before_step) images and
  β = 0.5^(batch / max(h, 1e-8)); buffers are copied.
* Duration and snapshots are counted in images of the global batch.

Every step's randomness (σ, noise, augmentation, dropout) comes from seeds derived from
(seed, step, rank), and the data position is part of the checkpoint, so a resumed run continues
exactly as an uninterrupted one.

Files in the run directory: ``checkpoints/last.ckpt`` (full state; on each snapshot, at the end and
on SIGTERM/SIGUSR1), ``network.pt`` (EMA network: {"kwargs", "ema"}, plain tensors, loads with
``weights_only=True``; see ``load_network``), ``samples/grid-<kimg>.png``, ``run.json``,
``config.yaml``, ``summary.json``.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint

from ..data.augment import to_float_nchw
from ..data.classes import class_names
from ..diffusion.augment import AUGMENT_DIM, AugmentPipe
from ..diffusion.edm import EDMPrecond, edm_loss
from ..diffusion.sampler import sample_images
from ..models.unet import unet_preset
from ..utils.images import image_grid, labelled_grid, save_png
from ..utils.io import UnreadableWeightsError, atomic_torch_save, atomic_write_json, load_weights
from ..utils.signals import install_stop_handlers, restore_handlers, stop_requested
from .adversarial import step_seed

NETWORK_FORMAT = "robustdiff-edm-network"



class NetworkFileError(ValueError):
    """A file is not a robustdiff EDM network (network.pt) or does not fit what it is used for."""


# ---------------------------------------------------------------------------------------------------- networks


def network_kwargs(preset: str, img_resolution: int, img_channels: int, label_dim: int,
                   dropout: float | None = None, augment: bool = True) -> dict[str, Any]:
    """EDMPrecond constructor kwargs (precond + SongUNet) for a SongUNet preset; plain Python values."""
    kwargs = unet_preset(preset, img_resolution)
    if dropout is not None:
        kwargs["dropout"] = float(dropout)
    kwargs["augment_dim"] = AUGMENT_DIM if augment else 0
    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    return dict(img_resolution=int(img_resolution), img_channels=int(img_channels), label_dim=int(label_dim),
                sigma_min=0.0, sigma_max=float("inf"), sigma_data=0.5, **kwargs)


def save_network(path: str | os.PathLike, kwargs: dict[str, Any], ema: torch.nn.Module,
                 extra: dict[str, Any] | None = None) -> None:
    """Write ``network.pt`` atomically: {"format", "kwargs", "ema": state dict on CPU, **extra}."""
    state = {k: v.detach().cpu().clone() for k, v in ema.state_dict().items()}
    atomic_torch_save({"format": NETWORK_FORMAT, "kwargs": dict(kwargs), "ema": state, **(extra or {})}, path)


def load_network(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[EDMPrecond, dict]:
    """Load a ``network.pt`` written by robustdiff-edm (weights_only, never plain unpickling).

    Returns (EDMPrecond in eval mode on ``device``, the file's dict without the weights)."""
    path = Path(path)
    if not path.is_file():
        raise NetworkFileError(f"{path}: no such network file (expected a robustdiff-edm network.pt or an "
                               f"NVIDIA EDM .pkl)")
    try:
        obj = load_weights(path, "a robustdiff-edm network.pt")
    except UnreadableWeightsError as e:
        raise NetworkFileError(str(e)) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("kwargs"), dict) or not isinstance(obj.get("ema"), dict):
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise NetworkFileError(
            f"{path}: not an EDM network file — expected a dict with 'kwargs' and 'ema' (network.pt written by "
            f"robustdiff-edm), got {keys}. A classifier (model.pt) or a Lightning .ckpt is not a generator."
        )
    try:
        net = EDMPrecond(**obj["kwargs"])
        net.load_state_dict(obj["ema"], strict=True)
    except (TypeError, ValueError, RuntimeError) as e:
        raise NetworkFileError(f"{path}: its kwargs/ema do not build an EDMPrecond(SongUNet): {e}") from e
    info = {k: v for k, v in obj.items() if k != "ema"}
    return net.eval().requires_grad_(False).to(device), info


# ---------------------------------------------------------------------------------------------------- sample grid


def sample_grid(net: EDMPrecond, num_classes: int, rows: int, seed: int, num_steps: int,
                batch_size: int = 256, class_names: list[str] | None = None) -> np.ndarray:
    """``rows`` samples of every class, one grid row per class labelled with its name (unconditional: ``rows``
    rows of 10, unlabelled), padded and, for images of ≤ 32 px, upscaled 4× (nearest; 2× beyond 20 classes).
    The samples are images 0 … rows·classes − 1 of ``sample_images`` (image i has class i mod classes).
    Returns uint8 (H, W, 3) labelled, (H, W, C) unconditional."""
    cols = num_classes if net.label_dim else 10
    images, _ = sample_images(net, range(rows * cols), cols, seed=seed, num_steps=num_steps,
                              batch_size=batch_size)
    if not net.label_dim:
        return image_grid(images, nrow=cols)
    by_class = images.reshape(rows, cols, *images.shape[1:]).swapaxes(0, 1).reshape(images.shape)
    names = class_names or [f"class {k}" for k in range(cols)]
    return labelled_grid(by_class, nrow=rows, row_labels=names, upscale=4 if cols <= 20 else 2)


def kimg_label(images: int) -> str:
    """'002500' for 2.5M images, '000000.256' for 256 (zero-padded so file names sort)."""
    return f"{images / 1000:010.3f}".rstrip("0").rstrip(".")


# ---------------------------------------------------------------------------------------------------- the module


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device):
    """Run a block with the global RNG (used by dropout) seeded to `seed`; restore it afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class EDMTraining(pl.LightningModule):
    """EDM denoising-score-matching training of ``EDMPrecond(**net_kwargs)`` with an EMA copy.

    Batches are the DataModule's dicts (uint8 (B, H, W, C) images); ``crop`` center-crops them to
    crop × crop. ``batch_size`` is the global batch (all ranks): it counts images for the lr ramp,
    the EMA and the duration.
    """

    def __init__(self, net_kwargs: dict[str, Any], *, batch_size: int, lr: float = 1e-3,
                 lr_rampup_kimg: float = 10_000, ema_halflife_kimg: float = 500, ema_rampup: float | None = 0.05,
                 augment_p: float = 0.12, seed: int = 0, crop: int | None = None):
        super().__init__()
        self.net_kwargs = dict(net_kwargs)
        self.net = EDMPrecond(**self.net_kwargs)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.augment_pipe = AugmentPipe(p=augment_p) if augment_p > 0 else None
        self.batch_size, self.lr, self.lr_rampup_kimg = int(batch_size), float(lr), float(lr_rampup_kimg)
        self.ema_halflife_kimg = float(ema_halflife_kimg)
        self.ema_rampup = None if ema_rampup is None else float(ema_rampup)
        self.seed, self.crop = int(seed), crop
        self.consumed = (0, 0)  # (epoch, batches of that epoch whose optimiser step ran): the data position
        self.interrupted = False

    @property
    def images_seen(self) -> int:
        return int(self.global_step) * self.batch_size

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=0.0)
        rampup = self.lr_rampup_kimg * 1000

        def ramp(step: int) -> float:  # step = optimiser steps taken before this one
            return 1.0 if rampup <= 0 else min(step * self.batch_size / rampup, 1.0)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, ramp)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        x = to_float_nchw(batch["image"])  # [0, 1]
        if self.crop is not None and self.crop < x.shape[-1]:
            top, left = (x.shape[-2] - self.crop) // 2, (x.shape[-1] - self.crop) // 2
            x = x[..., top:top + self.crop, left:left + self.crop]
        batch["x"] = x * 2 - 1  # the generator's range [-1, 1]
        return batch

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        step, rank = int(self.global_step), int(self.global_rank)
        g = torch.Generator(device=self.device)
        g.manual_seed(step_seed(self.seed, 0, step, rank))
        labels = batch["label"] if self.net.label_dim else None
        with seeded_global_rng(step_seed(self.seed, 1, step, rank), self.device):  # dropout
            loss = edm_loss(self.net, batch["x"], labels, self.augment_pipe, generator=g)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        self.consumed = (batch["epoch"], batch["step"] + 1)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        for p in self.net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)

    def optimizer_step(self, *args, **kwargs) -> None:
        images_before_step = self.images_seen  # global_step counts this step only once the hook returns
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: callbacks (snapshots) run before the module's batch-end hook.
        self.update_ema(images_before_step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("kimg", self.images_seen / 1000, on_step=True, on_epoch=False, rank_zero_only=True)

    @torch.no_grad()
    def update_ema(self, images_before_step: int) -> float:
        halflife = self.ema_halflife_kimg * 1000
        if self.ema_rampup is not None:
            halflife = min(halflife, self.ema_rampup * images_before_step)
        beta = 0.5 ** (self.batch_size / max(halflife, 1e-8))
        # ema = β·ema + (1 − β)·net
        torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in self.net.parameters()], 1.0 - beta)
        for dst, src in zip(self.ema.buffers(), self.net.buffers()):
            dst.copy_(src)
        return beta

    def train(self, mode: bool = True):
        super().train(mode)
        self.ema.eval()  # the average never runs dropout
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["robustdiff"] = {"consumed": list(self.consumed), "net_kwargs": self.net_kwargs}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.consumed = tuple(checkpoint.get("robustdiff", {}).get("consumed", (0, 0)))


# ---------------------------------------------------------------------------------------------------- run files


def edm_summary(finished: bool, images: int, steps: int) -> dict[str, Any]:
    return {"finished": bool(finished), "kimg": images / 1000, "steps": int(steps)}


class EDMSnapshot(Checkpoint):
    """Every ``snapshot_kimg`` (and at the end, and on SIGTERM/SIGUSR1): ``checkpoints/last.ckpt``,
    ``network.pt`` and a sample grid of the EMA network; scheduled snapshots also keep
    ``snapshots/network-<kimg>.pt``."""

    def __init__(self, run_dir: Path, snapshot_kimg: float, grid_rows: int = 4, grid_steps: int = 18,
                 grid_seed: int = 0, extra: dict | None = None, keep_networks: bool = True):
        super().__init__()
        self.keep_networks = keep_networks
        self.run_dir = Path(run_dir)
        self.snapshot_images = max(1, round(snapshot_kimg * 1000))
        self.grid_rows, self.grid_steps, self.grid_seed = grid_rows, grid_steps, grid_seed
        self.extra = extra or {}
        self._signal: int | None = None  # the signal to act on at the next step boundary
        self.received: int | None = None  # the signal that came (summary.json "signal")
        self._previous: dict[int, Any] = {}

    @property
    def last_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    def on_train_start(self, trainer: pl.Trainer, pl_module: EDMTraining) -> None:
        self._previous = install_stop_handlers(self._handle)

    def _handle(self, signum, frame) -> None:
        self._signal = self.received = stop_requested(signum, self.received)

    def on_train_end(self, trainer: pl.Trainer, pl_module: EDMTraining) -> None:
        restore_handlers(self._previous)

    def on_train_batch_end(self, trainer, pl_module: EDMTraining, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        stop = self._signal is not None
        if trainer.world_size > 1:  # a signal reaches one rank; every rank must stop on the same step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        images = step * pl_module.batch_size
        due = images // self.snapshot_images > (images - pl_module.batch_size) // self.snapshot_images
        last = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        if stop:
            pl_module.interrupted = True
            trainer.should_stop = True
        if due or last or stop:
            self.snapshot(trainer, pl_module, finished=last and not stop, scheduled=due or last)

    def snapshot(self, trainer: pl.Trainer, pl_module: EDMTraining, finished: bool, scheduled: bool = False) -> None:
        """Publish a snapshot; ``last.ckpt`` (full state: optimiser, loops, data) goes last as the commit record,
        so a crash part-way leaves the previous snapshot's state, and the rerun redoes and republishes this one."""
        if trainer.is_global_zero:
            images = pl_module.images_seen
            save_network(self.run_dir / "network.pt", pl_module.net_kwargs, pl_module.ema,
                         {"kimg": images / 1000, **self.extra})
            if scheduled and self.keep_networks:
                # Like NVIDIA's network-snapshot-*.pkl: every scheduled snapshot stays, so generators of several
                # training lengths come from one run (a snapshot at k kimg is what a k-kimg run would end with).
                save_network(self.run_dir / "snapshots" / f"network-{kimg_label(images)}.pt", pl_module.net_kwargs,
                             pl_module.ema, {"kimg": images / 1000, **self.extra})
            path = self.run_dir / "samples" / f"grid-{kimg_label(images)}.png"
            if self.grid_rows > 0:
                label_dim = pl_module.net.label_dim
                grid = sample_grid(pl_module.ema, label_dim, self.grid_rows, self.grid_seed, self.grid_steps,
                                   class_names=class_names(self.extra.get("dataset"), label_dim))
                save_png(path, grid)
                log_image(trainer, path, images)
            atomic_write_json(self.run_dir / "summary.json", edm_summary(finished, images, trainer.global_step))
        trainer.save_checkpoint(self.last_path, weights_only=False)

    def on_exception(self, trainer: pl.Trainer, pl_module: EDMTraining, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)  # give the signal handlers back

    def state_dict(self) -> dict:
        return {}


def log_image(trainer: pl.Trainer, path: Path, images: int) -> None:
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            logger.experiment.log({"samples": wandb.Image(str(path), caption=f"{images / 1000:g} kimg"),
                                   "trainer/global_step": trainer.global_step})



__all__ = ["EDMSnapshot", "EDMTraining", "NetworkFileError", "load_network", "network_kwargs", "sample_grid",
           "save_network"]
