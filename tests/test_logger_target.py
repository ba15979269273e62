"""logger._target_=...: any Lightning Logger a researcher brings is built with robustdiff's run-time arguments
(save_dir, run_name, job_type) plus its own settings and receives the run's metrics (epochs counted from 1); a
_target_ that cannot be imported, is a class other than a Logger or builds something else is refused with one line
naming logger._target_ before training starts."""

import json

import pytest

from conftest import TINY, compose_train
from robustdiff.training.run import ConfigError, train

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = tuple(o for o in TINY if not o.startswith("logger=")) + ("epochs=1", "limit_train=96", "logger=csv")
RECORDING = "robustdiff_test_loggers.RecordingLogger"


def test_a_custom_logger_is_built_with_run_time_arguments_and_receives_the_metrics(tmp_path):
    run = tmp_path / "run"
    summary = train(compose_train(*BASE, f"logger._target_={RECORDING}", "+logger.tag=hello"), run)
    assert summary["finished"]
    folder = run / "recording"
    assert json.loads((folder / "init.json").read_text()) == {"save_dir": str(run), "run_name": "run",
                                                              "job_type": "train", "tag": "hello"}
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if "epoch/val_pgd_acc" in r]
    assert len(epochs) == 1, rows
    assert epochs[0]["epoch"] == 1  # Lightning's 0-based epoch, counted from 1 as robustdiff's history does
    (history,) = json.loads((run / "history.json").read_text())
    for key in ("val_pgd_acc", "test_clean_acc", "test_pgd_acc", "train_loss"):
        assert epochs[0][f"epoch/{key}"] == pytest.approx(history[key]), key
    assert not (run / "csv").exists()  # the csv option's target was replaced, not added to


@pytest.mark.parametrize("target, message", [
    ("no_such_package.Logger", r"logger\._target_=no_such_package\.Logger: cannot be imported"),
    ("robustdiff_test_loggers.NoSuchLogger", r"logger\._target_=robustdiff_test_loggers\.NoSuchLogger: cannot be "
                                             r"imported"),
    ("robustdiff_test_loggers.NotALogger", r"logger\._target_=robustdiff_test_loggers\.NotALogger: is the class "
                                           r".*not a Lightning logger"),
    ("robustdiff_test_models.TinyNet", r"logger\._target_=robustdiff_test_models\.TinyNet: is the class "
                                       r".*not a Lightning logger"),
    ("robustdiff_test_loggers.RECORD_DIR", r"logger\._target_=robustdiff_test_loggers\.RECORD_DIR: is a str, not"),
    ("robustdiff_test_loggers.not_a_logger", r"logger\._target_=robustdiff_test_loggers\.not_a_logger: builds a dict, "
                                             r"not a Lightning logger"),
])
def test_a_bad_logger_target_is_refused_before_training_starts(target, message, tmp_path, monkeypatch):
    import pytorch_lightning as pl
    import robustdiff_test_loggers

    def no_fit(*args, **kwargs):
        raise AssertionError("training started before the logger was checked")

    monkeypatch.setattr(pl.Trainer, "fit", no_fit)
    monkeypatch.setattr(robustdiff_test_loggers.NotALogger, "built", 0)
    if "builds a" not in message:  # what a target names is checked with the config, before any data is read
        from robustdiff.data.datamodule import RobustDataModule

        def no_data(*args, **kwargs):
            raise AssertionError("data read before the logger config was checked")

        monkeypatch.setattr(RobustDataModule, "setup", no_data)
    with pytest.raises(ConfigError, match=message) as e:
        train(compose_train(*BASE, f"logger._target_={target}"), tmp_path / "bad")
    assert "\n" not in str(e.value)
    assert robustdiff_test_loggers.NotALogger.built == 0  # a class that is not a Logger is never instantiated
    assert not (tmp_path / "bad" / "run.json").exists()
