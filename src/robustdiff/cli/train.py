"""robustdiff-train: compose the Hydra config, then train (or resume) the run it names."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..utils.extras import missing_extra
from .hydra_conf import (
    CONFIG_PATH,
    refuse_job,
    run_hydra_command,
    run_training_job,
    task_started,
)
from .sweep import own_job_argv


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    task_started()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    from ..training.config import ConfigError, validate  # no torch: a bad value is answered at once

    try:
        validate(cfg)
    except ConfigError as e:
        refuse_job("robustdiff-train", e, run_dir)
    # Imported here, not at the top: --help, --cfg, --info and completion need none of torch/Lightning.
    from ..training.run import train
    from .sweep import wait_for_requeue

    summary = run_training_job("robustdiff-train", run_dir, lambda: train(cfg, run_dir), after=wait_for_requeue)
    return summary.get("best_val_pgd_acc")  # what a sweeper optimises


def main() -> None:
    if any(a.startswith("hydra/launcher=slurm") for a in sys.argv[1:]) and (
            missing := missing_extra("hydra_plugins.hydra_submitit_launcher", "hydra/launcher=slurm")):
        sys.exit(f"robustdiff-train: error: {missing}")
    sys.argv = [sys.argv[0], *own_job_argv(sys.argv[1:])]  # DDP ranks of a sweep job: that job only
    run_hydra_command("robustdiff-train", _hydra_main, "choose a writable run_root=<dir> (runs go to <run_root>/<name>)")


if __name__ == "__main__":
    main()
