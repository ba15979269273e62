"""What the Hydra CLIs share: where the configs are (package data, so a wheel carries them) and the groups
their ``--help`` lists. Light on purpose: torch, Lightning and wandb are imported inside the task functions,
so that ``--help``, ``--cfg``, ``--info`` and shell completion answer at once."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from omegaconf import OmegaConf

from ..utils import naming  # noqa: F401  (registers the rd_* resolvers the configs use)

CONFIG_PATH = "pkg://robustdiff.conf"
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")  # the same files as a directory (compose API)


def config_groups(groups: Iterable[str], conf_dir: str = CONF_DIR) -> str:
    """``group: option, option`` for each of ``groups`` (the package's options; recipes added through
    hydra.searchpath are not listed but can be chosen)."""
    lines = []
    for group in groups:
        options = sorted(p.stem for p in (Path(conf_dir) / group).glob("*.yaml"))
        lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


OmegaConf.register_new_resolver("rd_config_groups", lambda groups: config_groups(groups), replace=True)


def remove_unused_run_dir(run_dir: Path) -> bool:
    """After a rejected config: remove the run directory Hydra created for the job if it holds nothing but what
    Hydra wrote there (its ``.hydra/`` config copies and the job's log). Anything else, e.g. the run.json of an
    earlier run, leaves it untouched. Never removes more than those files and the two directories."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    sub = hc.output_subdir
    own = {f"{hc.job.name}.log", *(f"{sub}/{f}" for f in ("config.yaml", "hydra.yaml", "overrides.yaml") if sub)}
    if not run_dir.is_dir():
        return False
    files = [p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if not p.is_dir()]
    if any(f not in own for f in files):
        return False
    for f in files:
        (run_dir / f).unlink()
    for d in ([run_dir / sub] if sub else []) + [run_dir]:
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    return True
