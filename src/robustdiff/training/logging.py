"""Weights & Biases for robustdiff jobs: the logger, the run record that ties later jobs to it, and a callback
that gives the W&B run what the dashboard needs (best epoch, example images, the model as an artifact).

One W&B run per run directory. ``wandb.json`` in the run directory records its id, project and entity, so
``robustdiff-eval`` (and a resumed or requeued job) logs into the same W&B run, even after the directory moved.

Mode: ``logger.mode=auto`` (the default) leaves the choice to ``WANDB_MODE`` when it is set (``offline`` on an
HPC node without internet); else online with credentials (``WANDB_API_KEY`` or ``wandb login``), offline
without. ``logger.mode=online|offline|disabled`` is an explicit choice and wins. Files go under
``$WANDB_DIR`` when it is set, else under the run directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Checkpoint

from ..adversarial.attacks import pgd_attack
from ..conf.schema import WANDB_MODES
from ..utils.choices import parse_fraction
from ..utils.io import atomic_write_json

RECORD = "wandb.json"  # in the run directory: {"id", "project", "entity", "group", "job_type"}
MODES = WANDB_MODES
# The validation metric whose W&B summary is its maximum (the module logs it every epoch).
VAL_METRIC = "epoch/val_pgd_acc"


def resolve_mode(mode: str | None) -> str | None:
    """The mode to pass to wandb.init; None lets wandb read ``WANDB_MODE`` itself."""
    mode = "auto" if mode in (None, "", "null") else str(mode)
    if mode not in MODES:
        raise ValueError(f"logger.mode={mode!r}: choose {', '.join(MODES)} (auto: WANDB_MODE if set, else online "
                         "with an API key or `wandb login`, else offline)")
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if os.environ.get("WANDB_API_KEY") or _logged_in() else "offline"


def _logged_in() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_dir(run_dir: Path) -> str:
    """Where wandb writes its files: ``$WANDB_DIR`` when set, else the run directory."""
    return os.environ.get("WANDB_DIR") or str(run_dir)


def read_record(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run directory's ``wandb.json``, or None when the run never logged to W&B."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e}); delete it to let the next job start a new W&B run") from None
    if not isinstance(record, dict) or not record.get("id"):
        raise ValueError(f"{path}: no W&B run id; delete it to let the next job start a new W&B run")
    return record


def run_id(run_dir: Path) -> str:
    """The W&B id of a run directory: the recorded one, else derived from the directory's path."""
    record = read_record(run_dir)
    return str(record["id"]) if record else hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


def wandb_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config for W&B, with ε and step sizes as numbers (W&B plots and filters numbers, not "8/255")
    and the fraction as written kept beside them (``norm.eps_text``)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    norm = config.get("norm") if isinstance(config, dict) else None
    if isinstance(norm, dict):
        for key in ("eps", "step"):
            if isinstance(norm.get(key), str):
                norm[f"{key}_text"] = norm[key]
                norm[key] = parse_fraction(norm[key])
    return config


def wandb_logger(cfg: DictConfig, run_dir: Path, name: str, job_type: str, group: str | None = None):
    """The WandbLogger of a robustdiff job (``job_type``: train or edm) from its ``logger`` group's settings;
    resumes the directory's W&B run."""
    return job_wandb_logger(run_dir=run_dir, run_name=name, job_type=job_type, job_config=cfg, sweep_group=group,
                            project=cfg.logger.project, entity=cfg.logger.get("entity"),
                            group=cfg.logger.get("group"), tags=cfg.logger.get("tags"), mode=cfg.logger.get("mode"))


def job_wandb_logger(*, run_dir: str | os.PathLike, run_name: str, job_type: str, job_config: DictConfig,
                     project: str, entity: str | None = None, group: str | None = None, tags: Any = (),
                     mode: str | None = "auto", sweep_group: str | None = None):
    """The ``_target_`` of ``logger=wandb`` (conf/logger/wandb.yaml): the group's settings (project, entity,
    group, tags, mode) plus what the job knows at run time (its directory, name, job type and config; the sweep's
    group). The directory's ``wandb.json`` wins over project and entity, so that a resumed job or one whose
    directory moved logs into the same W&B run; a sweep's group is used unless ``logger.group`` is given."""
    from ..utils.extras import missing_extra
    from .config import ConfigError

    if missing := missing_extra("wandb", "logger=wandb"):
        raise ConfigError(missing)
    run_dir = Path(run_dir)
    record = read_record(run_dir) or {}
    return pl.loggers.WandbLogger(
        project=record.get("project") or project, entity=record.get("entity") or entity,
        group=group or sweep_group, tags=list(tags or []), name=run_name, save_dir=wandb_dir(run_dir),
        mode=resolve_mode(mode), id=run_id(run_dir), resume="allow", job_type=job_type,
        config=wandb_config(job_config),
    )


