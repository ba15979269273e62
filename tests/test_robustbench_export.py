"""`robustdiff-eval export` against RobustBench's own code: its DMWideResNet (from the robustbench wheel, the
one module loaded by path, without the package's __init__ and its dependencies) loads the exported model.pt
strictly and gives the same logits; the card's authorship fields are the user's, never the paper's."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robustdiff.cli.evaluate import main as eval_main
from robustdiff.models.wrn import WideResNet

MODULE = Path("robustbench") / "model_zoo" / "architectures" / "dm_wide_resnet.py"
CIFAR10 = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))


@pytest.fixture(scope="module")
def dm_wide_resnet(tmp_path_factory):
    """RobustBench's dm_wide_resnet module: from an installed robustbench (`pip install robustdiff[robustbench]`),
    else from its wheel downloaded into a temporary directory (only the registry is needed)."""
    spec = importlib.util.find_spec("robustbench")  # locates the package without running its __init__
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))).parent / MODULE
    else:
        where = tmp_path_factory.mktemp("robustbench")
        got = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(where),
                              "robustbench"], capture_output=True, text=True, timeout=300)
        if got.returncode != 0:
            pytest.skip(f"robustbench is not installed and its wheel could not be fetched: {got.stderr[-300:]}")
        path = where / MODULE
    module_spec = importlib.util.spec_from_file_location("rb_dm_wide_resnet", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_robustbench_dmwideresnet_loads_the_export_strictly_with_the_same_logits(dm_wide_resnet, tmp_path):
    torch.manual_seed(0)
    model = WideResNet(depth=10, width=2, num_classes=10, **CIFAR10)
    with torch.no_grad():  # trained-looking BatchNorm statistics, so that a mix-up of buffers would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ckpt, out, card_path = tmp_path / "mine.pt", tmp_path / "model.pt", tmp_path / "card.json"
    torch.save(model.state_dict(), ckpt)
    eval_main(["export", str(ckpt), "--dataset", "cifar10", "--out", str(out), "--card", str(card_path),
               "--name", "my WRN-10-2", "--authors", "A. User"])

    theirs = dm_wide_resnet.DMWideResNet(num_classes=10, depth=10, width=2, activation_fn=dm_wide_resnet.Swish,
                                         **CIFAR10)
    theirs.load_state_dict(torch.load(out, map_location="cpu", weights_only=True), strict=True)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)

    card = json.loads(card_path.read_text())
    assert card["name"] == "my WRN-10-2" and card["authors"] == "A. User"
    assert card["link"] is None and card["venue"] is None  # not the paper's arXiv link / ICML 2023


def test_card_name_defaults_to_the_run_never_to_the_paper(tmp_path):
    torch.save(WideResNet(depth=10, width=1, num_classes=10, **CIFAR10).state_dict(), tmp_path / "c10-run.pt")
    eval_main(["export", str(tmp_path / "c10-run.pt"), "--dataset", "cifar10", "--out", str(tmp_path / "model.pt"),
               "--card", str(tmp_path / "card.json")])
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["name"] == "c10-run" and card["authors"] is None
    assert "Wang" not in json.dumps(card) and "Better Diffusion" not in json.dumps(card)
