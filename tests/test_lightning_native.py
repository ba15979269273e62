"""Training through Lightning's own machinery: the validation loop (and trainer.validate), ModelCheckpoint with
the tie rule, torchmetrics, logged names, the console, the Trainer built from cfg.trainer, debug runs and the
SLURM requeue signal (SLURMEnvironment) on CPU."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from robustdiff_aids import aids_env

from conftest import TINY, compose_train
from robustdiff.training.callbacks import RunCheckpoint
from robustdiff.training.run import ConfigError, revalidate, train
from robustdiff.training.trainer import make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# TINY with half the images: 5 steps per epoch.
SMALL = (*TINY, "limit_train=160", "val_size=32", "limit_test=64")
CLI = Path(sys.executable).parent / "robustdiff-train"


def test_validation_loop_logs_console_and_revalidate(tmp_path, capsys):
    """Two epochs with the CSV logger: evaluation runs in Lightning's validation loop; metrics.csv's `epoch`
    counts from 1, as the console and history.json do (ours are epoch/<field>); the LR monitor and images/s are logged; the console
    has one line per epoch and names the best model and the robustdiff-eval command; trainer.validate on
    best.ckpt reproduces that epoch's recorded numbers exactly."""
    run = tmp_path / "run"
    summary = train(compose_train(*[o for o in SMALL if not o.startswith("logger=")], "logger=csv", "epochs=2"),
                    run)
    assert summary["finished"]
    out = capsys.readouterr().out
    assert "epoch 1/2: test clean" in out and "epoch 2/2: test clean" in out and "img/s" in out, out
    assert f"robustdiff-eval {run}" in out and str(run / "model.pt") in out
    # on this CPU the suggested attack is a subset that finishes in minutes, with the full one named for a GPU
    assert f"robustdiff-eval {run} --n-examples 200 --aa-attacks apgd-ce" in out and "on a GPU" in out
    from robustdiff.training.run import eval_suggestion

    assert eval_suggestion(run, cuda=True) == f"robustdiff-eval {run}"  # a GPU: the full, standard evaluation
    # a run far shorter than the EMA's memory says so once, at its start; a long enough one does not
    from robustdiff.training.run import short_run_warning

    assert out.count("fewer than the ~200 steps the EMA model") == 1
    assert short_run_warning(200, 0.995) is None and "199 optimiser steps" in short_run_warning(199, 0.995)

    rows = list(csv.DictReader((run / "csv" / "version_0" / "metrics.csv").open()))
    per_epoch = [r for r in rows if r.get("epoch/val_pgd_acc")]
    assert [r["epoch"] for r in per_epoch] == ["1", "2"]  # the epoch a reader sees everywhere: 1-based
    assert {r["epoch"] for r in rows if r["epoch"]} <= {"1", "2"}
    assert all(float(r["perf/images_per_s"]) > 0 and float(r["perf/eval_time_s"]) > 0 for r in per_epoch)
    assert any(r.get("lr-SGD/pg1") for r in rows)  # LearningRateMonitor

    history = json.loads((run / "history.json").read_text())
    best = next(r for r in history if r["epoch"] == summary["best_epoch"])
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert ckpt["robustdiff"]["history"][-1]["epoch"] == summary["best_epoch"]
    again = revalidate(run, "best")
    assert again["epoch/val_pgd_acc"] == pytest.approx(best["val_pgd_acc"], abs=0)
    assert again["epoch/test_clean_acc"] == pytest.approx(best["test_clean_acc"], abs=0)
    assert "epoch/test_pgd_acc" in again  # the test-set attack always runs in a re-evaluation
    assert json.loads((run / "history.json").read_text()) == history  # re-evaluating leaves the run as it was


def test_best_checkpoint_tie_goes_to_the_later_epoch(tmp_path):
    trainer = SimpleNamespace(strategy=SimpleNamespace(reduce_boolean_decision=lambda decision: decision))
    cb = RunCheckpoint(tmp_path)
    cb.best_k_models = {"best.ckpt": torch.tensor(0.5)}
    cb.kth_best_model_path = "best.ckpt"
    assert cb.check_monitor_top_k(trainer, torch.tensor(0.5))  # equal: the later epoch wins (docs/method.md, "TRADES")
    assert cb.check_monitor_top_k(trainer, torch.tensor(0.6))
    assert not cb.check_monitor_top_k(trainer, torch.tensor(0.4))
    plain = super(RunCheckpoint, cb).check_monitor_top_k
    assert not plain(trainer, torch.tensor(0.5))  # Lightning's own rule keeps the earlier epoch