def finish(trainer: pl.Trainer) -> None:
    """End the job's W&B run (rank 0): the summary is flushed, an offline run is ready for ``wandb sync``, and
    the next job in this process (a sweep under Hydra's basic launcher) starts a W&B run of its own instead of
    logging into this one."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            if isinstance(logger, pl.loggers.WandbLogger) and logger._experiment is not None:
                logger.experiment.finish()


def write_record(run_dir: Path, run: Any) -> None:
    """Record the W&B run of ``run_dir`` (its id, project, entity) in ``wandb.json``."""
    record = {"id": run.id, "project": run.project, "entity": run.entity or None, "group": run.group or None,
              "job_type": run.job_type or None}
    if read_record(run_dir) != record:
        atomic_write_json(run_dir / RECORD, record)


def resume_run(run_dir: str | os.PathLike, **kwargs: Any):
    """Open the W&B run of a run directory again (``resume="allow"``, same id), e.g. to add evaluation results;
    None when the run never logged to W&B. ``kwargs`` go to ``wandb.init``."""
    import wandb

    run_dir = Path(run_dir)
    record = read_record(run_dir)
    if record is None:
        return None
    # The training's group and job_type again: a resumed run's record must not blank them when it is synced.
    return wandb.init(id=record["id"], project=record.get("project"), entity=record.get("entity"),
                      group=record.get("group"), job_type=record.get("job_type"), resume="allow",
                      dir=wandb_dir(run_dir), mode=resolve_mode(kwargs.pop("mode", None)), **kwargs)


class WandbRun(Checkpoint):
    """What a robustdiff job adds to its W&B run beyond the logged metrics.

    * ``define_metric``: the summary of the validation PGD accuracy is its maximum; ``best/*`` (the best epoch
      by the run's selection rule, docs/method.md, "TRADES": highest validation accuracy, ties → later epoch) is logged every
      epoch and written to the summary at the end with ``last/*``.
    * TRADES runs: a grid of clean (top) and PGD (bottom) validation images of the EMA model every
      ``test_every`` epochs and at the last epoch (also ``examples/adversarial-<epoch>.png`` in the run directory).
    * At the end of a finished run: the model (``model.pt`` of a TRADES run: the best epoch's EMA weights;
      ``network.pt`` of an EDM run) as a W&B artifact of type ``model``.

    A ``Checkpoint`` so that Lightning runs it after the module's epoch-end evaluation and after the run's own
    checkpoint callback has written the epoch's files. Rank 0 only; it draws no random numbers from the global
    generators (the attack has its own), so a run with W&B computes exactly what a run without it does.
    """

    def __init__(self, run_dir: Path, log_model: bool = True, examples: int = 8):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.log_model, self.examples = log_model, examples

    @staticmethod
    def _run(trainer: pl.Trainer):
        for logger in trainer.loggers:
            if isinstance(logger, pl.loggers.WandbLogger):
                return logger.experiment
        return None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        run = self._run(trainer) if trainer.is_global_zero else None
        if run is None:
            return
        write_record(self.run_dir, run)
        if hasattr(pl_module, "best_epoch"):
            run.define_metric(VAL_METRIC, summary="max")
            run.define_metric("best/*", summary="last")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        history = getattr(pl_module, "history", None)
        if not trainer.is_global_zero or getattr(pl_module, "interrupted", False) or not history:
            return
        run = self._run(trainer)
        if run is None:
            return
        from .callbacks import summarise

        row = history[-1]
        best = summarise(history, finished=False, select=getattr(pl_module, "select", "pgd"))
        payload = {"best/epoch": best["best_epoch"], "best/val_pgd_acc": best["best_val_pgd_acc"],
                   "best/test_clean_acc": best["test_clean_acc_best"], "trainer/global_step": trainer.global_step}
        if best.get("test_pgd_acc_best") is not None:
            payload["best/test_pgd_acc"] = best["test_pgd_acc_best"]
        epoch = int(row["epoch"])
        if self.examples > 0 and (epoch % pl_module.test_every == 0 or epoch == pl_module.epochs):
            payload["examples/adversarial"] = self._examples(trainer, pl_module, epoch)
        run.log(payload)

    def _examples(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int):
        """The first ``examples`` validation images, clean and under the validation attack (PGD of the EMA
        model, a generator of its own)."""
        import wandb

        from ..data.augment import to_float_nchw
        from ..data.classes import class_names
        from ..evaluation.robustness import evaluation_mode
        from ..utils.images import labelled_grid, save_png
        from .adversarial import make_generator, step_seed

        images, labels = trainer.datamodule.val
        model = pl_module.ema.module
        x, y = to_float_nchw(images[:self.examples].to(pl_module.device)), labels[:self.examples].to(pl_module.device)
        a = pl_module.attack
        g = make_generator(x.device, step_seed(pl_module.seed, 2, epoch))
        with torch.inference_mode(False), evaluation_mode(model):
            x_adv = pgd_attack(model, x, y, norm=a.norm, eps=a.eps, step=a.step, steps=pl_module.eval_steps,
                               loss=pl_module.val_loss, generator=g)
            with torch.no_grad():
                pred = torch.cat([model(x).argmax(1), model(x_adv).argmax(1)]).tolist()
        names = class_names(trainer.datamodule.info.name, trainer.datamodule.info.num_classes)
        truth = y.tolist() * 2
        attack = f"PGD-{pl_module.eval_steps}"
        grid = labelled_grid(torch.cat([x, x_adv]), len(y), ["clean", attack], [names[p] for p in pred],
                             [p == t for p, t in zip(pred, truth)])
        path = save_png(self.run_dir / "examples" / f"adversarial-{epoch:04d}.png", grid)
        caption = (f"epoch {epoch}: EMA model's predictions on validation images, clean and under {attack} "
                   f"({a.norm}, ε={a.eps:.4g}); green = correct. True classes: "
                   + ", ".join(names[t] for t in y.tolist()))
        return wandb.Image(str(path), caption=caption)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or getattr(pl_module, "interrupted", False):
            return
        run = self._run(trainer)
        if run is None:
            return
        summary = {}
        if (self.run_dir / "summary.json").is_file():
            summary = json.loads((self.run_dir / "summary.json").read_text())
        if "best_epoch" in summary:  # TRADES: the selection's result, not the last epoch's values
            run.summary.update({
                "best/epoch": summary["best_epoch"], "best/val_pgd_acc": summary["best_val_pgd_acc"],
                "best/test_clean_acc": summary["test_clean_acc_best"],
                "best/test_pgd_acc": summary.get("test_pgd_acc_best"),
                "last/epoch": summary["last_epoch"], "last/val_pgd_acc": summary["last_val_pgd_acc"],
                "last/test_clean_acc": summary["test_clean_acc_last"],
                "last/test_pgd_acc": summary.get("test_pgd_acc_last"),
            })
        if self.log_model and summary.get("finished"):
            self._log_model(run, summary)

    def _log_model(self, run: Any, summary: dict[str, Any]) -> None:
        import wandb

        for file in ("model.pt", "network.pt"):
            path = self.run_dir / file
            if path.is_file():
                break
        else:
            return
        meta = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}
        artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata={"file": file, **meta},
                                  description=f"{file} of robustdiff run {self.run_dir.name}")
        artifact.add_file(str(path), name=file)
        aliases = ["best"] if "best_epoch" in summary else []
        if "best_epoch" in summary:
            aliases.append(f"epoch-{summary['best_epoch']}")
        run.log_artifact(artifact, aliases=["latest", *aliases])

    def state_dict(self) -> dict:
        return {}


__all__ = ["WandbRun", "epochs_from_one", "finish", "job_wandb_logger", "read_record", "resolve_mode", "resume_run", "run_id", "wandb_config", "wandb_dir",
           "wandb_logger"]


def epochs_from_one(logger):
    """``logger`` with the ``epoch`` Lightning adds to every logged row counted from 1, as robustdiff's console,
    progress bar, history and summary count it (Lightning's is 0-based). Host-side only: nothing is logged from
    the device for it."""
    log = logger.log_metrics

    def log_metrics(metrics, step=None):
        if "epoch" in metrics:
            metrics = {**metrics, "epoch": metrics["epoch"] + 1}
        return log(metrics, step)

    logger.log_metrics = log_metrics
    return logger
