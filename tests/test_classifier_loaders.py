"""The classifiers robustdiff-generate (confidence selection) and classifier FD (features, label agreement) use are
any network robustdiff-train trained: a PreAct-ResNet-18 run loads from its run directory or its robustdiff-eval
export as ``models.loading.load_model`` rebuilds it, scores candidates with its logits, and gives as features the
input of its final nn.Linear; bad inputs are refused with one line naming the file."""

import json

import numpy as np
import pytest
import torch

from conftest import TINY, compose_train
from robustdiff.diffusion.generation_inputs import GenerationError, load_classifier
from robustdiff.evaluation.features import ClassifierFeatures, feature_extractor
from robustdiff.evaluation.frechet import QualityError, compute_statistics
from robustdiff.evaluation.generative import batches_of
from robustdiff.models.loading import load_model
from robustdiff.models.preactresnet import PreActResNet
from robustdiff.training.run import train
from robustdiff.utils.io import file_sha256

pytestmark = pytest.mark.usefixtures("one_thread")

PREACT = (*TINY, "model=preactresnet18", "model.width=8", "epochs=1", "limit_train=160")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("preact-clf") / "run"
    assert train(compose_train(*PREACT), run)["finished"]
    return run


@pytest.fixture(scope="module")
def reference(run):
    """The run's model as robustdiff-eval loads it."""
    record = json.loads((run / "run.json").read_text())["model"]
    return load_model(run / "model.pt", dataset="fashionmnist", record=record)


