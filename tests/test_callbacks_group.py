"""The `callbacks` config group: extra Lightning callbacks from `_target_` entries, checked before any work, added
after robustdiff's own; EarlyStopping ends a run as finished (summary.json: stopped_early), a rerun has nothing
to do, and a run interrupted by a signal resumes with the patience count it had."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import EarlyStopping
from robustdiff_aids import Crash

from conftest import CONF_DIR, TINY, compose_train
from robustdiff.training.resume import config_identity
from robustdiff.training.run import ConfigError, train
from robustdiff.training.trainer import make_trainer, user_callbacks

pytestmark = pytest.mark.usefixtures("one_thread")

# TINY with half the images: 5 steps per epoch.
SMALL = (*TINY, "limit_train=160", "val_size=32", "limit_test=64")
# min_delta=1.0: no accuracy can improve by more than 1, so every epoch after the first counts against patience
# (the stop epoch is 1 + patience whatever the accuracies are).
ES = ("callbacks=early_stopping", "callbacks.early_stopping.min_delta=1.0")
ES_KEY = "EarlyStopping{'monitor': 'val_pgd_acc', 'mode': 'max'}"


def test_group_composes_default_none_and_early_stopping_in_identity_and_help(tmp_path):
    plain = compose_train(*SMALL)
    assert not plain.callbacks and user_callbacks(plain) == []
    assert not any(k.startswith("callbacks") for k in config_identity(plain))  # earlier runs still resume
    cfg = compose_train(*SMALL, "callbacks=early_stopping")
    [es] = user_callbacks(cfg)
    assert isinstance(es, EarlyStopping) and es.monitor == "val_pgd_acc" and es.mode == "max"
    assert es.patience == 20 and es._check_on_train_epoch_end is False
    assert config_identity(cfg)["callbacks.early_stopping.patience"] == 20  # changes when a run ends
    assert user_callbacks(compose_train(*SMALL, "callbacks=early_stopping", "callbacks.early_stopping=null")) == []
    trainer = make_trainer(cfg, tmp_path, [], extra_callbacks=[es], max_epochs=1)
    assert es in trainer.callbacks
    assert "callbacks" in OmegaConf.load(CONF_DIR / "train.yaml").hydra.help.groups


@pytest.mark.parametrize("overrides,message", [
    (("+callbacks.x._target_=collections.OrderedDict",), "builds a OrderedDict, not a Lightning callback"),
    (("+callbacks.x._target_=no_such_module.Callback",), r"callbacks.x._target_=no_such_module.Callback: cannot be"),
    (("+callbacks.x._target_=pytorch_lightning.callbacks.ModelCheckpoint",), "robustdiff owns checkpointing"),
    (("+callbacks.x._target_=pytorch_lightning.callbacks.OnExceptionCheckpoint", "+callbacks.x.dirpath=ck"),
     "robustdiff owns checkpointing"),
    (("+callbacks.x._target_=pytorch_lightning.callbacks.TQDMProgressBar",), "its own progress bar"),
    (("+callbacks.x.patience=3",), "callbacks.x: needs a _target_"),
    (("callbacks=early_stopping", "callbacks.early_stopping.monitor=train_loss"), "monitor one of them"),
    (("callbacks=early_stopping", "callbacks.early_stopping.mode=min"), "use mode=max"),
    (("callbacks=early_stopping", "callbacks.early_stopping.check_on_train_epoch_end=true"), "set it to false"),
])
def test_bad_callback_entries_are_refused_before_any_work(overrides, message, tmp_path):
    run = tmp_path / "run"
    # data_dir does not exist: reading any data would fail with another error
    with pytest.raises(ConfigError, match=message):
        train(compose_train(*SMALL, f"data_dir={tmp_path / 'nodata'}", *overrides), run)
    assert not run.exists()


def test_early_stopping_finishes_the_run_and_a_rerun_has_nothing_to_do(tmp_path, capsys, crash_after):
    run = tmp_path / "run"
    cfg = (*SMALL, *ES, "callbacks.early_stopping.patience=1", "epochs=3")
    crash_after("summary.json", 2)  # a crash after summary.json, before the epoch's last.ckpt
    with pytest.raises(Crash):
        train(compose_train(*cfg), run)
    crash_after(None)
    assert json.loads((run / "summary.json").read_text())["stopped_early"]["epoch"] == 2
    summary = train(compose_train(*cfg), run)  # last.ckpt (epoch 1) is the commit record: epoch 2 again, stop again
    stopped = summary["stopped_early"]
    assert summary["finished"] and summary["last_epoch"] == 2
    assert stopped["epoch"] == 2 and stopped["epochs"] == 3 and stopped["by"] == "EarlyStopping"
    assert stopped["stopping_reason"] == "patience_exhausted" and "did not improve" in stopped["reason"]
    assert json.loads((run / "summary.json").read_text()) == summary
    assert [r["epoch"] for r in json.loads((run / "history.json").read_text())] == [1, 2]
    assert (run / "model.pt").is_file() and (run / "checkpoints" / "best.ckpt").is_file()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["robustdiff"]["stopped_early"] == stopped
    out = capsys.readouterr().out
    assert "resuming" in out and "stopped early after epoch 2 of 3 by EarlyStopping" in out

    again = train(compose_train(*cfg), run)
    out = capsys.readouterr().out
    assert "already finished" in out and "stopped early at epoch 2" in out and "resuming" not in out
    assert again == summary
    with pytest.raises(ConfigError, match="callbacks.early_stopping.patience"):  # the callbacks are its identity
        train(compose_train(*SMALL, *ES, "epochs=3"), run)


def test_interrupted_run_resumes_with_the_patience_count_it_had(tmp_path, stop_after):
    """patience 2: epoch 1 improves, epochs 2 and 3 do not -> stop after epoch 3 of 4. A signal in epoch 1 (no
    metric yet) stops cleanly; a signal in epoch 3 saves wait_count 1 in last.ckpt; the resumed run stops
    after epoch 3 (a count restarted at 0 would run to epoch 4 and finish normally)."""
    run = tmp_path / "run"
    cfg = (*SMALL, *ES, "callbacks.early_stopping.patience=2", "epochs=4")
    stop_after(2)
    assert train(compose_train(*cfg), run)["interrupted"]
    stop_after(12)
    assert train(compose_train(*cfg), run)["interrupted"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["robustdiff"]["consumed"] == [2, 2] and ckpt["callbacks"][ES_KEY]["wait_count"] == 1
    stop_after(None)
    summary = train(compose_train(*cfg), run)
    assert summary["finished"] and summary["stopped_early"]["epoch"] == 3 and summary["last_epoch"] == 3
