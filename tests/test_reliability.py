"""Faults a long run meets: a crash at every publication point of an epoch, two processes on one run directory,
a resume with changed hyperparameters, overwrites, and bad values — each must end in a clean state or a clear
error, never in a stale run that reports success."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_train

from robustdiff.training.callbacks import KILL_ENV, SimulatedKill
from robustdiff.training.run import ConfigError, train

pytestmark = pytest.mark.usefixtures("one_thread")

POINTS = ("best.ckpt", "model.pt", "history", "summary.json", "last.ckpt")


def run_files(run: Path) -> dict:
    """What a run directory says, in comparable form."""
    def ckpt(name):
        c = torch.load(run / "checkpoints" / name, weights_only=True)
        return c["state_dict"], c["robustdiff"]["history"], c["global_step"]

    return {"model.pt": torch.load(run / "model.pt", weights_only=True),
            "history.json": json.loads((run / "history.json").read_text()),
            "history.csv": (run / "history.csv").read_text(),
            "summary.json": json.loads((run / "summary.json").read_text()),
            "best.ckpt": ckpt("best.ckpt"), "last.ckpt": ckpt("last.ckpt")}


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted reference runs: 1 epoch and 2 epochs."""
    root = tmp_path_factory.mktemp("straight")
    out = {}
    for epochs in (1, 2):
        train(compose_train(*TINY, f"epochs={epochs}"), root / f"e{epochs}")
        out[epochs] = run_files(root / f"e{epochs}")
    return out


@pytest.mark.parametrize("point,epochs", [(p, 1) for p in POINTS] + [("model.pt", 2), ("summary.json", 2)])
def test_crash_at_every_publication_point_then_rerun_equals_a_straight_run(point, epochs, straight, tmp_path,
                                                                          monkeypatch):
    run = tmp_path / "run"
    cfg = compose_train(*TINY, f"epochs={epochs}")
    monkeypatch.setenv(KILL_ENV, f"{point}@{epochs}")
    with pytest.raises(SimulatedKill):
        train(cfg, run)
    monkeypatch.delenv(KILL_ENV)
    # The crash left files of the last epoch published before last.ckpt; the rerun must not take them for a
    # finished run (the reported defect), and must end exactly where a straight run ends.
    summary = train(compose_train(*TINY, f"epochs={epochs}"), run)
    assert summary["finished"]
    assert same(run_files(run), straight[epochs]), point
    assert not list(run.glob("**/*.tmp"))


EDM_FAST = ["resolution=16", "limit_train=256", "edm.batch_size=16", "edm.lr_rampup_kimg=0", "grid.rows=1",
            "grid.steps=2", "logger=none", "trainer.enable_progress_bar=false", "edm.duration_kimg=0.064",
            "edm.snapshot_kimg=0.032"]


def edm_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    from robustdiff.cli.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train_edm", overrides=[*EDM_FAST, *overrides])


@pytest.mark.parametrize("point", ["network.pt", "summary.json", "last.ckpt"])
def test_edm_crash_at_the_last_snapshot_then_rerun_equals_a_straight_run(point, tmp_path, monkeypatch):
    from robustdiff.training.diffusion import train_edm

    train_edm(edm_config(), tmp_path / "straight")
    # The last snapshot (step 4 of 4) dies after publishing `point`: summary.json may already say "finished".
    monkeypatch.setenv(KILL_ENV, f"{point}@4")
    with pytest.raises(SimulatedKill):
        train_edm(edm_config(), tmp_path / "run")
    monkeypatch.delenv(KILL_ENV)
    summary = train_edm(edm_config(), tmp_path / "run")
    assert summary["finished"] and summary["steps"] == 4
    for name in ("network.pt", "snapshots/network-000000.032.pt", "snapshots/network-000000.064.pt"):
        a = torch.load(tmp_path / "straight" / name, weights_only=True)
        b = torch.load(tmp_path / "run" / name, weights_only=True)
        assert same(a, b), name
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == json.loads(
        (tmp_path / "straight" / "summary.json").read_text())