def images(n: int = 6, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_a_preactresnet_run_is_the_generation_classifier(run, reference, tmp_path):
    from robustdiff.cli import evaluate as cli_eval
    from robustdiff.diffusion.generation_inputs import read_classifier

    x = images().float() / 255
    clf = load_classifier(run, None, 10, 1)
    assert isinstance(clf, PreActResNet) and not clf.training
    with torch.no_grad():
        expected = reference(x)
        assert torch.equal(clf(x), expected)
        assert torch.equal(clf(images(4, 16).float() / 255), reference(images(4, 16).float() / 255))  # 16-px images
    _, about = read_classifier(run, None, 10, 1)
    assert about["name"] == "preactresnet18" and about["weights"] == run / "model.pt"
    assert about["record"]["_target_"] == "robustdiff.models.preactresnet.PreActResNet18"
    # robustdiff-eval export's {'state_dict', 'model', 'dataset'}: rebuilt from the record it holds.
    exported = tmp_path / "exported.pt"
    cli_eval.main(["export", str(run), "--out", str(exported)])
    with torch.no_grad():
        assert torch.equal(load_classifier(exported, None, 10, 1)(x), expected)


def test_generation_selects_by_the_preactresnets_confidence(run, reference, tmp_path):
    from robustdiff.data.store import GeneratedStore
    from robustdiff.diffusion.generate import generate
    from test_generate import config, tiny_network

    network = tiny_network(tmp_path / "network.pt")
    manifest = generate(config(network, tmp_path / "kept", "n=20", f"classifier={run}", "keep_fraction=0.5"))
    assert manifest["count"] == 20 and manifest["class_counts"] == [2] * 10
    cx, cy = GeneratedStore(tmp_path / "kept-candidates").get(np.arange(40))
    with torch.no_grad():
        p = reference(torch.from_numpy(cx).permute(0, 3, 1, 2).float() / 255).softmax(1)
    conf = p[torch.arange(40), torch.from_numpy(cy)].numpy()
    keep = np.sort(np.concatenate([np.flatnonzero(cy == c)[np.argsort(-conf[cy == c], kind="stable")[:2]]
                                   for c in range(10)]))
    kx, ky = GeneratedStore(tmp_path / "kept").get(np.arange(20))
    np.testing.assert_array_equal(kx, cx[keep])
    np.testing.assert_array_equal(ky, cy[keep])


def test_classifier_features_of_a_preactresnet_are_the_input_of_its_final_linear(run, reference):
    from robustdiff.evaluation.features import final_linear

    features, meta, clf = feature_extractor("classifier", classifier=run)
    assert isinstance(features, ClassifierFeatures) and features.num_features == 64  # 8·width
    assert meta["classifier_model"] == "preactresnet18"
    assert meta["classifier_sha256"] == file_sha256(run / "model.pt")
    assert final_linear(clf)[0] == "linear"
    x = images(5)
    seen = []
    handle = reference.linear.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        out = features(x)
        reference(x.float() / 255)
    handle.remove()
    assert out.shape == (5, 64) and out.dtype == torch.float32
    assert torch.equal(out, seen[0])
    with torch.no_grad():
        assert torch.equal(out, reference.features(x.float() / 255))
    # The features module leaves no hook behind on the classifier (label agreement runs the same network).
    assert not any(m._forward_pre_hooks for m in clf.modules())
    stats = compute_statistics(features, batches_of(images(12).permute(0, 2, 3, 1).numpy(), batch_size=5))
    assert stats.mu.shape == (64,) and stats.sigma.shape == (64, 64) and stats.n == 12


def test_wideresnet_features_are_unchanged(tmp_path):
    from robustdiff.models.wrn import WideResNet

    torch.manual_seed(0)
    wrn = WideResNet(10, 1, num_classes=10, in_channels=1, mean=(0.2860,), std=(0.3530,)).eval()
    torch.save(wrn.state_dict(), tmp_path / "wrn.pt")
    features, meta, _ = feature_extractor("classifier", classifier=tmp_path / "wrn.pt", dataset="fashionmnist")
    assert meta["classifier_model"] == "wrn-10-1" and features.num_features == 64
    x = images(3)
    with torch.no_grad():
        assert torch.equal(features(x), wrn.features(x.float() / 255))


def test_bad_classifiers_are_refused_with_one_line_naming_the_file(run, tmp_path):
    from robustdiff.models.build import build_model
    from robustdiff.models.preactresnet import PreActResNet18

    def refused(error, match, call):
        with pytest.raises(error, match=match) as e:
            call()
        assert "\n" not in str(e.value), str(e.value)

    # A run's generator of another class count or channel count.
    refused(GenerationError, rf"classifier={run / 'model.pt'}: has 10 classes and 1 input channels .* generates "
            r"100 classes", lambda: load_classifier(run, None, 100, 1))
    refused(GenerationError, r"generates 10 classes of 3-channel", lambda: load_classifier(run, None, 10, 3))
    # The bare state dict of a PreAct-ResNet does not say which network it is: read as a WideResNet, refused.
    refused(GenerationError, rf"classifier={run / 'model.pt'}: not a WideResNet state dict.*run directory",
            lambda: load_classifier(run / "model.pt", "fashionmnist", 10, 1))
    refused(GenerationError, r"dataset=<name>.*or give the run directory",
            lambda: load_classifier(run / "model.pt", None, 10, 1))
    refused(QualityError, rf"classifier {run / 'model.pt'}: not a WideResNet state dict",
            lambda: feature_extractor("classifier", classifier=run / "model.pt", dataset="fashionmnist"))
    # A run directory whose weights do not fit its run.json's model.
    other = tmp_path / "other"
    other.mkdir()
    wide = PreActResNet18(num_classes=10, in_channels=1, mean=(0.5,), std=(0.5,), width=4)
    torch.save(wide.state_dict(), other / "model.pt")
    (other / "run.json").write_text((run / "run.json").read_text())
    refused(GenerationError, rf"classifier={other / 'model.pt'}: the weights don't fit",
            lambda: load_classifier(other, None, 10, 1))
    # A run of a network without an nn.Linear: it scores candidates, but has no feature layer.
    conv = tmp_path / "conv"
    conv.mkdir()
    record = {"_target_": "robustdiff_test_heads.ConvHeadNet", "name": "convhead"}
    net = build_model(record, num_classes=10, in_channels=1, mean=(0.5,), std=(0.5,))
    torch.save(net.state_dict(), conv / "model.pt")
    (conv / "run.json").write_text(json.dumps({"dataset": "fashionmnist", "model": record}))
    assert load_classifier(conv, None, 10, 1)(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    refused(QualityError, rf"classifier {conv}: ConvHeadNet has no nn.Linear|classifier {conv}: Normalized has no "
            r"nn.Linear", lambda: feature_extractor("classifier", classifier=conv))
    with pytest.raises(QualityError, match="has no nn.Linear"):
        ClassifierFeatures(torch.nn.Sequential(torch.nn.Conv2d(1, 10, 3), torch.nn.AdaptiveAvgPool2d(1)))