@pytest.mark.parametrize("override,message", [
    ("+trainer.bogus_option=1", "trainer.bogus_option: not an argument of Lightning's Trainer"),
    ("trainer.max_epochs=5", "set epochs="),
    ("+trainer.precision=bf16-mixed", "set precision="),
    ("+trainer.check_val_every_n_epoch=2", "every epoch is evaluated"),
    ("trainer.fast_dev_run=true", "debug=fdr"),
    ("trainer.limit_train_batches=0.1", "debug run only"),
])
def test_trainer_keys_robustdiff_controls_or_does_not_know_are_errors(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", ".")):
        make_trainer(compose_train(*SMALL, override), tmp_path, [], max_epochs=1)


def test_any_other_trainer_argument_reaches_the_trainer(tmp_path):
    trainer = make_trainer(compose_train(*SMALL, "trainer.gradient_clip_val=0.5",
                                         "+trainer.max_epochs=null", "+trainer.accumulate_grad_batches=1"),
                           tmp_path, [], max_epochs=3)
    assert trainer.gradient_clip_val == 0.5 and trainer.max_epochs == 3
    assert trainer.check_val_every_n_epoch == 1 and not trainer.predicting


def test_debug_limit_run_is_short_and_never_resumes(tmp_path, capsys):
    run = tmp_path / "debug" / "x"
    cfg = compose_train(*SMALL, "debug=limit")
    assert cfg.trainer.limit_train_batches == 3 and cfg.debug_mode == "limit"
    train(cfg, run)
    history = json.loads((run / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    capsys.readouterr()
    train(compose_train(*SMALL, "debug=limit"), run)  # again: from scratch, not "already finished"
    out = capsys.readouterr().out
    assert "resuming" not in out and "already finished" not in out and "debug run (limit)" in out
    assert json.loads((run / "run.json").read_text())["debug_mode"] == "limit"


def test_debug_fast_dev_run_goes_to_its_own_run_root(tmp_path):
    proc = subprocess.run([str(CLI), *SMALL, "debug=fdr", f"run_root={tmp_path}", "name=x"], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "debug" / "x" / "run.json").is_file() and not (tmp_path / "x").exists()
    assert not (tmp_path / "debug" / "x" / "checkpoints" / "last.ckpt").exists()  # fast_dev_run publishes nothing
    assert "debug run (fdr)" in proc.stdout


def test_slurm_requeue_signal_saves_requeues_through_lightning_and_resumes(tmp_path):
    """SIGUSR1 inside a (simulated) SLURM job: last.ckpt at the step boundary, then Lightning's SLURMEnvironment
    handler calls `scontrol requeue <job>`; the requeued job (same command) resumes and finishes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.log"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "robustdiff", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "ROBUSTDIFF_REQUEUE_WAIT": "0"}
    env.pop("SLURM_ARRAY_JOB_ID", None)
    signalled = aids_env(env, self_signal=(10, 3))  # SIGUSR1 after optimiser step 3
    argv = [str(CLI), *SMALL, "epochs=1", f"run_root={tmp_path}", "name=run"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=signalled, timeout=300)
    assert proc.returncode == 128 + 10, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["robustdiff"]["consumed"] == [0, 3]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "resuming" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["finished"]
    assert calls.read_text().split() == ["requeue", "4242"]  # requeued once


def test_the_progress_bar_counts_epochs_from_one_like_the_console(tmp_path, capsys):
    overrides = [o for o in SMALL if not o.startswith(("trainer.enable_progress_bar", "progress="))]
    train(compose_train(*overrides, "epochs=2", "trainer.enable_progress_bar=true"), tmp_path / "run")
    captured = capsys.readouterr()
    bar = captured.err + captured.out
    assert "Epoch 1/2" in bar and "Epoch 2/2" in bar and "Epoch 0" not in bar
    # progress=false (the spelling robustdiff-generate takes too) turns the bar off; a non-boolean is refused first.
    train(compose_train(*overrides, "epochs=1", "progress=false"), tmp_path / "quiet")
    captured = capsys.readouterr()
    assert "Epoch 1/1" not in captured.err + captured.out
    with pytest.raises(ConfigError, match="progress='sometimes' must be true or false"):
        train(compose_train(*overrides, "epochs=1", "progress=sometimes"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
