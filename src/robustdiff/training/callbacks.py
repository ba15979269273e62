"""Run-directory bookkeeping: atomic checkpoints, history files, and stopping cleanly on signals."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.callbacks.progress.tqdm_progress import convert_inf
from pytorch_lightning.trainer.states import TrainerFn

from ..utils.formatting import percent
from ..utils.io import (
    UnreadableWeightsError,
    atomic_path,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    load_weights,
)
from ..utils.signals import install_stop_handlers, restore_handlers, stop_requested

HISTORY_FIELDS = ["epoch", "lr", "train_loss", "train_loss_natural", "train_loss_robust", "train_acc_natural",
                  "train_acc_adv", "test_clean_acc", "val_clean_acc", "val_pgd_acc", "test_pgd_acc", "is_best"]


class AtomicCheckpointIO(CheckpointIO):
    """Lightning checkpoints written by temp file + rename, and read back with weights_only=True."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint_file(path, map_location=map_location or "cpu")

    def remove_checkpoint(self, path) -> None:
        raise RuntimeError("robustdiff never deletes checkpoints")


class CheckpointFileError(ValueError):
    """A checkpoint that cannot be read (truncated, corrupt, not robustdiff's); the message says what to do."""


def load_checkpoint_file(path, map_location="cpu", mmap: bool = False) -> dict:
    """A run checkpoint, loaded weights-only (`utils.io.load_weights`), with an error that names the file and the
    way out — and never torch's advice to load it with weights_only=False (that would run the file's code)."""
    try:
        ckpt = load_weights(path, "a run checkpoint", map_location=map_location, mmap=mmap)
    except UnreadableWeightsError as e:
        kind = "not a weights-only checkpoint" if e.pickled else "truncated or corrupt"
        raise CheckpointFileError(
            f"{path}: cannot be read ({kind}: {e.cause}). The run cannot resume from it. Restore it from a "
            f"backup, or move it aside (e.g. to {Path(path).name}.bad) to restart this run from the beginning; "
            f"robustdiff never loads checkpoints with code in them.") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointFileError(f"{path}: not a robustdiff/Lightning checkpoint (no state_dict); move it aside or "
                                  f"choose another run directory")
    return ckpt


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in HISTORY_FIELDS})
    atomic_write_text(run_dir / "history.csv", buf.getvalue())
    atomic_write_json(run_dir / "history.json", history)


