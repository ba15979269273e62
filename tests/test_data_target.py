"""data=... builds the DataModule from its config's ``_target_``: the default is RobustDataModule, a researcher's
subclass trains through data._target_ with arguments of its own, the class is part of the run's identity, and a
bad data node is refused before any data is read."""

import json

import pytest

from conftest import TINY, compose_train
from robustdiff.training.run import ConfigError, build_datamodule, train

pytestmark = pytest.mark.usefixtures("one_thread")

OWN = ("data._target_=robustdiff_test_data.TaggedData", "+data.tag=pilot", "epochs=1", "limit_train=96")


def test_the_default_data_node_builds_the_robust_datamodule():
    from robustdiff.data.datamodule import RobustDataModule

    cfg = compose_train(*TINY, "ratio=1.0")
    assert cfg.data._target_ == "robustdiff.data.datamodule.RobustDataModule"
    dm = build_datamodule(cfg)
    assert type(dm) is RobustDataModule and dm.batch_size == 32 and dm.limit_train == 320 and dm.val_size == 64


def test_your_own_datamodule_trains_and_is_part_of_the_runs_identity(tmp_path):
    run = tmp_path / "own"
    assert train(compose_train(*TINY, *OWN), run)["finished"]
    record = json.loads((run / "run.json").read_text())
    assert record["val_split"]["tag"] == "pilot"  # the subclass's setup ran, with its own argument
    assert record["identity"]["data._target_"] == "robustdiff_test_data.TaggedData"
    assert record["identity"]["data.tag"] == "pilot"
    with pytest.raises(ConfigError, match=r"data._target_: run has \"robustdiff_test_data.TaggedData\""):
        train(compose_train(*TINY, "epochs=1", "limit_train=96", "name=own"), run)


@pytest.mark.parametrize("overrides,message", [
    (("data._target_=no_such_package.Data",), r"data._target_='no_such_package.Data' cannot be imported"),
    (("data._target_=robustdiff_test_data.NotData",),
     r"data._target_='robustdiff_test_data.NotData' is a type, not a robustdiff.data.datamodule.RobustDataModule "
     r"subclass"),
    (("data._target_=robustdiff_test_models.TinyNet",), r"not a robustdiff.data.datamodule.RobustDataModule"),
    (("+data.ratio=0.5",), r"data.ratio is set from a top-level key: write ratio=\.\.\. instead"),
    (("+data.tag=x",), r"data.tag: robustdiff.data.datamodule.RobustDataModule takes no argument 'tag'"),
])
def test_a_bad_data_node_is_refused_before_any_data_is_read(overrides, message, tmp_path, monkeypatch):
    from robustdiff.data.datamodule import RobustDataModule

    def no_data(*args, **kwargs):
        raise AssertionError("data read before the data config was checked")

    monkeypatch.setattr(RobustDataModule, "setup", no_data)
    with pytest.raises(ConfigError, match=message):
        train(compose_train(*TINY, *overrides), tmp_path / "bad")
    assert not (tmp_path / "bad" / "run.json").exists()
