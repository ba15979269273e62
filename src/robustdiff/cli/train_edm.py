"""robustdiff-edm: compose the Hydra config (conf/train_edm.yaml), then train (or resume) the EDM run it names.

    robustdiff-edm dataset=cifar10 edm=cifar10 trainer=gpu logger=wandb
    robustdiff-edm dataset=fashionmnist edm=small          # CPU demo; rerun the same command to resume
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .hydra_conf import (
    CONFIG_PATH,
    discard_hydra_files,
    publish_hydra_files,
    remove_unused_run_dir,
    run_hydra_command,
    task_started,
)
from .sweep import own_job_argv


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train_edm")
def _hydra_main(cfg: DictConfig) -> None:
    task_started()
    # Imported here, not at the top: --help, --cfg, --info and completion need none of torch/Lightning.
    from ..data.datasets import DatasetError
    from ..data.store import StoreError
    from ..training.callbacks import CheckpointFileError
    from ..training.config import ConfigError
    from ..training.edm_run import train_edm
    from ..utils.lock import DirectoryLockedError
    from .sweep import ddp_job

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with ddp_job():  # under -m: DDP ranks run this job only
            summary = train_edm(cfg, run_dir)
    except (ConfigError, DirectoryLockedError, StoreError, DatasetError, CheckpointFileError) as e:
        print(f"robustdiff-edm: error: {e}", file=sys.stderr)
        if not remove_unused_run_dir(run_dir):  # a rejected config leaves no run directory behind
            discard_hydra_files(run_dir)  # and an existing run's recorded configuration as it was
        sys.exit(2)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"robustdiff-edm: error: {e.strerror}", file=sys.stderr)  # full disk: says which file; the rest is intact
        sys.exit(1)
    finally:
        publish_hydra_files(run_dir)  # a no-op after a refusal (already discarded)
    if summary.get("signal"):
        sys.exit(128 + summary["signal"])  # saved, but not done: `a && b` chains stop (143 for SIGTERM)


def main() -> None:
    sys.argv = [sys.argv[0], *own_job_argv(sys.argv[1:])]  # DDP ranks of a sweep job: that job only
    run_hydra_command("robustdiff-edm", _hydra_main, "choose a writable run_root=<dir> (runs go to <run_root>/<name>)")


if __name__ == "__main__":
    main()
