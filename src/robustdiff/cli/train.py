"""robustdiff-train: compose the Hydra config, then train (or resume) the run it names."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..data.datasets import DatasetError
from ..data.store import StoreError
from ..training.callbacks import CheckpointFileError
from ..training.run import ConfigError, train
from ..utils.lock import DirectoryLockedError
from .sweep import ddp_job, own_job_argv, wait_for_requeue


def project_root() -> Path:
    """The checkout holding conf/ and experiments/ (robustdiff is installed editable from it)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "conf" / "train.yaml").is_file():
            return parent
    raise FileNotFoundError(f"robustdiff: cannot find conf/train.yaml above {here}; install with `make install`")


CONF_DIR = str(project_root() / "conf")
EXPERIMENTS_DIR = project_root() / "experiments"


def with_searchpath(argv: list[str]) -> list[str]:
    """Let Hydra find the named recipes in experiments/ as the `experiment` config group."""
    if any(a.startswith("hydra.searchpath") for a in argv):
        return argv
    return [*argv, f"hydra.searchpath=[file://{EXPERIMENTS_DIR}]"]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with ddp_job():  # under -m: DDP ranks run this job only
            summary = train(cfg, run_dir)
    except (ConfigError, DirectoryLockedError, StoreError, DatasetError, CheckpointFileError) as e:
        print(f"robustdiff-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"robustdiff-train: error: {e.strerror}", file=sys.stderr)  # full disk: says which file; the rest is intact
        sys.exit(1)
    wait_for_requeue(summary)
    if summary.get("signal"):
        sys.exit(128 + summary["signal"])  # saved, but not done: `a && b` chains stop (143 for SIGTERM)
    return summary.get("best_val_pgd_acc")  # what a sweeper optimises


def main() -> None:
    sys.argv = [sys.argv[0], *own_job_argv(with_searchpath(sys.argv[1:]))]
    _hydra_main()


if __name__ == "__main__":
    main()
