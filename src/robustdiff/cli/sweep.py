"""What `robustdiff-train -m ...` (a Hydra multirun) needs beyond one run.

* ``SweepReport``: a Hydra callback (conf/train.yaml, ``hydra.callbacks``) that names the sweep, so that its
  W&B runs share a group (``SWEEP_ENV``, read by training.trainer.build_logger) and its jobs' directories start
  with the swept keys (``SWEPT_ENV``, read by utils.naming.run_name). The sweep's own folder,
  ``<run_root>/sweeps/<sweep>/``, holds Hydra's multirun.yaml, ``jobs.txt`` (its job directories, relative to
  the folder; ``robustdiff-report`` reads it) and, when the sweep ends, report.md over exactly those jobs.
  The jobs' run directories are ``<run_root>/<job>``, as for single runs.
* ``ddp_job`` / ``own_job_argv``: DDP inside a sweep without duplicated jobs. Lightning starts ranks 1..N-1
  by re-running the command line; under ``-m`` that command is the whole sweep, so each extra rank would
  run every job of the sweep (and its callbacks) and pair up with rank 0 only by luck. Rank 0 therefore
  records its job's overrides in ``JOB_ENV`` and a re-launched rank runs exactly that job, in its directory;
  after each job rank 0 forgets the DDP environment so that the next job starts its own ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ..utils.naming import SWEEP_ENV, SWEPT_ENV, run_name
from ..utils.naming import sweep_name as _sweep_name

JOB_ENV = "ROBUSTDIFF_JOB_OVERRIDES"
# Set by Lightning's subprocess launcher in the launching process; stale values would make the next job of a
# sweep believe its ranks already exist.
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
MULTIRUN_FLAGS = ("-m", "--multirun")
# What Lightning appends to a re-launched rank's command line (lightning_fabric ... _hydra_subprocess_cmd).
LIGHTNING_APPENDS = ("hydra.run.dir=", "hydra.job.name=", "hydra.output_subdir=")


# --- naming ------------------------------------------------------------------------------------------

def _parse(overrides: Sequence[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def _dirname(overrides: Sequence[str], config: DictConfig) -> str:
    """``key:value__key:value`` exactly as Hydra builds hydra.job.override_dirname for these overrides."""
    from hydra._internal.config_loader_impl import get_overrides_dirname

    od = config.hydra.job.config.override_dirname
    return get_overrides_dirname(_parse(overrides), exclude_keys=list(od.exclude_keys), item_sep=od.item_sep,
                                 kv_sep=od.kv_sep)


def swept(config: DictConfig) -> list[str]:
    """The keys the sweep varies (``ratio=0.5,0.7`` -> ``ratio``), in command-line order."""
    return [o.key_or_group for o in _parse(list(config.hydra.overrides.task)) if o.is_sweep_override()]


def sweep_name(config: DictConfig) -> str:
    """The sweep's command-line overrides as a name, swept keys first, e.g. ``ratio:0.5,0.7__epochs:3`` (at
    most 128 characters, W&B's limit for a group; constant keys are dropped first)."""
    return _sweep_name(_dirname(list(config.hydra.overrides.task), config), swept(config))


