"""Run directories: finding them, reading them, and telling them apart.

A run directory is any directory holding ``run.json`` (written by robustdiff-train, with
``history.json``/``history.csv``, ``summary.json`` and, after robustdiff-eval, ``eval.json``; or by
robustdiff-edm, with ``samples/grid-<kimg>.png`` and, with ``logger=csv``, the training loss in
``csv/version_<k>/metrics.csv``). A sweep is any directory with run directories somewhere below it.

``load_run`` reads one directory into a ``Run``; ``swept_settings`` names the settings that differ between
runs (what a sweep varied), from each run.json's identity.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # run.json
    history: list[dict[str, Any]]  # one row per epoch, missing values None
    summary: dict[str, Any] | None
    evaluation: dict[str, Any] | None  # eval.json

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.name)

    @property
    def is_standard(self) -> bool:
        """Standard training (``loss=ce``, no attack): a measuring classifier, not an adversarial run."""
        return self.config.get("loss") == "ce"

    @property
    def selected_by(self) -> str:
        """What picked the best epoch: validation PGD (the reference) or clean accuracy (``eval.select=clean``)."""
        return "clean accuracy" if (self.config.get("eval") or {}).get("select") == "clean" else "validation PGD"

    @property
    def is_edm(self) -> bool:
        """An EDM (generator) run of robustdiff-edm rather than a TRADES run."""
        return is_edm_config(self.config)


def is_edm_config(config: dict[str, Any]) -> bool:
    """run.json of robustdiff-edm: it describes a network (preset and constructor kwargs), not a threat model."""
    return "kwargs" in config and "network" in config and "norm" not in config


def find_runs(path: str | os.PathLike) -> list[Path]:
    """Run directories at or below ``path`` (those holding run.json), sorted."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    if (path / "run.json").is_file():
        return [path]
    runs = sorted(p.parent for p in path.rglob("run.json") if p.is_file())
    if not runs:
        raise FileNotFoundError(f"no run directories (with run.json) at or below {path}")
    return runs


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _cell(value: str) -> Any:
    value = value.strip()
    if value == "" or value.lower() in ("none", "nan", "null"):
        return None
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and re.fullmatch(r"-?\d+", value) else number


def read_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """history.json (a list of rows, or {'rows': [...]}) or else history.csv; NaN and empty cells become None."""
    run_dir = Path(run_dir)
    if (run_dir / "history.json").is_file():
        rows = _read_json(run_dir / "history.json")
        rows = rows.get("rows", []) if isinstance(rows, dict) else rows
    elif (run_dir / "history.csv").is_file():
        with open(run_dir / "history.csv", newline="") as f:
            rows = [{k: _cell(v or "") for k, v in row.items()} for row in csv.DictReader(f)]
    else:
        return []
    clean = []
    for row in rows:
        clean.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return sorted(clean, key=lambda r: r.get("epoch") or 0)


def load_run(run_dir: str | os.PathLike) -> Run:
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "run.json")
    summary = _read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else None
    evaluation = _read_json(run_dir / "eval.json") if (run_dir / "eval.json").is_file() else None
    return Run(run_dir, config, read_history(run_dir), summary, evaluation)


def pgd_steps(run: Run) -> int | None:
    """Steps of the PGD that scored the run during training (run.json's eval.steps); None for runs written
    before run.json recorded it."""
    steps = (run.config.get("eval") or {}).get("steps")
    return int(steps) if steps is not None else None


# --- sweeps ------------------------------------------------------------------------------------------

_NOISE = ("name", "data_dir", "generated_quality")  # never the point of a sweep


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """run.json's ``identity``: the flat settings that make the run what it is (empty where a run has none)."""
    identity = config.get("identity")
    return dict(identity) if isinstance(identity, dict) else {}


def swept_settings(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """{run path: {setting: value}} of the settings that differ between ``runs`` (what a sweep varied), from
    run.json's identity."""
    flats = {str(r.path): {k: v for k, v in _flat(r.config).items() if k.split(".")[0] not in _NOISE} for r in runs}
    keys = sorted({k for f in flats.values() for k in f})
    varied = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats.values()}) > 1]
    return {path: {k: f.get(k) for k in varied} for path, f in flats.items()}


# --- EDM runs ----------------------------------------------------------------------------------------

def edm_losses(run_dir: str | os.PathLike) -> tuple[list[float], list[float]]:
    """(kimg, training loss) per logged step from ``csv/version_*/metrics.csv`` (logger=csv; a resumed run adds
    a version), sorted by kimg, later versions winning; empty without a CSV log."""
    by_kimg: dict[float, float] = {}
    versions = sorted(Path(run_dir).glob("csv/version_*/metrics.csv"),
                      key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
    for path in versions:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                loss, kimg = _cell(row.get("train/loss") or ""), _cell(row.get("kimg") or "")
                if isinstance(loss, (int, float)) and isinstance(kimg, (int, float)):
                    by_kimg[float(kimg)] = float(loss)
    kimgs = sorted(by_kimg)
    return kimgs, [by_kimg[k] for k in kimgs]


def sample_grids(run_dir: str | os.PathLike) -> list[Path]:
    """``samples/grid-<kimg>.png`` of an EDM run, oldest first (the names are zero-padded, so they sort)."""
    return sorted(Path(run_dir).glob("samples/grid-*.png"))
