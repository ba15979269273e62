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
