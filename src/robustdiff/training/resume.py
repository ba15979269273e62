"""What a run directory records about its run (run.json, config.yaml) and the check made before a run resumes
in it: a run resumes only with the same identity, so a directory never mixes two different runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ..utils.io import atomic_write_json, atomic_write_text
from .config import ConfigError

# Fields that define what a run *is*: resuming with any of them changed is refused.
IDENTITY_FIELDS = ("dataset", "model", "num_classes", "in_channels", "norm", "loss", "epochs", "batch_size",
                   "generated", "ratio", "generated_sampling", "seed", "limit_train", "val_size")


# Keys that may change when a run is resumed: where things are and how the job runs, never what it computes.
# Every other key of the composed config is part of the run's identity (run.json "identity").
RESUMABLE_CHANGES = ("name", "run_root", "data_dir", "download", "progress", "trainer", "logger", "eval.batch_size")
EDM_RESUMABLE_CHANGES = ("name", "run_root", "data_dir", "download", "progress", "trainer", "logger", "grid",
                         "edm.snapshot_kimg")


def config_identity(cfg: DictConfig, resumable: tuple[str, ...] = RESUMABLE_CHANGES) -> dict[str, Any]:
    """The resolved config as flat ``{"a.b": value}`` without the keys that may change on resume."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif not any(prefix == r or prefix.startswith(r + ".") for r in resumable):
            flat[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def check_resume(run_dir: Path, desc: dict[str, Any], fields: tuple[str, ...] = IDENTITY_FIELDS,
                 kind: str = "run", resumable: tuple[str, ...] = RESUMABLE_CHANGES) -> None:
    """Refuse to resume (or overwrite) ``run_dir`` when its run.json differs from ``desc`` in ``fields``."""
    path = run_dir / "run.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); restore it from a backup, or train into another name=... "
                          f"(this directory is left as it is)") from None
    diffs = [f"{k}: run has {json.dumps(old.get(k))}, you asked for {json.dumps(desc.get(k))}" for k in fields
             if json.dumps(old.get(k), sort_keys=True) != json.dumps(desc.get(k), sort_keys=True)]
    if "identity" in old and "identity" in desc:  # every key that changes the math
        a, b = old["identity"], desc["identity"]
        diffs += [f"{k}: run has {json.dumps(a.get(k))}, you asked for {json.dumps(b.get(k))}"
                  for k in sorted(set(a) | set(b)) if k not in fields and
                  json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)]
    if diffs:
        raise ConfigError(f"{path}: this run directory holds a different {kind}, refusing to resume or overwrite it:"
                          "\n  " + "\n  ".join(diffs) + "\nChoose another name=... (or run_root=...) for the new run; "
                          f"only {', '.join(resumable)} may change when a run resumes.")


def write_run_files(trainer: pl.Trainer, run_dir: Path, desc: dict[str, Any], cfg: DictConfig) -> None:
    """run.json (what the run is; checked on resume) and the resolved config.yaml, by rank 0."""
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "run.json", desc)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
