"""Lightning glue for TRADES / PGD-AT training of a WideResNet (docs/method.md, "TRADES").

The math lives in ``robustdiff.adversarial``; this module owns the loop: per-step randomness,
the BN-momentum rule, EMA, the per-epoch "cosinew" schedule, evaluation of the EMA model in Lightning's
validation loop (dataloader 0: the validation split, 1: the test split; also ``trainer.validate``),
epoch means through torchmetrics, and the state that a resumed run needs (history, best score, metric
sums, RNG states).
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MeanMetric

from ..adversarial.attacks import pgd_attack
from ..adversarial.trades import AttackConfig, pgd_at_loss, standard_loss, trades_loss
from ..conf.schema import choices
from ..data.augment import augment_images, to_float_nchw
from ..models.wrn import bn_parameter_names, set_bn_momentum
from ..utils.choices import COMPILE_CHOICES
from ..utils.hardware import allow_graphs
from .ema import EMA
from .schedule import CosineW

LOSSES = choices("loss")
SELECT = choices("eval.select")  # the validation accuracy that picks the best epoch
SCHEDULES = choices("schedule")
TRAIN_METRICS = ("train_loss", "train_loss_natural", "train_loss_robust", "train_acc_natural", "train_acc_adv")
EVAL_METRICS = ("val_clean_acc", "val_pgd_acc", "test_clean_acc", "test_pgd_acc")


def step_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from (seed, keys...): every step's randomness is a pure function of its position."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1 << 31, 1], dtype=np.uint64)) & ((1 << 63) - 1))


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class AdversarialTraining(pl.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        attack: AttackConfig,
        *,
        epochs: int,
        iterations_per_epoch: int,
        loss: str = "trades",
        beta: float = 5.0,
        label_smoothing: float = 0.1,
        lr: float = 0.2,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        schedule: str = "cosinew",
        cycle_momentum: bool = True,
        ema_decay: float = 0.995,
        ema_warmup: float = 0.025,
        augmentation: str = "crop_flip",
        crop_padding: int = 4,
        seed: int = 0,
        eval_batch_size: int = 256,
        eval_steps: int = 40,
        val_loss: str = "cw",
        test_loss: str = "cw",
        test_every: int = 25,
        select: str = "pgd",
        channels_last: bool = False,
        compile: bool | str = False,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if select not in SELECT:
            raise ValueError(f"select must be one of {SELECT}, got {select!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.attack = attack
        self.epochs, self.iterations_per_epoch = epochs, iterations_per_epoch
        self.loss_name, self.beta, self.label_smoothing = loss, beta, label_smoothing
        self.lr, self.momentum, self.nesterov, self.weight_decay = lr, momentum, nesterov, weight_decay
        self.schedule, self.cycle_momentum = schedule, cycle_momentum
        self.ema = EMA(self.model, tau=ema_decay, warmup_steps=ema_warmup * epochs * iterations_per_epoch)
        self.augmentation, self.crop_padding, self.seed = augmentation, crop_padding, seed
        self.eval_batch_size, self.eval_steps = eval_batch_size, eval_steps
        self.val_loss, self.test_loss, self.test_every = val_loss, test_loss, test_every
        self.select = select
        self.channels_last = channels_last
        if compile not in COMPILE_CHOICES:
            raise ValueError(f"compile must be false, true or a torch.compile mode, got {compile!r}")
        self.compile = compile
        # The compiled wrapper shares the model's parameters; kept in a tuple so that it is not registered as a
        # submodule (the checkpoint keeps the plain key layout).
        self._compiled: tuple[nn.Module, ...] = ()
        # State a resumed run needs beyond weights/optimiser (saved in on_save_checkpoint).
        self.history: list[dict[str, Any]] = []
        self.best_score = -math.inf
        self.best_epoch = -1
        self.last_is_best = False
        self.interrupted = False
        self.stopped_early: dict[str, Any] | None = None  # set by RunCheckpoint when a callback ends the run early
        self.consumed = (0, 0)  # (epoch, batches of that epoch whose optimiser step ran)
        self._epoch_lr = lr
        # Epoch means through torchmetrics: summed over ranks when computed (DDP). "disable": no NaN check,
        # which would read a tensor on the host in every step.
        self.train_metrics = nn.ModuleDict({k: MeanMetric(nan_strategy="disable") for k in TRAIN_METRICS})
        self.eval_metrics = nn.ModuleDict({k: MeanMetric(nan_strategy="disable") for k in EVAL_METRICS})
        self._eval_generators: dict[int, torch.Generator] = {}
        self._run_test_pgd = False
        # Timing of the current epoch (console and logger only).
        self._train_started: float | None = None
        self._eval_started = 0.0
        self._images = 0
        self._train_time = self._eval_time = self.images_per_s = 0.0

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        no_decay = bn_parameter_names(self.model)
        decay, plain = [], []
        for name, p in self.model.named_parameters():
            (plain if name in no_decay else decay).append(p)
        optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": plain, "weight_decay": 0.0}],
            lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
        )
        if self.schedule == "constant":
            return optimizer
        # The reference "cosinew": OneCycleLR over epochs, stepped once per epoch, PyTorch defaults
        # (div 25, final div 1e4, cosine) including the momentum cycle 0.95 -> 0.85 -> 0.95.
        scheduler = CosineW(optimizer, max_lr=self.lr, total_steps=self.epochs, pct_start=0.025,
                            cycle_momentum=self.cycle_momentum)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ------------------------------------------------------------------ data on the device
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if not self.trainer.training:
            return batch
        images = batch["image"]
        # One generator per global batch, the same on every rank; each rank takes its own rows.
        g = make_generator(images.device, step_seed(self.seed, 0, batch["epoch"], batch["step"]))
        x = augment_images(images, self.augmentation, self.crop_padding, g,
                           index=batch["position"], total=batch["global_size"])
        # The model's layout: a channels_last input would switch a contiguous model's convolutions to other
        # kernels (other float rounding, and slower).
        # (clone: for one channel both layouts count as contiguous, and .contiguous() would keep the strides.)
        batch["x"] = x.clone(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        batch["generator"] = g
        return batch

    # ------------------------------------------------------------------ training
    def train_model(self) -> nn.Module:
        """The network the training step calls: the model itself, or its ``torch.compile`` wrapper.

        The attack's BN-freezing and input-gradient-only switches change module attributes, so the
        compiled model holds a few graphs (attack, outer step, first step with BN momentum 1).
        """
        if not self.compile:
            return self.model
        if not self._compiled:
            allow_graphs(16)
            mode = None if self.compile is True else self.compile
            self._compiled = (torch.compile(self.model, mode=mode),)
        return self._compiled[0]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, y, g = batch["x"], batch["label"], batch["generator"]
        model = self.train_model()
        first_step = self.global_step == 0
        if first_step:
            set_bn_momentum(self.model, 1.0)  # running statistics start from the first batch
        if self.loss_name == "trades":
            out = trades_loss(model, x, y, self.attack, beta=self.beta,
                              label_smoothing=self.label_smoothing, generator=g, index=batch["position"],
                              total=batch["global_size"])
        elif self.loss_name == "pgd_at":  # the reference: eval-mode attack, plain CE
            out = pgd_at_loss(model, x, y, self.attack, label_smoothing=0.0, generator=g, attack_mode="eval")
        elif self.loss_name == "pgd_at_train":  # batch-statistics attack (frozen running stats), label smoothing
            out = pgd_at_loss(model, x, y, self.attack, label_smoothing=self.label_smoothing, generator=g,
                              attack_mode="train")
        else:
            out = standard_loss(model, x, y, label_smoothing=self.label_smoothing)
        if first_step:
            set_bn_momentum(self.model, 0.01)
        with torch.no_grad():
            n = y.shape[0]
            # Per-sample values: MeanMetric sums them, and sums over ranks when computed (DDP).
            for name, value in (("train_loss", out.loss), ("train_loss_natural", out.loss_natural),
                                ("train_loss_robust", out.loss_robust)):
                self.train_metrics[name].update(value.detach().float().expand(n))
            self.train_metrics["train_acc_natural"].update((out.logits_natural.argmax(1) == y).float())
            self.train_metrics["train_acc_adv"].update((out.logits_adv.argmax(1) == y).float())
        self._images += int(batch["global_size"])  # a host int: images of the global batch
        self.log("train/loss", out.loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self.consumed = (batch["epoch"], batch["step"] + 1)
        return out.loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end: callbacks (checkpoints on a signal) run before that hook.
        self.ema.update(self.model)

    def on_train_epoch_start(self) -> None:
        # Not called when Lightning resumes part-way through an epoch: on_load_checkpoint restored these.
        for metric in self.train_metrics.values():
            metric.reset()
        # The schedule steps once per epoch, after the epoch: record the lr this epoch trains with.
        self._epoch_lr = self.trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._train_started is None:  # timing only (never in the history: it must not differ after a resume)
            self._train_started, self._images = time.perf_counter(), 0

    # ------------------------------------------------------------------ evaluation of the EMA model
    def _evaluating_epoch(self) -> int:
        """The 0-based epoch whose evaluation this is. ``trainer.validate(ckpt_path=...)`` re-evaluates a
        checkpoint with the attack noise of the epoch that saved it, so it reproduces the recorded numbers."""
        if self.trainer.state.fn == TrainerFn.FITTING or not self.history:
            return self.current_epoch
        return int(self.history[-1]["epoch"]) - 1

    def _skip_evaluation(self) -> bool:
        # A signal stopped this epoch part-way: the epoch is not finished and last.ckpt already holds the
        # mid-epoch state (RunCheckpoint also turns off the validation loop Lightning would run after the stop).
        return self.interrupted or self.trainer.sanity_checking

    def on_validation_epoch_start(self) -> None:
        if self._skip_evaluation():
            return
        self._eval_started = time.perf_counter()
        # The EMA model takes the live model's BN running statistics at the end of each epoch (docs/method.md, "TRADES").
        self.ema.copy_buffers(self.model)
        self.ema.module.eval()
        epoch = self._evaluating_epoch()
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        self._run_test_pgd = not fitting or epoch + 1 == self.epochs or (epoch + 1) % self.test_every == 0
        for metric in self.eval_metrics.values():
            metric.reset()
        # One noise stream per (split, attack), consumed batch after batch in a fixed order.
        self._eval_generators = {tag: make_generator(self.device, step_seed(self.seed, 1, tag, epoch,
                                                                            self.global_rank))
                                 for tag in (1, 2)}

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """dataloader 0: the validation split (clean if selecting by clean accuracy, PGD-``eval_steps``);
        1: the test split (clean; PGD on test epochs). x: uint8 (B, H, W, C), y: (B,)."""
        if self._skip_evaluation():
            return
        # Evaluation is fp32 whatever the training precision: Lightning runs validation_step under the
        # precision plugin's autocast (bf16-mixed, 16-mixed), so it is switched off here.
        with torch.autocast(device_type=self.device.type, enabled=False):
            self._evaluate_batch(batch, dataloader_idx)

    def _evaluate_batch(self, batch: dict, dataloader_idx: int) -> None:
        split = ("val", "test")[dataloader_idx]
        x, y = to_float_nchw(batch["image"]), batch["label"]
        model = self.ema.module
        if split == "test" or self.select == "clean":
            self.eval_metrics[f"{split}_clean_acc"].update((model(x).argmax(1) == y).float())
        if split == "val" or self._run_test_pgd:
            a = self.attack
            x_adv = pgd_attack(model, x, y, norm=a.norm, eps=a.eps, step=a.step, steps=self.eval_steps,
                               loss=self.val_loss if split == "val" else self.test_loss,
                               generator=self._eval_generators[1 if split == "val" else 2])
            with torch.no_grad():
                self.eval_metrics[f"{split}_pgd_acc"].update((model(x_adv).argmax(1) == y).float())

    def on_validation_epoch_end(self) -> None:
        if self._skip_evaluation():
            return
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        # compute() sums over ranks (DDP); every rank computes, so every rank holds the same row.
        acc = {"test_clean_acc": float(self.eval_metrics["test_clean_acc"].compute())}
        if self.select == "clean":
            acc["val_clean_acc"] = float(self.eval_metrics["val_clean_acc"].compute())
        acc["val_pgd_acc"] = float(self.eval_metrics["val_pgd_acc"].compute())
        acc["test_pgd_acc"] = float(self.eval_metrics["test_pgd_acc"].compute()) if self._run_test_pgd else None
        self._eval_time = time.perf_counter() - self._eval_started
        if fitting:
            self._record_epoch(acc)
        # epoch/<history field>; the loggers' own `epoch` counts from 1 (training.logging.epochs_from_one).
        self.log_dict({f"epoch/{k}": float(v) for k, v in (self.history[-1] if fitting else acc).items()
                       if isinstance(v, (int, float)) and k != "epoch"}, sync_dist=True)
        # The progress bar and ModelCheckpoint(monitor=...) read these.
        self.log("val_pgd_acc", acc["val_pgd_acc"], prog_bar=True, logger=False, sync_dist=True)
        if self.select == "clean":
            self.log("val_clean_acc", acc["val_clean_acc"], logger=False, sync_dist=True)
        if fitting and self._train_started is not None:
            self.log_dict({"perf/epoch_time_s": self._train_time, "perf/images_per_s": self.images_per_s,
                           "perf/eval_time_s": self._eval_time}, sync_dist=True)
        self._train_started = None

    def _record_epoch(self, acc: dict[str, float | None]) -> dict[str, Any]:
        epoch = self.current_epoch
        if self._train_started is not None:
            self._train_time = self._eval_started - self._train_started
            self.images_per_s = self._images / max(self._train_time, 1e-9)
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": self._epoch_lr}
        if float(self.train_metrics["train_acc_adv"].weight) > 0:
            row.update({k: float(m.compute()) for k, m in self.train_metrics.items()})
        row.update(acc)
        if self.history and self.history[-1]["epoch"] == epoch + 1:
            return self.history[-1]  # this epoch is already recorded (a resume re-running its evaluation)
        # Ties go to the later epoch.
        score = row[f"val_{self.select}_acc"]
        self.last_is_best = score >= self.best_score
        if self.last_is_best:
            self.best_score, self.best_epoch = score, epoch + 1
        row["is_best"] = self.last_is_best
        self.history.append(row)
        return row

    # ------------------------------------------------------------------ resumable state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["robustdiff"] = {
            "history": self.history,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "consumed": list(self.consumed),
            "epoch_lr": self._epoch_lr,
            "stopped_early": self.stopped_early,
            # This rank's running sums of the epoch's training metrics (sum of values, count).
            "train_metrics": {k: torch.stack([m.mean_value, m.weight]).detach().cpu()
                              for k, m in self.train_metrics.items()},
            "rng": capture_rng(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("robustdiff", {})
        self.history = list(state.get("history", []))
        self.best_score = state.get("best_score", -math.inf)
        self.best_epoch = state.get("best_epoch", -1)
        self.consumed = tuple(state.get("consumed", (0, 0)))
        self._epoch_lr = state.get("epoch_lr", self.lr)
        self.stopped_early = state.get("stopped_early")
        saved = state.get("train_metrics")
        for k, m in self.train_metrics.items():
            m.reset()
            if saved is not None and k in saved:
                m.mean_value.copy_(saved[k][0])
                m.weight.copy_(saved[k][1])
        if "rng" in state:
            restore_rng(state["rng"])


def capture_rng() -> dict:
    """RNG states in a form torch.load(weights_only=True) accepts (no numpy objects)."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = ["AdversarialTraining", "step_seed"]
