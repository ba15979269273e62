"""robustdiff-edm: compose the Hydra config (conf/train_edm.yaml), then train (or resume) the EDM run it names.

    robustdiff-edm dataset=cifar10 edm=cifar10 trainer=gpu logger=wandb
    robustdiff-edm dataset=fashionmnist edm=small          # CPU demo; rerun the same command to resume
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .hydra_conf import (
    CONFIG_PATH,
    refuse_job,
    run_hydra_command,
    run_training_job,
    task_started,
)
from .sweep import own_job_argv


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train_edm")
def _hydra_main(cfg: DictConfig) -> None:
    task_started()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    from ..training.config import ConfigError, check_edm_keys  # no torch: a typo'd key is answered at once

    try:
        check_edm_keys(cfg)
    except ConfigError as e:
        refuse_job("robustdiff-edm", e, run_dir)
    # Imported here, not at the top: --help, --cfg, --info and completion need none of torch/Lightning.
    from ..training.edm_run import train_edm

    run_training_job("robustdiff-edm", run_dir, lambda: train_edm(cfg, run_dir))


def main() -> None:
    sys.argv = [sys.argv[0], *own_job_argv(sys.argv[1:])]  # DDP ranks of a sweep job: that job only
    run_hydra_command("robustdiff-edm", _hydra_main, "choose a writable run_root=<dir> (runs go to <run_root>/<name>)")


if __name__ == "__main__":
    main()
