"""TRADES training throughput: our Lightning loop against a plain-PyTorch loop and a reference-style loop.

Four loops train the same WideResNet (same initial weights) on the same Fashion-MNIST batches:

- ``ours``:       ``AdversarialTraining`` + ``RobustDataModule`` in a Lightning ``Trainer`` set up as
                  ``robustdiff.training.run.train`` sets it up (logger and progress bar off), in the fast
                  configuration: ``--precision`` (default ``auto``: bf16-mixed where the hardware has bf16
                  units — AMX CPUs, Ampere+ GPUs), channels_last, optionally ``--compile``.
- ``plain``:      the same step, same settings, written as a bare PyTorch loop: batch augmentation on tensors
                  (``data.augment``), ``trades_loss`` under autocast, SGD, the fused EMA update. Its distance to
                  ``ours`` is the framework's overhead.
- ``plain-fp32``: ``plain`` in float32 with the contiguous layout (the faithful ``precision=32-true`` default):
                  its distance to ``plain`` is what bf16 + channels_last buy.
- ``reference``:  the step written the way the reference trains (docs/method.md): fp32, per-image PIL
                  RandomCrop + RandomHorizontalFlip + ToTensor in a 2-worker DataLoader fed by a
                  reference-style batch sampler, a straightforward TRADES (``model.train()``, BN
                  tracking toggled by hand, a clean forward with autograd on for p_nat, parameters
                  keeping ``requires_grad`` during the attack, ``.item()`` metrics every step) and the
                  EMA as a Python loop over parameters.

The loops run interleaved step by step in one process (a callback in our Trainer runs one step of
each other loop after each of ours), so a busy machine slows all of them alike; the first steps
are warm-up. A step's time covers the data, augmentation, attack, update, EMA and hooks. Medians
are reported. The reference's workers prefetch while the other loops compute, as they would
while the reference itself computes.

    python benchmarks/bench_train.py                        # WRN-10-2, batch 128, TRADES-10: ~2.5 min on 2 cores
    python benchmarks/bench_train.py --model wrn-10-1 --precision 32-true --no-channels-last --out bench_train.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from robustdiff.adversarial.trades import AttackConfig, trades_loss
from robustdiff.data.augment import augment_images
from robustdiff.data.datamodule import RobustDataModule
from robustdiff.data.datasets import get_info, load_split
from robustdiff.models.wrn import bn_parameter_names, build_wrn
from robustdiff.training.adversarial import AdversarialTraining, make_generator, step_seed
from robustdiff.training.callbacks import AtomicCheckpointIO, RunCheckpoint
from robustdiff.training.ema import EMA
from robustdiff.utils.hardware import allow_graphs, resolve_precision

warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")

DATASET = "fashionmnist"


def sgd(model: nn.Module, lr: float) -> torch.optim.SGD:
    """The optimiser AdversarialTraining.configure_optimizers builds (no weight decay on BN)."""
    no_decay = bn_parameter_names(model)
    decay = [p for n, p in model.named_parameters() if n not in no_decay]
    plain = [p for n, p in model.named_parameters() if n in no_decay]
    return torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": plain, "weight_decay": 0.0}],
                           lr=lr, momentum=0.9, nesterov=True)


# ---------------------------------------------------------------------------------------------- ours
class Interleave(pl.Callback):
    """Times our steps and runs one step of every other loop after each of ours.

    Our step's time runs from the end of the other loops' steps to the end of our next optimiser
    step (data, transfer, augmentation, attack, update, EMA, every hook); the other loops time
    their own steps the same way (batch fetch to EMA update).
    """

    def __init__(self, others: dict):
        self.others = others
        self.times: dict[str, list[float]] = {"ours": [], **{name: [] for name in others}}
        self.fetch: list[float] = []  # our batch end -> next batch start (data, transfer, augmentation)
        self._last_end: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._last_end is not None:
            self.fetch.append(time.perf_counter() - self._last_end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self.times["ours"].append(now - self._last_end)
        for name, loop in self.others.items():
            self.times[name].append(loop.step())
        self._last_end = time.perf_counter()


def fit_ours(model: nn.Module, args, attack: AttackConfig, run_dir: Path, callback: Interleave, n: int) -> None:
    """n optimiser steps of our loop, in a Trainer configured as run.train configures it (no logger, no bar)."""
    info = get_info(DATASET)
    dm = RobustDataModule(DATASET, args.batch, seed=0, val_size=16, limit_test=16)
    dm.setup("fit")
    module = AdversarialTraining(
        model, attack, epochs=10, iterations_per_epoch=dm.iterations_per_epoch, beta=args.beta,
        lr=args.lr, augmentation=info.augmentation, crop_padding=info.crop_padding, seed=0,
        eval_batch_size=16, eval_steps=1, channels_last=args.channels_last, compile=args.compile,
    )
    trainer = pl.Trainer(
        default_root_dir=str(run_dir), max_steps=n, max_epochs=None, accelerator="cpu", devices=1,
        precision=args.precision, logger=False, callbacks=[RunCheckpoint(run_dir), callback],
        enable_checkpointing=True, num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
        plugins=[AtomicCheckpointIO()], log_every_n_steps=10, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)


# ---------------------------------------------------------------------------------------------- plain
class PlainLoop:
    def __init__(self, model: nn.Module, args, attack: AttackConfig, images: torch.Tensor, labels: torch.Tensor,
                 precision: str = "32-true", channels_last: bool = False, compile: bool = False):
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.model.train()
        if compile:
            allow_graphs(32)  # ours and up to two compiled plain loops share WideResNet.forward's graph cache
        self.forward = torch.compile(self.model) if compile else self.model
        self.bf16 = precision == "bf16-mixed"
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.opt = sgd(self.model, args.lr)
        self.ema = EMA(self.model, warmup_steps=0.025 * 10 * len(images) // args.batch)
        self.images, self.labels, self.batch = images, labels, args.batch
        self.attack, self.beta = attack, args.beta
        self.padding = get_info(DATASET).crop_padding
        self.perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        self.step_count = 0

    def step(self) -> float:
        start = time.perf_counter()
        i = self.step_count % (len(self.images) // self.batch)
        idx = self.perm[i * self.batch:(i + 1) * self.batch]
        g = make_generator(torch.device("cpu"), step_seed(0, 0, 0, self.step_count))
        x = augment_images(self.images[idx], "crop_flip", self.padding, g).clone(memory_format=self.layout)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            out = trades_loss(self.forward, x, self.labels[idx], self.attack, beta=self.beta, label_smoothing=0.1,
                              generator=g)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()
        self.ema.update(self.model)
        self.step_count += 1
        return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- reference
class PILDataset(torch.utils.data.Dataset):
    """Per-image PIL pipeline, as the reference feeds its DataLoader."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, padding: int):
        from torchvision import transforms

        self.images, self.labels = images, labels
        size = images.shape[1]
        self.transform = transforms.Compose([transforms.RandomCrop(size, padding=padding),
                                             transforms.RandomHorizontalFlip(), transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        img = self.images[i]
        img = Image.fromarray(img[:, :, 0], mode="L") if img.shape[2] == 1 else Image.fromarray(img)
        return self.transform(img), int(self.labels[i])


class ReferenceBatchSampler(torch.utils.data.Sampler):
    """The reference's semi-supervised batch sampler: real indices from fresh permutations taken in
    chunks, generated indices drawn with replacement (none here: no generated set)."""

    def __init__(self, sup_inds, unsup_inds, batch_size: int, unsup_fraction: float, num_batches: int):
        self.sup_inds, self.unsup_inds = list(sup_inds), list(unsup_inds)
        self.batch_size = batch_size
        self.sup_batch_size = batch_size - int(batch_size * unsup_fraction) if unsup_inds else batch_size
        self.num_batches = num_batches

    def __iter__(self):
        batch_counter = 0
        while batch_counter < self.num_batches:
            sup_perm = [self.sup_inds[i] for i in torch.randperm(len(self.sup_inds))]
            for k in range(0, len(self.sup_inds), self.sup_batch_size):
                if batch_counter == self.num_batches:
                    break
                batch = sup_perm[k:k + self.sup_batch_size]
                if self.sup_batch_size < self.batch_size:
                    extra = torch.randint(len(self.unsup_inds), (self.batch_size - len(batch),))
                    batch.extend(self.unsup_inds[j] for j in extra)
                np.random.shuffle(batch)
                yield batch
                batch_counter += 1

    def __len__(self) -> int:
        return self.num_batches


def track_bn_stats(model: nn.Module, track: bool) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = track


def reference_smooth_ce(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    log_prob = F.log_softmax(logits, dim=-1)
    nll = -log_prob.gather(dim=-1, index=y.unsqueeze(1)).squeeze(1)
    return ((1.0 - smoothing) * nll + smoothing * -log_prob.mean(dim=-1)).mean()


def reference_trades(model, x_natural, y, optimizer, step_size, epsilon, perturb_steps, beta, smoothing=0.1):
    criterion_kl = nn.KLDivLoss(reduction="sum")
    model.train()
    track_bn_stats(model, False)
    batch_size = len(x_natural)
    x_adv = x_natural.detach() + torch.empty_like(x_natural).uniform_(-epsilon, epsilon).detach()
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
    p_natural = F.softmax(model(x_natural), dim=1).detach()  # autograd on: the graph is built and dropped
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), p_natural)
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    track_bn_stats(model, True)
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    optimizer.zero_grad()
    logits_natural = model(x_natural)
    logits_adv = model(x_adv)
    loss_natural = reference_smooth_ce(logits_natural, y, smoothing)
    loss_robust = (1.0 / batch_size) * criterion_kl(F.log_softmax(logits_adv, dim=1), F.softmax(logits_natural, dim=1))
    loss = loss_natural + beta * loss_robust
    metrics = {"loss": loss.item(),
               "clean_acc": (logits_natural.detach().argmax(1) == y).float().mean().item(),
               "adversarial_acc": (logits_adv.detach().argmax(1) == y).float().mean().item()}
    return loss, metrics


def reference_ema_update(wa_model, model, global_step, decay_rate=0.995, warmup_steps=0.0):
    """The reference's per-parameter EMA loop (global_step counts this update, 1-based)."""
    factor = int(global_step >= warmup_steps)
    delta = global_step - warmup_steps
    decay = min(decay_rate, (1.0 + delta) / (10.0 + delta)) if 10.0 + delta != 0 else decay_rate
    decay *= factor
    for p_swa, p_model in zip(wa_model.parameters(), model.parameters()):
        p_swa.data *= decay
        p_swa.data += p_model.data * (1 - decay)


class ReferenceLoop:
    def __init__(self, model: nn.Module, args, attack: AttackConfig, images: np.ndarray, labels: np.ndarray):
        self.model = model
        self.wa_model = copy.deepcopy(model)
        self.opt = sgd(model, args.lr)
        self.attack, self.beta = attack, args.beta
        n_batches = len(images) // args.batch
        dataset = PILDataset(images, labels, get_info(DATASET).crop_padding)
        sampler = ReferenceBatchSampler(range(len(images)), [], args.batch, 0.0, n_batches)
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                                                  pin_memory=False)
        self.iterator = iter(self.loader)
        self.global_step = 0
        self.warmup_steps = 0.025 * 10 * n_batches
        self.metrics: list[dict] = []

    def _next(self):
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.loader)
            return next(self.iterator)

    def step(self) -> float:
        start = time.perf_counter()
        a = self.attack
        x, y = self._next()
        loss, metrics = reference_trades(self.model, x, y, self.opt, a.step, a.eps, a.steps, self.beta)
        loss.backward()
        self.opt.step()
        self.global_step += 1
        reference_ema_update(self.wa_model, self.model, self.global_step, warmup_steps=self.warmup_steps)
        self.metrics.append(metrics)
        return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="wrn-10-2")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="TRADES attack steps K")
    p.add_argument("--beta", type=float, default=5.0)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each loop")
    p.add_argument("--timed", type=int, default=8, help="timed steps of each loop")
    p.add_argument("--loops", default="ours,plain,plain-fp32,reference",
                   help="ours always runs; plain, plain-fp32, reference optional")
    p.add_argument("--workers", type=int, default=2, help="reference DataLoader workers")
    p.add_argument("--precision", default="auto", choices=["auto", "32-true", "bf16-mixed"],
                   help="ours and plain (auto: bf16-mixed where the CPU has AMX / AVX512-BF16)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="ours and plain in channels_last")
    p.add_argument("--compile", action="store_true", help="torch.compile the network in ours and plain")
    # One thread: on a shared 2-core machine two OpenMP threads spin-wait on each other (a TRADES step
    # measured 5× slower with 2 than with 1 while another job ran); the reference's workers get the other core.
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = PyTorch's default)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loops_wanted = args.loops.split(",")
    args.precision = resolve_precision(args.precision, "cpu")

    info = get_info(DATASET)
    attack = AttackConfig("linf", 8 / 255, 2 / 255, args.steps)
    images, labels = load_split(DATASET, "train")
    torch.manual_seed(0)
    init = build_wrn(args.model, num_classes=info.num_classes, in_channels=info.image_shape[2],
                     mean=info.mean, std=info.std)
    others = {}
    if "plain" in loops_wanted:
        others["plain"] = PlainLoop(copy.deepcopy(init), args, attack, torch.from_numpy(images), torch.from_numpy(labels),
                                    args.precision, args.channels_last, args.compile)
    if "plain-fp32" in loops_wanted:
        others["plain-fp32"] = PlainLoop(copy.deepcopy(init), args, attack, torch.from_numpy(images),
                                         torch.from_numpy(labels))
    if "reference" in loops_wanted:
        others["reference"] = ReferenceLoop(copy.deepcopy(init), args, attack, images, labels)
    callback = Interleave(others)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        fit_ours(copy.deepcopy(init), args, attack, Path(tmp), callback, args.warmup + args.timed + 1)
    print(f"{time.perf_counter() - started:.0f} s", flush=True)
    # Our first interval starts after our first step; the others time every step: drop warm-up alike.
    times = {name: t[args.warmup:] if name == "ours" else t[args.warmup + 1:] for name, t in callback.times.items()}
    times = {name: t[: args.timed] for name, t in times.items()}
    fetch = callback.fetch[args.warmup:]

    rows = []
    base = statistics.median(times["ours"])
    for name, t in times.items():
        med = statistics.median(t)
        rows.append({"loop": name, "steps_timed": len(t), "median_s_per_step": med, "mean_s_per_step": statistics.fmean(t),
                     "images_per_s": args.batch / med, "ours_speedup": med / base, "times_s": t})
    fast = f"{args.precision}{', channels_last' if args.channels_last else ''}{', compile' if args.compile else ''}"
    settings = {"ours": fast, "plain": fast, "plain-fp32": "32-true", "reference": "32-true, PIL workers"}
    for r in rows:
        r["settings"] = settings[r["loop"]]
    print(f"\nTRADES-{args.steps} β={args.beta:g}, {args.model}, batch {args.batch}, {DATASET} 28×28×1, "
          f"{torch.get_num_threads()} threads; medians of {args.timed} steps, loops interleaved step by step")
    print(f"{'loop':<11} {'settings':<34} {'steps':>5} {'s/step':>8} {'img/s':>8} {'ours is ×':>10}")
    for r in rows:
        sp = f"{r['ours_speedup']:.3f}"
        print(f"{r['loop']:<11} {r['settings']:<34} {r['steps_timed']:>5} {r['median_s_per_step']:>8.3f} "
              f"{r['images_per_s']:>8.1f} {sp:>10}")
    result = {"config": vars(args), "rows": rows}
    if fetch:
        result["ours_fetch_median_s"] = statistics.median(fetch)
        print(f"ours: batch end -> next batch start (data, transfer, augmentation, hooks): "
              f"median {statistics.median(fetch) * 1e3:.1f} ms")
    checks = []
    by = {r["loop"]: r for r in rows}
    if "ours" in by and "plain" in by:
        ratio = by["ours"]["images_per_s"] / by["plain"]["images_per_s"]
        checks.append(("ours / plain throughput", ratio, 0.95))
    if "ours" in by and "reference" in by:
        ratio = by["ours"]["images_per_s"] / by["reference"]["images_per_s"]
        checks.append(("ours / reference throughput", ratio, 2.0))
    if "plain" in by and "plain-fp32" in by:
        ratio = by["plain"]["images_per_s"] / by["plain-fp32"]["images_per_s"]
        checks.append((f"plain {fast} / plain fp32", ratio, None))
    if "plain-fp32" in by and "reference" in by:
        ratio = by["plain-fp32"]["images_per_s"] / by["reference"]["images_per_s"]
        checks.append(("plain fp32 / reference (fp32 step + data path)", ratio, None))
    for label, ratio, target in checks:
        verdict = "" if target is None else f" (target ≥ {target:g}: {'met' if ratio >= target else 'NOT met'})"
        print(f"{label}: {ratio:.3f}{verdict}")
    result["checks"] = [{"check": c, "ratio": r, "target": t, "met": None if t is None else r >= t}
                        for c, r, t in checks]
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
