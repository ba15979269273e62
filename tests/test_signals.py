"""Stop signals from another process at every kind of step boundary of a run — the first, a middle and the last
step of an epoch, the first step of the next, the run's very last step — and the self-signal on an epoch's last
step: every interrupted run, resumed by the same command, must end with the files of an uninterrupted run."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from robustdiff_aids import aids_env

from conftest import run_files, same

# 160 images (64 validate) at batch 32: ceil(160 / 32) = 5 optimiser steps per epoch, 2 epochs.
SMALL = ("model=wrn-10-1", "batch_size=32", "limit_train=160", "val_size=64", "limit_test=64", "norm.steps=1",
         "eval.steps=2", "eval.batch_size=128", "eval.test_every=1", "logger=none",
         "trainer.enable_progress_bar=false", "epochs=2")
CLI = Path(sys.executable).parent / "robustdiff-train"


def command(root: Path) -> list[str]:
    return [str(CLI), *SMALL, f"run_root={root}", "name=run"]


def env(**aids) -> dict:
    """This environment with OMP_NUM_THREADS=1 and the test aids ``aids`` (robustdiff_aids.aids_env)."""
    return aids_env({**os.environ, "OMP_NUM_THREADS": "1"}, **aids)


def signalled_at(root: Path, step: int, signum: int) -> subprocess.CompletedProcess:
    """Run the command; when it has finished optimiser step ``step`` (and waits at the gate), send it ``signum``
    from this process, then let it go on. Returns the finished process."""
    gate = root / f"gate-{step}"
    gate.mkdir()
    os.mkfifo(gate / "ready")
    os.mkfifo(gate / "go")
    proc = subprocess.Popen(command(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(step_gate=(step, gate)))
    ready = os.open(gate / "ready", os.O_RDONLY | os.O_NONBLOCK)
    try:
        line = b""
        while not line.endswith(b"\n"):
            readable, _, _ = select.select([ready], [], [], 1.0)
            if readable:
                line += os.read(ready, 100)
            assert proc.poll() is None, f"exited before step {step}: {proc.stdout.read()[-3000:]}"
        pid, at = map(int, line.split())
        assert (pid, at) == (proc.pid, step)
        os.kill(proc.pid, signum)  # a real signal, from another process, at this step boundary
        with open(gate / "go", "w") as go:
            go.write("go\n")
    finally:
        os.close(ready)
    out, _ = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("straight")
    proc = subprocess.run(command(root), capture_output=True, text=True, env=env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return run_files(root / "run")


@pytest.mark.slow
def test_real_signals_at_every_kind_of_step_boundary_resume_to_an_uninterrupted_run(straight, tmp_path):
    # Steps 1-5 are epoch 1, 6-10 epoch 2: first, middle and last step of an epoch, the next epoch's first step,
    # the run's very last step; SIGUSR1 (what SLURM sends before pre-emption) and SIGTERM.
    for step, signum in ((1, signal.SIGTERM), (3, signal.SIGUSR1), (5, signal.SIGTERM), (6, signal.SIGTERM),
                         (10, signal.SIGUSR1)):
        proc = signalled_at(tmp_path, step, signum)
        ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
        if step == 10:  # the last step: the run finishes its last epoch, then stops finished
            assert proc.returncode == 0, proc.stdout[-3000:]
            assert "evaluating and saving this epoch" in proc.stdout
        elif step % 5 == 0:  # an epoch's last step: that epoch is evaluated and committed, then the run stops
            assert proc.returncode == 128 + signum, proc.stdout[-3000:]
            assert ckpt["robustdiff"]["history"][-1]["epoch"] == step // 5
            assert ckpt["global_step"] == step
        else:  # mid-epoch: the state at this step is saved
            assert proc.returncode == 128 + signum, proc.stdout[-3000:]
            assert ckpt["global_step"] == step, (step, ckpt["global_step"])
        assert "run the same command again to resume" in proc.stdout or step == 10
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"]
    assert same(run_files(tmp_path / "run"), straight)
    rerun = subprocess.run(command(tmp_path), capture_output=True, text=True, env=env(), timeout=600)
    assert rerun.returncode == 0 and "already finished" in rerun.stdout


@pytest.mark.parametrize("step", [5, 10])
def test_self_signal_on_an_epochs_last_step_resumes_to_an_uninterrupted_run(step, straight, tmp_path):
    proc = subprocess.run(command(tmp_path), capture_output=True, text=True, timeout=600,
                          env=env(self_signal=(15, step)))
    assert proc.returncode == (0 if step == 10 else 143), proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = subprocess.run(command(tmp_path), capture_output=True, text=True, env=env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["last_epoch"] == 2
    assert same(run_files(tmp_path / "run"), straight)