def job_run_dirs(config: DictConfig) -> list[Path]:
    """The run directory of every job of the sweep described by ``config`` (the sweep's config, with the
    command-line sweep overrides), in launch order: ``<run_root>/<run name, swept keys first>``."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    keys = swept(config)
    batches = BasicSweeper.split_arguments(_parse(list(config.hydra.overrides.task)), None)
    dirs = []
    for job in (job for batch in batches for job in batch):
        values = {o.key_or_group: o.value() for o in _parse(job)}
        root = Path(os.path.abspath(str(values.get("run_root", config.get("run_root")))))
        dirs.append(root / run_name(values.get("name", config.get("name")), _dirname(job, config), keys))
    return list(dict.fromkeys(dirs))


JOBS_FILE = "jobs.txt"


def read_jobs(sweep_dir: Path) -> list[Path] | None:
    """The job directories listed in ``<sweep_dir>/jobs.txt`` (None when it has none: not a sweep folder)."""
    path = Path(sweep_dir) / JOBS_FILE
    if not path.is_file():
        return None
    return [(Path(sweep_dir) / line).resolve() for line in path.read_text().splitlines() if line.strip()]


def report_root(run_dirs: Sequence[Path]) -> Path:
    """The directory the report shows job paths relative to: their run_root."""
    parents = {Path(d).parent for d in run_dirs}
    return parents.pop() if len(parents) == 1 else Path(os.path.commonpath([str(d) for d in run_dirs]))


# --- the sweep's folder and report --------------------------------------------------------------------------

def write_sweep_report(run_dirs: Sequence[Path], root: Path, out_dir: Path) -> Path:
    """report.md / report.csv / figures/ over exactly ``run_dirs`` (paths shown relative to ``root``)."""
    from ..evaluation.report import write_report

    write_report(root, out_dir, runs=run_dirs, title=f"robustdiff sweep {out_dir.name}: {len(run_dirs)} run(s) in {root}")
    return out_dir / "report.md"


class SweepReport(Callback):
    """Names the sweep (W&B group; swept keys first in job names) and lists its jobs in its folder
    ``hydra.sweep.dir`` (``<run_root>/sweeps/<sweep>/``); writes report.md there when the sweep ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from ..utils.io import atomic_write_text

        # Inherited by the jobs, their DDP ranks and SLURM jobs.
        os.environ[SWEEP_ENV] = sweep_name(config)
        os.environ[SWEPT_ENV] = json.dumps(swept(config))
        folder = Path(str(config.hydra.sweep.dir))  # resolves to <run_root>/sweeps/<sweep_dir_name()>
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / JOBS_FILE, "".join(f"{os.path.relpath(d, folder.resolve())}\n"
                                                      for d in job_run_dirs(config)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            folder = Path(str(config.hydra.sweep.dir))
            dirs = [d for d in read_jobs(folder) or [] if (d / "run.json").is_file()]
            if not dirs:
                print(f"robustdiff: sweep {sweep_name(config)}: no job wrote a run directory; no report")
                return
            md = write_sweep_report(dirs, report_root(dirs), folder)
            unfinished = [d.name for d in dirs if not _finished(d)]
            print(f"robustdiff: sweep report ({len(dirs)} runs{f', {len(unfinished)} unfinished' if unfinished else ''}): "
                  f"{md}")
        finally:
            for key in (SWEEP_ENV, SWEPT_ENV):  # a later run in this process is no sweep job
                os.environ.pop(key, None)


def _finished(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / "summary.json").read_text()).get("finished"))
    except (OSError, ValueError):
        return False


# --- DDP ranks inside a sweep ----------------------------------------------------------------------------

def own_job_argv(argv: list[str], environ: dict[str, str] | os._Environ = os.environ) -> list[str]:
    """A rank Lightning re-launched from a sweep job: the command line of that one job (run mode, the job's
    overrides, Lightning's hydra.run.dir); any other process: ``argv`` unchanged."""
    if "LOCAL_RANK" not in environ or JOB_ENV not in environ or not any(a in MULTIRUN_FLAGS for a in argv):
        return argv
    return [*json.loads(environ[JOB_ENV]), *(a for a in argv if a.startswith(LIGHTNING_APPENDS))]


@contextlib.contextmanager
def ddp_job() -> Iterator[None]:
    """Around one job of a sweep (no-op for a single run): publish the job's overrides for the ranks that
    Lightning may start, and afterwards drop the DDP process group and environment it set up."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    hc = HydraConfig.get()
    hydra_overrides = [o for o in hc.overrides.hydra if not o.startswith("hydra.mode=")]
    before = {k: os.environ.get(k) for k in (*DDP_ENV, JOB_ENV)}
    os.environ[JOB_ENV] = json.dumps([*hydra_overrides, *OmegaConf.to_container(hc.overrides.task)])
    try:
        yield
    finally:
        launched_here = before["LOCAL_RANK"] is None  # else torchrun/SLURM made the ranks and owns the group
        if launched_here:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        for key, value in before.items():
            if key in DDP_ENV and not launched_here:
                continue
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- SLURM requeue -----------------------------------------------------------------------------------------

# Seconds to wait for SLURM to stop a requeued job (tests set 0).
REQUEUE_WAIT_ENV = "ROBUSTDIFF_REQUEUE_WAIT"


def wait_for_requeue(summary: dict[str, Any]) -> None:
    """After SIGUSR1 stopped training in a SLURM job, Lightning's SLURMEnvironment has saved and requeued the
    job (scontrol requeue, see training.callbacks.RunCheckpoint); rank 0 then waits to be stopped by SLURM:
    returning now would let submitit record the job as done before SLURM requeues it. Elsewhere, nothing."""
    if (summary.get("signal") != signal.SIGUSR1 or not os.environ.get("SLURM_JOB_ID")
            or os.environ.get("SLURM_PROCID", "0") != "0"):
        return
    print("robustdiff: SLURM job requeued; it will resume from last.ckpt. Waiting for SLURM to stop this one.",
          flush=True)
    time.sleep(float(os.environ.get(REQUEUE_WAIT_ENV, "600")))