def republish(run_dir: Path, epochs: int, select: str = "pgd") -> dict[str, Any] | None:
    """history.* and summary.json re-derived from ``checkpoints/last.ckpt`` (the commit record), so a crash
    between publications never leaves them ahead of or behind it. Returns the summary, or None without
    last.ckpt."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    state = load_checkpoint_file(last, mmap=True).get("robustdiff", {})
    history = list(state.get("history", []))
    stopped = state.get("stopped_early")
    finished = is_finished(history, epochs, stopped)
    summary = summarise(history, finished=finished, select=select, stopped_early=stopped)
    write_history(run_dir, history)
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def is_finished(history: list[dict[str, Any]], epochs: int, stopped_early: dict[str, Any] | None = None) -> bool:
    """A run is finished when its last recorded epoch is ``epochs``, or is the epoch at which a callback
    (EarlyStopping) stopped it: running the same command again then has nothing to do."""
    if not history:
        return False
    last = history[-1]["epoch"]
    return last == epochs or (stopped_early is not None and last == stopped_early.get("epoch"))


def summarise(history: list[dict[str, Any]], finished: bool, select: str = "pgd",
              stopped_early: dict[str, Any] | None = None) -> dict[str, Any]:
    """best = the epoch with the highest validation accuracy of kind ``select`` (pgd: the reference; clean:
    standard-trained classifiers), ties -> later epoch. ``stopped_early``: {epoch, epochs, by, reason} when a
    callback ended the run before ``epochs`` (None otherwise; the key is only written then)."""
    if not history:
        return {"finished": finished}
    best = max(history, key=lambda r: (r[f"val_{select}_acc"], r["epoch"]))
    last = history[-1]
    tested = [r for r in history if r.get("test_pgd_acc") is not None]
    return {
        "best_epoch": best["epoch"], "best_val_pgd_acc": best["val_pgd_acc"],
        "last_epoch": last["epoch"], "last_val_pgd_acc": last["val_pgd_acc"],
        "test_clean_acc_best": best["test_clean_acc"], "test_clean_acc_last": last["test_clean_acc"],
        "test_pgd_acc_best": best.get("test_pgd_acc"),
        "test_pgd_acc_last": tested[-1]["test_pgd_acc"] if tested else None,
        "selected_by": f"val_{select}_acc",
        "finished": finished,
        **({"stopped_early": stopped_early} if stopped_early else {}),
    }


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with robustdiff's publication rules, in ``<run_dir>/checkpoints``.

    * ``best.ckpt`` is the top-1 checkpoint by ``monitor`` (val_pgd_acc, the EMA model's validation PGD
      accuracy), ties going to the later epoch (as the authors' code: ``>=``, where ModelCheckpoint uses ``>``); with it
      the EMA weights in ``model.pt``.
    * After every validation (the end of each epoch): best.ckpt / model.pt, then history.* and summary.json,
      then ``last.ckpt`` last: it is the commit record. A crash before it leaves the previous epoch's
      last.ckpt, the rerun redoes this epoch (bit for bit) and republishes everything; files published before
      the crash are the same ones again. Whether a run is finished is read from last.ckpt: its last epoch is
      ``epochs``, or a user callback (EarlyStopping, which Lightning calls before this checkpoint callback)
      stopped the run at that epoch (``stopped_early`` in summary.json).
    * SIGTERM / SIGINT / SIGUSR1 are noted and acted on between two steps: last.ckpt with the mid-epoch
      state, then the Trainer stops. (Lightning's OnExceptionCheckpoint would save wherever the exception
      struck, possibly half-way through a step; such a file could not resume bit-exactly.) Under SLURM with
      auto-requeue (Lightning's SLURMEnvironment) the requeue signal then requeues the job through Lightning.
    * Every file is written atomically (AtomicCheckpointIO); no checkpoint is ever deleted.
    """

    def __init__(self, run_dir: Path, monitor: str = "val_pgd_acc"):
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        super().__init__(dirpath=self.ckpt_dir, filename="best", monitor=monitor, mode="max", save_top_k=1,
                         save_last=True, auto_insert_metric_name=False, save_on_train_epoch_end=False,
                         enable_version_counter=False)
        self._signal: int | None = None  # the signal to act on at the next step boundary
        self.received: int | None = None  # the signal that came (summary.json "signal")
        self._previous: dict[int, Any] = {}
        self._stop_at_epoch_end = False

    @property
    def last_path(self) -> Path:
        return self.ckpt_dir / "last.ckpt"

    @property
    def best_path(self) -> Path:
        return self.ckpt_dir / "best.ckpt"

    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        """Ties go to the later epoch (docs/method.md, "TRADES"): a score equal to the best so far replaces it."""
        if current is None:
            return False
        if not self.best_k_models:
            return True
        better = bool(torch.ge(current, self.best_k_models[self.kth_best_model_path]))
        return trainer.strategy.reduce_boolean_decision(better)

    # -- signals: remember, then act between two steps so the saved state is consistent
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._previous = install_stop_handlers(self._handle)

    def _handle(self, signum, frame) -> None:
        self._signal = self.received = stop_requested(signum, self.received)

    def _restore_handlers(self) -> None:
        restore_handlers(self._previous)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not ModelCheckpoint's: it would write last.ckpt again after a signal's mid-epoch save.
        self._restore_handlers()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self._signal is not None
        if trainer.world_size > 1:
            # A signal may reach one rank only; every rank must save and stop on the same step.
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop or pl_module.interrupted or self._stop_at_epoch_end:
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            # The epoch's last step: a state saved here could not resume (Lightning would take the epoch for done
            # and skip its evaluation). The epoch is finished instead — evaluated and published, last.ckpt written
            # as at every epoch end — and the run stops at that commit point (on_validation_end).
            self._stop_at_epoch_end = True
            if trainer.is_global_zero:
                print("robustdiff: stop requested on the epoch's last step — evaluating and saving this epoch, "
                      "then stopping", flush=True)
            return
        pl_module.interrupted = True
        trainer.save_checkpoint(self.last_path, weights_only=False)
        trainer.should_stop = True
        # No validation loop for the unfinished epoch (Lightning runs one after should_stop): there is nothing
        # to evaluate, and user callbacks (EarlyStopping) would judge the previous epoch's metrics once more,
        # or fail on a metric not logged yet in the first epoch.
        trainer.limit_val_batches = 0
        self._requeue_if_asked(trainer, pl_module)

    def _requeue_if_asked(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        received = self.received or 0
        if trainer.world_size > 1:  # the same decision on every rank (Lightning's handler saves collectively)
            received = int(trainer.strategy.reduce(torch.tensor(received, device=pl_module.device),
                                                   reduce_op="max"))
        if received and requeue_signal(trainer) == received:
            # SLURM warned of the job's end: Lightning's SLURMEnvironment handler requeues it (scontrol
            # requeue); the requeued job runs the same command and resumes in place from last.ckpt, saved
            # just now at this step boundary.
            trainer._signal_connector._slurm_sigusr_handler_fn(received, None)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Publish the epoch: best.ckpt and model.pt (a new best), history.* and summary.json, last.ckpt."""
        if self._should_skip_saving_checkpoint(trainer) or getattr(pl_module, "interrupted", False):
            return
        candidates = self._monitor_candidates(trainer)
        self._epoch = pl_module.history[-1]["epoch"] if pl_module.history else None
        if trainer.should_stop and self._epoch is not None and self._epoch < pl_module.epochs:
            # A user callback (EarlyStopping) ended the run at this epoch; Lightning calls this checkpoint callback
            # after all others, so the decision is known here and goes into this epoch's last.ckpt.
            pl_module.stopped_early = stop_record(trainer, self._epoch, pl_module.epochs)
        self._save_topk_checkpoint(trainer, candidates)
        if trainer.is_global_zero:
            write_history(self.run_dir, pl_module.history)
            stopped = getattr(pl_module, "stopped_early", None)
            atomic_write_json(self.run_dir / "summary.json", summarise(
                pl_module.history, finished=is_finished(pl_module.history, pl_module.epochs, stopped),
                select=pl_module.select, stopped_early=stopped))
        self._save_last_checkpoint(trainer, candidates)
        if self._stop_at_epoch_end:
            # A signal came on this epoch's last step: the epoch is now committed, stop here. (After the
            # early-stopping check above, so the stop is not recorded as a callback's decision.)
            self._stop_at_epoch_end = False
            if not is_finished(pl_module.history, pl_module.epochs, getattr(pl_module, "stopped_early", None)):
                pl_module.interrupted = True
            trainer.should_stop = True
            self._requeue_if_asked(trainer, pl_module)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if Path(filepath).name == "best.ckpt" and trainer.is_global_zero:
            atomic_torch_save(trainer.lightning_module.ema.module.state_dict(), self.run_dir / "model.pt")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if trainer.is_global_zero and self.last_path.is_file():
            # Nothing is saved here (the exception may have struck half-way through a step); the last commit
            # point is the previous epoch's (or signal's) last.ckpt.
            print(f"robustdiff: stopped by {type(exception).__name__}; the last saved state is {self.last_path} "
                  "— run the same command again to resume from it (bit for bit).", flush=True)


def stop_record(trainer: pl.Trainer, epoch: int, epochs: int) -> dict[str, Any]:
    """What summary.json says about a run that a callback stopped after ``epoch`` (1-based) of ``epochs``: the
    EarlyStopping that stopped it at this epoch, with its reason; or, when some other callback set
    ``trainer.should_stop``, a record saying just that."""
    for cb in trainer.callbacks:
        if isinstance(cb, EarlyStopping) and cb.stopping_reason_message and cb.stopped_epoch == trainer.current_epoch:
            return {"epoch": epoch, "epochs": epochs, "by": type(cb).__name__, "monitor": cb.monitor,
                    "reason": cb.stopping_reason_message, "stopping_reason": cb.stopping_reason.name.lower()}
    return {"epoch": epoch, "epochs": epochs, "by": "a callback", "monitor": None,
            "reason": "a callback set trainer.should_stop", "stopping_reason": None}


def requeue_signal(trainer: pl.Trainer) -> int | None:
    """The signal on which Lightning's SLURMEnvironment requeues the job (SIGUSR1), or None outside SLURM or
    without auto-requeue."""
    env = trainer._accelerator_connector.cluster_environment
    if isinstance(env, SLURMEnvironment) and env.auto_requeue:
        return int(env.requeue_signal)
    return None


class EpochBar(pl.callbacks.TQDMProgressBar):
    """Lightning's progress bar with the epoch counted as everywhere else in robustdiff: from 1, of the total
    (``Epoch 2/2``, as the console line and history.json say), not Lightning's 0-based ``Epoch 1``."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        # Lightning's own steps, with our label set before the bar is first drawn (never a 0-based "Epoch 0").
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        of = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        bar.set_description_str(f"Epoch {trainer.current_epoch + 1}{of}", refresh=False)
        bar.reset(total=convert_inf(self.total_train_batches))
        bar.initial = 0


class EpochSummary(pl.Callback):
    """One console line per epoch (rank 0): clean and PGD accuracies, best so far, times and throughput."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (not trainer.is_global_zero or trainer.sanity_checking or getattr(pl_module, "interrupted", False)
                or trainer.state.fn != TrainerFn.FITTING or not pl_module.history):
            return
        row = pl_module.history[-1]
        test_pgd = f", test PGD {percent(row['test_pgd_acc'])}" if row.get("test_pgd_acc") is not None else ""
        line = (f"epoch {row['epoch']}/{pl_module.epochs}: test clean {percent(row['test_clean_acc'])}, "
                f"val PGD {percent(row['val_pgd_acc'])}{test_pgd}{' (new best)' if row.get('is_best') else ''}; "
                f"best {'val clean ' if getattr(pl_module, 'select', 'pgd') == 'clean' else ''}"
                f"{percent(pl_module.best_score)} at epoch {pl_module.best_epoch}; "
                f"train {pl_module._train_time:.1f}s ({pl_module.images_per_s:,.0f} img/s), "
                f"eval {pl_module._eval_time:.1f}s")
        bar = trainer.progress_bar_callback
        if bar is not None and hasattr(bar, "print"):
            bar.print(line)  # above the bar, not through it
        else:
            print(line, flush=True)


__all__ = ["AtomicCheckpointIO", "CheckpointFileError", "load_checkpoint_file", "RunCheckpoint", "EpochSummary",
           "requeue_signal", "write_history", "summarise", "is_finished", "stop_record", "republish",
           "atomic_path"]
