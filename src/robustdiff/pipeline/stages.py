"""What a pipeline of several jobs needs between its stages: a banner naming the command that does the same by
hand, and a stop when a training run was interrupted (its state is saved; the stages after it must wait)."""

from __future__ import annotations

import time
from pathlib import Path


class RunNotFinished(SystemExit):
    """A training run of the pipeline stopped before its end (e.g. on a signal): the pipeline ends here, with one
    line saying how to resume and exit status 1 — also where nothing catches it."""


def require_finished(summary: dict, run_dir: Path, command: str = "robustdiff-demo") -> None:
    """Raise ``RunNotFinished`` unless the run's summary (what ``train``/``train_edm`` return) says it finished."""
    if not summary.get("finished"):
        raise RunNotFinished(f"{command}: {run_dir} did not finish; run the same command again to resume")


def stage(title: str, command: str, prog: str = "robustdiff-demo") -> float:
    """Print a stage's banner with the command that does the same by hand; returns the time it started."""
    print(f"\n=== {prog}: {title}\n    same as: {command}", flush=True)
    return time.monotonic()
