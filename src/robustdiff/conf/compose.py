"""Compose one of robustdiff's primary configs (train, train_edm, generate) with overrides, as its command would,
for the pipelines that run several jobs in one process (robustdiff-demo, robustdiff-study)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from ..utils import naming  # noqa: F401  (registers the rd_* resolvers the configs use)

CONF_DIR = str(Path(__file__).resolve().parent)  # this package's configs as a directory (Hydra's compose API)


def compose_config(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """``config_name`` (e.g. "train") with ``overrides`` (e.g. ["epochs=2"]) applied, as Hydra composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def primary_keys(config_name: str) -> set[str]:
    """The top-level keys of a primary config (``train_edm``, ``generate``): its own keys and the groups its
    defaults list composes in — every key the command has, read from the file without composing it."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / f"{config_name}.yaml"))
    keys = {k for k in node if k != "defaults"}
    for entry in node.get("defaults", []):
        if isinstance(entry, dict):
            keys.update(k.split("@")[-1] for k in entry if not k.startswith(("override ", "hydra")))
    return keys
