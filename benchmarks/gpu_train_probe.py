"""robustdiff-train's real entry point with a step timer attached, for the GPU check (``gpu_pipeline.py``).

    ROBUSTDIFF_TIMING=timing.json python benchmarks/gpu_train_probe.py <robustdiff-train overrides>

runs ``robustdiff.cli.train.main`` unchanged (Hydra config, DataModule, Lightning Trainer, checkpoints)
with one extra Lightning callback that also times the per-epoch evaluation (Lightning's validation loop). The timer synchronises
the device only at the edges of what it times (the end of a step once ``ROBUSTDIFF_TIMING_WARMUP``
steps of this process have run, the end of each epoch's last step, the evaluation), so the steps in
between run as they do without it. Rank 0 rewrites the JSON after every epoch and at exit:

    {"epochs": [{"epoch", "steps", "seconds", "images_per_s"}], "eval_seconds": [...], "batch_size", ...}

With ``ROBUSTDIFF_SYNC_DEBUG=1`` on CUDA, the timed steps run under ``torch.cuda.set_sync_debug_mode("warn")``
and ``host_syncs`` counts, per Python line, the operations that made the host wait for the device
(``.item()``, boolean masks, blocking copies): the training step should have none.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class StepTimer(pl.Callback):
    """Images/s of the training steps of each epoch, leaving out this process's first ``warmup`` steps
    (compilation, cuDNN autotuning) and the first step after each evaluation."""

    def __init__(self, path: Path, warmup: int, sync_debug: bool = False):
        self.path, self.warmup, self.sync_debug = path, warmup, sync_debug
        # step_times: [global step, host seconds since start] at every step's end, unsynchronised: once the device
        # is the bottleneck the host runs at most a step ahead, so a run cut short (a time box) still gives a rate.
        self.record: dict = {"epochs": [], "eval_seconds": [], "warmup_steps": warmup, "step_times": [],
                             "started": time.time(), "device": None, "sync_debug": False}
        self.started = time.perf_counter()
        if sync_debug:
            self.record["host_syncs"] = {}
        self.done = 0
        self.t0: float | None = None
        self.s0 = 0
        self.rank0 = True

    def write(self) -> None:
        if not self.rank0:
            return
        from robustdiff.utils.io import atomic_write_text

        self.record["wall_s"] = time.time() - self.record["started"]
        atomic_write_text(self.path, json.dumps(self.record, indent=2))

    def on_fit_start(self, trainer, pl_module) -> None:
        self.rank0 = trainer.is_global_zero
        self.record.update(device=str(pl_module.device), batch_size=int(trainer.datamodule.batch_size),
                           world_size=int(trainer.world_size), precision=str(trainer.precision),
                           start_step=int(trainer.global_step))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.t0 = None

    def watch_syncs(self, device: torch.device, on: bool) -> None:
        if self.sync_debug and device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn" if on else "default")
            self.record["sync_debug"] = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.done += 1
        self.record["step_times"].append([int(trainer.global_step), time.perf_counter() - self.started])
        if self.done == 1:
            self.record["first_step"] = int(trainer.global_step)  # after a resume: the restored step + 1
        if self.done % 5 == 0:
            self.write()
        if self.t0 is None and self.done >= self.warmup:
            self.t0, self.s0 = _now(pl_module.device), trainer.global_step
            self.watch_syncs(pl_module.device, True)

    def close_epoch(self, trainer, pl_module) -> None:
        """The epoch's training steps end: record their rate (once per epoch, before its evaluation)."""
        self.watch_syncs(pl_module.device, False)
        if self.t0 is None or pl_module.interrupted:
            self.t0 = None
            return
        seconds = _now(pl_module.device) - self.t0
        steps = trainer.global_step - self.s0
        if steps > 0:
            images = steps * self.record["batch_size"]
            self.record["epochs"].append({"epoch": trainer.current_epoch + 1, "steps": steps, "seconds": seconds,
                                          "images_per_s": images / seconds})
        self.t0 = None

    # Lightning runs the epoch's validation loop (robustdiff's evaluation) before on_train_epoch_end: the training
    # steps end where validation starts, and the evaluation is timed from there to the validation epoch's end.
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit":
            return
        self.close_epoch(trainer, pl_module)
        self.eval_t0 = _now(pl_module.device)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit" or getattr(self, "eval_t0", None) is None:
            return
        self.record["eval_seconds"].append(_now(pl_module.device) - self.eval_t0)
        self.eval_t0 = None
        self.write()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.close_epoch(trainer, pl_module)  # an epoch without validation (e.g. interrupted): nothing recorded twice

    def on_train_end(self, trainer, pl_module) -> None:
        self.record["global_step"] = int(trainer.global_step)
        self.write()


def install(path: Path, warmup: int, sync_debug: bool = False) -> StepTimer:
    """Add the timer (training steps and the per-epoch evaluation) to every Trainer robustdiff-train builds."""
    import robustdiff.training.run as run

    timer = StepTimer(path, warmup, sync_debug)
    if sync_debug:
        show = warnings.showwarning

        def count_syncs(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                where = f"{filename}:{lineno}"
                timer.record["host_syncs"][where] = timer.record["host_syncs"].get(where, 0) + 1
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = count_syncs
        warnings.filterwarnings("always", message=".*synchroniz.*")
    make_trainer = run.make_trainer

    def make_trainer_with_timer(cfg, run_dir, callbacks, **kwargs):
        return make_trainer(cfg, run_dir, [*callbacks, timer], **kwargs)

    run.make_trainer = make_trainer_with_timer
    atexit.register(timer.write)
    return timer


if __name__ == "__main__":
    install(Path(os.environ["ROBUSTDIFF_TIMING"]), int(os.environ.get("ROBUSTDIFF_TIMING_WARMUP", "2")),
            sync_debug=os.environ.get("ROBUSTDIFF_SYNC_DEBUG") == "1")
    from robustdiff.cli.train import main

    sys.exit(main())
