"""robustdiff-train: compose the Hydra config, then train (or resume) the run it names."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..utils.extras import missing_extra
from .hydra_conf import (  # noqa: F401  (CONF_DIR: for callers that compose configs)
    CONF_DIR,
    CONFIG_PATH,
    discard_hydra_files,
    publish_hydra_files,
    remove_unused_run_dir,
    run_hydra_command,
    task_started,
)
from .sweep import own_job_argv


def _refuse(error: Exception, run_dir: Path) -> None:
    print(f"robustdiff-train: error: {error}", file=sys.stderr)
    if not remove_unused_run_dir(run_dir):  # a rejected config leaves no run directory behind
        discard_hydra_files(run_dir)  # and an existing run's recorded configuration as it was
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    task_started()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    from ..training.config import ConfigError, validate  # no torch: a bad value is answered at once

    try:
        validate(cfg)
    except ConfigError as e:
        _refuse(e, run_dir)
    # Imported here, not at the top: --help, --cfg, --info and completion need none of torch/Lightning.
    from ..data.datasets import DatasetError
    from ..data.store import StoreError
    from ..training.callbacks import CheckpointFileError
    from ..training.run import train
    from ..utils.lock import DirectoryLockedError
    from .sweep import ddp_job, wait_for_requeue

    try:
        with ddp_job():  # under -m: DDP ranks run this job only
            summary = train(cfg, run_dir)
    except (ConfigError, DirectoryLockedError, StoreError, DatasetError, CheckpointFileError) as e:
        _refuse(e, run_dir)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"robustdiff-train: error: {e.strerror}", file=sys.stderr)  # full disk: says which file; the rest is intact
        sys.exit(1)
    finally:
        publish_hydra_files(run_dir)  # a no-op after a refusal (already discarded)
    wait_for_requeue(summary)
    if summary.get("signal"):
        sys.exit(128 + summary["signal"])  # saved, but not done: `a && b` chains stop (143 for SIGTERM)
    return summary.get("best_val_pgd_acc")  # what a sweeper optimises


def main() -> None:
    if any(a.startswith("hydra/launcher=slurm") for a in sys.argv[1:]) and (
            missing := missing_extra("hydra_plugins.hydra_submitit_launcher", "hydra/launcher=slurm")):
        sys.exit(f"robustdiff-train: error: {missing}")
    sys.argv = [sys.argv[0], *own_job_argv(sys.argv[1:])]  # DDP ranks of a sweep job: that job only
    run_hydra_command("robustdiff-train", _hydra_main, "choose a writable run_root=<dir> (runs go to <run_root>/<name>)")


if __name__ == "__main__":
    main()
