"""model=... instantiates the network from its config's ``_target_``: the PreAct-ResNet-18 trains, stops, resumes,
evaluates and exports like a WideResNet; any nn.Module a researcher brings trains through model._target_; a bad
_target_ is refused before any data is read."""

import json

import pytest
import torch

from conftest import TINY, compose_train, run_files, same
from robustdiff.cli import evaluate as cli_eval
from robustdiff.models.loading import load_model, load_recorded_model
from robustdiff.models.normalize import Normalized
from robustdiff.models.preactresnet import PreActBlock, PreActResNet18
from robustdiff.training.run import ConfigError, train

pytestmark = pytest.mark.usefixtures("one_thread")

PREACT = (*TINY, "model=preactresnet18", "model.width=8", "epochs=2", "limit_train=160")
TINY_NET = ("model._target_=robustdiff_test_models.TinyNet", "model.name=tinynet", "~model.depth", "~model.width")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = tmp_path_factory.mktemp("preact") / "straight"
    summary = train(compose_train(*PREACT), run)
    assert summary["finished"]
    return run


def test_preactresnet18_is_the_standard_network():
    net = PreActResNet18(num_classes=10, in_channels=3, mean=(0.5,), std=(0.25,))
    assert sum(p.numel() for p in net.parameters()) == 11_172_170  # PreAct-ResNet-18 with its final BN (CIFAR-10)
    assert sum(isinstance(m, PreActBlock) for m in net.modules()) == 8
    assert "mean" not in net.state_dict()  # normalisation lives in non-persistent buffers, as in the WideResNet
    small = PreActResNet18(num_classes=10, in_channels=1, mean=(0.3,), std=(0.3,), width=8)
    assert small(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_preactresnet_run_records_its_model_and_resumes_to_the_same_result(straight, tmp_path, stop_after):
    run_json = json.loads((straight / "run.json").read_text())
    assert run_json["model"] == {"name": "preactresnet18", "_target_": "robustdiff.models.preactresnet.PreActResNet18",
                                 "width": 8}
    assert run_json["identity"]["model._target_"] == "robustdiff.models.preactresnet.PreActResNet18"
    run = tmp_path / "run"
    stop_after(3)
    first = train(compose_train(*PREACT), run)
    assert first.get("interrupted") and not first["finished"]
    stop_after(None)
    assert train(compose_train(*PREACT), run)["finished"]  # the same command resumes it
    assert same(run_files(run), run_files(straight))


def test_preactresnet_run_evaluates_and_exports(straight, tmp_path):
    cli_eval.main([str(straight), "--n-examples", "8", "--batch-size", "8", "--attacks", "clean,pgd,autoattack",
                   "--aa-attacks", "apgd-ce", "--pgd-steps", "2", "--device", "cpu"])
    ev = json.loads((straight / "eval.json").read_text())
    assert ev["settings"]["model"] == "preactresnet18" and ev["n_examples"] == 8
    assert ev["autoattack"]["robust_acc"] <= ev["clean"]["acc"]
    with pytest.raises(SystemExit, match="WideResNets .* only"):
        cli_eval.main(["export", str(straight), "--out", str(tmp_path / "m.pt"), "--card", str(tmp_path / "c.json")])
    out = tmp_path / "model.pt"
    cli_eval.main(["export", str(straight), "--out", str(out)])
    exported = torch.load(out, map_location="cpu", weights_only=True)
    assert exported["model"]["_target_"] == "robustdiff.models.preactresnet.PreActResNet18"
    record = json.loads((straight / "run.json").read_text())["model"]
    model = load_model(straight / "model.pt", dataset="fashionmnist", record=record)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_recorded_model(out, exported["model"], dataset="fashionmnist")(x), model(x))


def test_a_run_json_naming_a_non_module_is_refused(straight, tmp_path):
    from robustdiff.models.loading import CheckpointError

    for target in ("os.system", "robustdiff_test_models.not_a_module"):
        with pytest.raises(CheckpointError, match="not a torch.nn.Module subclass"):
            load_recorded_model(straight / "model.pt", {"_target_": target}, dataset="fashionmnist")


def test_your_own_module_trains_through_model_target(tmp_path):
    run = tmp_path / "own"
    summary = train(compose_train(*TINY, *TINY_NET, "epochs=1", "limit_train=96"), run)
    assert summary["finished"]
    assert json.loads((run / "run.json").read_text())["model"] == {"name": "tinynet",
                                                                   "_target_": "robustdiff_test_models.TinyNet"}
    record = json.loads((run / "run.json").read_text())["model"]
    model = load_model(run / "model.pt", dataset="fashionmnist", record=record)
    assert isinstance(model, Normalized)  # TinyNet takes no mean/std: wrapped in the normalising module
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("overrides,message", [
    (("model._target_=no_such_package.Net",), r"model._target_='no_such_package.Net' cannot be imported"),
    (("model._target_=robustdiff_test_models.not_a_module",), r"not a torch.nn.Module subclass"),
    (("model._target_=robustdiff_test_models.TinyNet",), r"does not take model.depth, model.width: remove them"),
])
def test_a_bad_model_target_is_refused_before_any_data_is_read(overrides, message, tmp_path, monkeypatch):
    from robustdiff.data.datamodule import RobustDataModule

    def no_data(*args, **kwargs):
        raise AssertionError("data read before the model config was checked")

    monkeypatch.setattr(RobustDataModule, "setup", no_data)
    with pytest.raises(ConfigError, match=message):
        train(compose_train(*TINY, *overrides), tmp_path / "bad")
    assert not (tmp_path / "bad" / "run.json").exists()
