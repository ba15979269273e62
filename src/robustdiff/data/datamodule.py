"""One DataModule for every trainer: real and generated images through the same path.

Batches leave the host as uint8 (B, H, W, C) plus int64 labels; conversion to float and the
dataset's augmentation happen on the device (see ``data/augment.py``), identically for both
sources. Which images form batch (epoch, step) is a pure function of the seed
(``MixedBatchPlan``), so a run resumes mid-epoch on exactly the next batch. The validation images
are the first ``val_size`` training images, or a seeded class-stratified sample for sets stored sorted by
class (``val_split``; see ``datasets.validation_indices``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from .datasets import VAL_SPLITS, VALIDATION_SIZE, get_info, load_split, split_validation
from .mixing import GENERATED_SAMPLING, LAST_BATCH, MixedBatchPlan


class MixedBatchLoader:
    """Iterable over one epoch of this rank's batches; Lightning saves/restores it via state_dict."""

    def __init__(self, plan: MixedBatchPlan, real_images: np.ndarray, real_labels: np.ndarray, store,
                 rank: int, world_size: int, epoch_fn: Callable[[], int], consumed_fn: Callable[[], tuple]):
        self.plan, self.store = plan, store
        self.real_images = torch.from_numpy(real_images)
        self.real_labels = torch.from_numpy(real_labels)
        self.rank, self.world_size = rank, world_size
        self.epoch_fn, self.consumed_fn = epoch_fn, consumed_fn
        self._resume: tuple[int, int] | None = None
        plan.rank_counts(rank, world_size)  # refuses a world size the plan cannot share every batch across

    def __len__(self) -> int:
        return self.plan.iterations_per_epoch

    def batch(self, epoch: int, step: int) -> dict:
        real_idx, gen_idx = self.plan.rank_batch(epoch, step, self.rank, self.world_size)
        ri = torch.from_numpy(real_idx)
        images, labels = self.real_images[ri], self.real_labels[ri]
        if len(gen_idx):
            gx, gy = self.store.get(gen_idx)
            images = torch.cat([images, torch.from_numpy(gx)])
            labels = torch.cat([labels, torch.from_numpy(gy)])
        # This rank's rows of the global batch [real part | generated part]; a short or topped-up batch
        # (last_batch=reference) has other sizes than a full one.
        real_start, gen_start, n_real, n_gen = self.plan.rank_slices(step, self.rank, self.world_size)
        global_real, global_gen = self.plan.step_counts(step)
        position = torch.cat([torch.arange(real_start, real_start + n_real),
                              torch.arange(global_real + gen_start, global_real + gen_start + n_gen)])
        return {"image": images, "label": labels, "epoch": epoch, "step": step, "position": position,
                "global_size": global_real + global_gen}

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch_fn()
        start = 0
        if self._resume is not None:
            r_epoch, r_step = self._resume
            self._resume = None
            if r_epoch == epoch:
                start = r_step
        for step in range(start, len(self)):
            yield self.batch(epoch, step)

    def state_dict(self) -> dict:
        epoch, consumed = self.consumed_fn()
        return {"epoch": int(epoch), "consumed": int(consumed)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = (int(state["epoch"]), int(state["consumed"]))


class EvalLoader:
    """One evaluation split, this rank's share (every world-th image from its rank), in fixed-size batches of
    uint8 (b, H, W, C) images and int64 labels. The order never changes: the attack noise of a batch depends
    only on its position (evaluation is a pure function of the weights and the seed)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, rank: int = 0,
                 world_size: int = 1):
        self.images, self.labels = images[rank::world_size], labels[rank::world_size]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        for i in range(0, len(self.labels), self.batch_size):
            yield {"image": self.images[i : i + self.batch_size], "label": self.labels[i : i + self.batch_size]}


class RobustDataModule(pl.LightningDataModule):
    def __init__(
        self,
        dataset: str,
        batch_size: int,
        *,
        data_dir: str | None = None,
        download: bool = False,
        generated: str | None = None,
        ratio: float = 0.3,
        generated_sampling: str = "with_replacement",
        seed: int = 0,
        limit_train: int | None = None,
        limit_test: int | None = None,
        val_size: int = VALIDATION_SIZE,
        val_split: str | None = None,
        val_seed: int = 0,
        last_batch: str = "reference",
        eval_batch_size: int = 512,
        repeat_first_epoch: bool = False,
    ):
        """val_split: "first" | "stratified" | None (the dataset's rule: stratified where the stored training
        set is sorted by class, e.g. TinyImageNet); val_seed seeds the stratified split. last_batch:
        "reference" | "fill", where a permutation of the real images ends (see ``MixedBatchPlan``)."""
        super().__init__()
        self.info = get_info(dataset)
        if generated_sampling not in GENERATED_SAMPLING:
            raise ValueError(f"generated_sampling must be one of {GENERATED_SAMPLING}, got {generated_sampling!r}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio is the real fraction of each batch and must be in [0, 1], got {ratio}")
        self.batch_size, self.data_dir, self.download = batch_size, data_dir, download
        self.generated = generated
        self.ratio, self.generated_sampling, self.seed = ratio, generated_sampling, seed
        self.limit_train, self.limit_test, self.val_size = limit_train, limit_test, val_size
        self.val_split = self.info.val_split if val_split is None else val_split
        if self.val_split not in VAL_SPLITS:
            raise ValueError(f"val_split must be one of {VAL_SPLITS} or null (the dataset's rule), got {val_split!r}")
        if last_batch not in LAST_BATCH:
            raise ValueError(f"last_batch must be one of {LAST_BATCH}, got {last_batch!r}")
        self.val_seed, self.last_batch = val_seed, last_batch
        self.val_split_info: dict | None = None  # for run.json, after setup
        self.eval_batch_size = eval_batch_size
        self.repeat_first_epoch = repeat_first_epoch  # debug=overfit: every epoch serves epoch 0's batches
        self.store = None
        self.plan: MixedBatchPlan | None = None
        self.loader: MixedBatchLoader | None = None

    # Checks that must fail before any long work starts.
    def open_store(self):
        if self.generated is None:
            return None
        from .store import GeneratedStore

        store = GeneratedStore(Path(self.generated))
        if len(store) == 0 and self.ratio < 1:
            from .store import MANIFEST, StoreError

            raise StoreError(f"generated store {Path(self.generated) / MANIFEST}: holds no images, so no batch could "
                             f"hold the {1 - self.ratio:.0%} generated images ratio={self.ratio:g} asks for — "
                             "generate or import images into it, or train on real data only (no generated=)")
        store.check_compatible(self.info.image_shape, self.info.num_classes, self.info.name)
        return store

    def setup(self, stage: str | None = None) -> None:
        if self.plan is not None:
            return
        train_x, train_y = load_split(self.info.name, "train", self.data_dir, self.download)
        test_x, test_y = load_split(self.info.name, "test", self.data_dir, self.download)
        if self.limit_train:
            train_x, train_y = train_x[: self.limit_train], train_y[: self.limit_train]
        if self.limit_test:
            test_x, test_y = test_x[: self.limit_test], test_y[: self.limit_test]
        n_base = len(train_x)  # the epoch's base N: the real training set before the validation split
        (self.train_x, self.train_y), (val_x, val_y) = split_validation(
            train_x, train_y, self.val_size, self.val_split, self.val_seed)
        self.val_split_info = {
            "rule": self.val_split, "seed": self.val_seed if self.val_split == "stratified" else None,
            "size": len(val_y), "classes": int(len(np.unique(val_y))), "num_classes": self.info.num_classes,
        }
        # Copies: the held-out images are small, and a memory-mapped cache (TinyImageNet) is read-only.
        self.val = (torch.from_numpy(np.array(val_x)), torch.from_numpy(np.array(val_y)))
        self.test = (torch.from_numpy(np.array(test_x)), torch.from_numpy(np.array(test_y)))
        self.store = self.open_store()
        self.iterations_per_epoch = math.ceil(n_base / self.batch_size)
        self.plan = MixedBatchPlan(
            n_real=len(self.train_x), n_generated=len(self.store) if self.store is not None else 0,
            batch_size=self.batch_size, ratio=self.ratio if self.store is not None else 1.0,
            iterations_per_epoch=self.iterations_per_epoch, seed=self.seed,
            generated_sampling=self.generated_sampling, last_batch=self.last_batch,
        )

    def train_dataloader(self) -> MixedBatchLoader:
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        module = trainer.lightning_module if trainer is not None else None
        self.loader = MixedBatchLoader(
            self.plan, self.train_x, self.train_y, self.store, rank, world,
            epoch_fn=(lambda: trainer.current_epoch) if trainer is not None and not self.repeat_first_epoch
            else (lambda: 0),
            consumed_fn=(lambda: module.consumed) if module is not None else (lambda: (0, 0)),
        )
        return self.loader

    def val_dataloader(self) -> list[EvalLoader]:
        """[validation split, test split]: the EMA model is evaluated on both every epoch (validation PGD picks
        the best epoch; test clean every epoch, test PGD every ``test_every`` epochs and at the end)."""
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        return [EvalLoader(*split, self.eval_batch_size, rank, world) for split in (self.val, self.test)]


def datamodule_class(target, where: str = "data._target_", error: type[Exception] = ValueError) -> type:
    """The DataModule class a ``data._target_`` names, refused unless it subclasses `RobustDataModule` (the
    trainer relies on its batches, its resumable batch plan and its validation split)."""
    from ..utils.targets import resolve_class

    return resolve_class(target, RobustDataModule, what="robustdiff.data.datamodule.RobustDataModule",
                         where=where, error=error, example="data=mixed or data._target_=my_package.MyData",
                         hint="subclass RobustDataModule (its constructor gets RobustDataModule's arguments, "
                              "from the top-level keys, plus the data node's own keys)")


def datamodule_kwargs(node) -> dict:
    """The data node's own constructor kwargs (Hydra's ``_target_``-style keys dropped)."""
    return {k: v for k, v in node.items() if not (k.startswith("_") and k.endswith("_"))}

