"""Test-only Lightning loggers and logger targets for ``logger._target_=...``: loggers robustdiff knows nothing
about, and targets that are not loggers (refused before training)."""

from __future__ import annotations

import json
from pathlib import Path

from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

RECORD_DIR = "recording"


class RecordingLogger(Logger):
    """Writes what it is built with to ``<save_dir>/recording/init.json`` and every ``log_metrics`` call as a JSON
    line of ``<save_dir>/recording/metrics.jsonl``. ``tag``: a setting of its own (``+logger.tag=...``)."""

    def __init__(self, save_dir: str, run_name: str, job_type: str, tag: str = "untagged"):
        super().__init__()
        self._save_dir = str(save_dir)
        self.folder = Path(save_dir) / RECORD_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "init.json").write_text(json.dumps({"save_dir": str(save_dir), "run_name": run_name,
                                                           "job_type": job_type, "tag": tag}))

    @property
    def name(self) -> str:
        return RECORD_DIR

    @property
    def version(self) -> int:
        return 0

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        (self.folder / "hparams.logged").touch()

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def not_a_logger(save_dir: str):
    """A factory that builds something other than a Lightning logger."""
    return {"save_dir": save_dir}


class NotALogger:
    """A class that is not a Lightning logger: refused before it is built."""

    built = 0

    def __init__(self, *args, **kwargs):
        NotALogger.built += 1
