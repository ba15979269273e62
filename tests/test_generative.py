"""Generator-quality metrics: the Fréchet distance (EDM's formula) against closed forms and torchmetrics, classifier
FD on real Fashion-MNIST (≈ 0 for the same images, growing as images are degraded), label agreement on a store
with wrong labels, the Inception (FID) path end to end with the real network class randomly initialised, the
robustdiff-fid command and the quality record in a store's manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import compose_train
from robustdiff.cli.fid import main as fid_main
from robustdiff.data.datasets import load_split
from robustdiff.data.store import StoreWriter, quality_summary, store_info
from robustdiff.evaluation.features import INCEPTION_URL, InceptionFeatures, feature_extractor, load_inception
from robustdiff.evaluation.frechet import (
    QualityError,
    Statistics,
    compute_statistics,
    frechet_distance,
    load_statistics,
    save_statistics,
)
from robustdiff.evaluation.generative import batches_of, label_agreement, score_store
from robustdiff.training.run import train

pytestmark = pytest.mark.usefixtures("one_thread")


def spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    # Diagonal (commuting) covariances: Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) = Σ (√s1 − √s2)².
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # Same covariance: only the means count; identical statistics: 0.
    sigma = spd(rng, 5)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), abs=1e-8)
    assert abs(frechet_distance(mu1, sigma, mu1, sigma)) < 1e-8
    # General SPD matrices: torchmetrics' independent (eigenvalue) implementation agrees.
    from torchmetrics.image.fid import _compute_fid

    a, b = spd(rng, 16), spd(rng, 16)
    m1, m2 = rng.normal(size=16), rng.normal(size=16)
    theirs = float(_compute_fid(torch.from_numpy(m1), torch.from_numpy(a), torch.from_numpy(m2), torch.from_numpy(b)))
    assert frechet_distance(m1, a, m2, b) == pytest.approx(theirs, rel=1e-8)
    with pytest.raises(QualityError, match="do not match"):
        frechet_distance(m1, a, mu1, sigma)


def test_statistics_round_trip_in_edm_layout(tmp_path):
    rng = np.random.default_rng(1)
    stats = Statistics(rng.normal(size=4), spd(rng, 4), 123, {"features": "classifier", "source": "x"})
    path = save_statistics(tmp_path / "ref.npz", stats)
    back = load_statistics(path)
    assert np.array_equal(back.mu, stats.mu) and np.array_equal(back.sigma, stats.sigma)
    assert back.n == 123 and back.meta == stats.meta
    np.savez(tmp_path / "edm.npz", mu=stats.mu, sigma=stats.sigma)  # EDM's fid-refs layout: mu and sigma only
    assert load_statistics(tmp_path / "edm.npz").meta["features"] == "inception"
    np.savez(tmp_path / "bad.npz", mean=stats.mu)
    with pytest.raises(QualityError, match="needs arrays 'mu' and 'sigma'"):
        load_statistics(tmp_path / "bad.npz")
    with pytest.raises(QualityError, match="no such file"):
        load_statistics(tmp_path / "missing.npz")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A WRN-10-1 trained normally (loss=ce) for 3 epochs on 2,304 real Fashion-MNIST images."""
    run = tmp_path_factory.mktemp("clf") / "classifier"
    cfg = compose_train("model=wrn-10-1", "loss=ce", "eval.select=clean", "eval.steps=1", "epochs=3",
                        "batch_size=32", "limit_train=2560", "val_size=256", "limit_test=200", "lr=0.05", "ema_decay=0.9",
                        "logger=none", "trainer.enable_progress_bar=false")
    summary = train(cfg, run)
    assert summary["finished"] and summary["selected_by"] == "val_clean_acc"
    assert summary["test_clean_acc_best"] > 0.5  # chance is 0.1
    history = json.loads((run / "history.json").read_text())
    assert all(r["val_clean_acc"] is not None for r in history)
    return run


@pytest.fixture(scope="module")
def test_images():
    x, y = load_split("fashionmnist", "test")
    return x[:1000], y[:1000]


def degrade(images: np.ndarray, kind: str, amount: float, seed: int = 0) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    if kind == "noise":
        x = x + amount * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    else:  # blur: a box filter of width `amount`
        k = int(amount)
        x = torch.nn.functional.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)[..., :28, :28]
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def test_classifier_fd_is_zero_for_the_same_images_and_grows_with_degradation(classifier, test_images):
    images, _ = test_images
    features, meta, _ = feature_extractor("classifier", classifier=classifier)
    assert meta["features"] == "classifier" and len(meta["classifier_sha256"]) == 64
    ref = compute_statistics(features, batches_of(images[:500], batch_size=128))
    assert ref.mu.dtype == np.float64 and ref.sigma.shape == (64, 64) and ref.n == 500
    same = compute_statistics(features, batches_of(images[:500], batch_size=200))  # other batching
    assert abs(same.distance(ref)) < 1e-6
    other = compute_statistics(features, batches_of(images[500:]))
    fds = {"real": other.distance(ref)}
    for kind, amounts in (("noise", (0.1, 0.3)), ("blur", (3, 5))):
        for a in amounts:
            fds[f"{kind} {a}"] = compute_statistics(features, batches_of(degrade(images[500:], kind, a))).distance(ref)
    assert fds["real"] < fds["noise 0.1"] < fds["noise 0.3"], fds
    assert fds["real"] < fds["blur 3"] < fds["blur 5"], fds
    # The same numbers by torchmetrics' own compute() (eigenvalue route) on the same features.
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=features)
    for imgs, real in ((images[:500], True), (images[500:], False)):
        metric.update(torch.from_numpy(imgs).permute(0, 3, 1, 2), real=real)
    assert float(metric.compute()) == pytest.approx(fds["real"], rel=1e-3)


def write_store(path, images, labels):
    with StoreWriter(path, images.shape[1:], num_classes=10, shard_size=400,
                     provenance={"dataset": "fashionmnist"}) as w:
        w.append(images, labels)
        w.finalize()
    return path


def test_label_agreement_catches_wrong_labels(classifier, test_images, tmp_path):
    images, labels = test_images
    features, meta, model = feature_extractor("classifier", classifier=classifier)
    right = label_agreement(model, batches_of(images, labels), 10)
    wrong = label_agreement(model, batches_of(images, (labels + 1) % 10), 10)
    assert right["label_agreement"] > 0.5 and wrong["label_agreement"] < 0.25, (right, wrong)
    assert right["n"] == 1000 and len(right["per_class"]) == 10
    # Every trouser (class 1) relabelled ankle boot (9): class 9's agreement collapses, class 1 has no images.
    mixed = np.where(labels == 1, 9, labels)
    per = label_agreement(model, batches_of(images, mixed), 10)["per_class"]
    assert per[1] is None and per[9] < right["per_class"][9] - 0.25, (per, right["per_class"])
    assert per[0] == right["per_class"][0]

    real = load_split("fashionmnist", "train")[0][50000:51000]
    ref = save_statistics(tmp_path / "ref.npz", compute_statistics(features, batches_of(real), meta=meta))
    good = write_store(tmp_path / "good", images, labels)
    bad = write_store(tmp_path / "bad", images, (labels + 1) % 10)
    rg = score_store(good, ref, classifier=classifier, n=None)
    rb = score_store(bad, ref, classifier=classifier, n=600)
    assert rg["value"] == pytest.approx(score_store(good, ref, classifier=classifier, n=None)["value"])
    assert rg["label_agreement"] > rb["label_agreement"] + 0.3 and rb["n"] == 600
    manifest = store_info(good)
    assert len(manifest["quality"]) == 1 and manifest["quality"][0]["metric"] == "classifier_fd"
    assert "label agreement" in quality_summary(manifest)[0]
    assert not (good / ".writer.lock").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 6 images cannot span 2,048 dimensions
def test_fid_path_end_to_end_with_a_random_inception(tmp_path, test_images):
    images, _ = test_images
    net = InceptionFeatures(None)  # torch-fidelity's TF-Inception port, randomly initialised (no download)
    assert type(net.net).__mro__[2].__name__ == "FeatureExtractorInceptionV3"
    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(InceptionFeatures(None).net.state_dict(), weights)
    module, meta = load_inception(weights)  # read with weights_only=True
    assert meta["features"] == "inception" and len(meta["weights_sha256"]) == 64
    feats = module(torch.from_numpy(images[:3]).permute(0, 3, 1, 2))  # grey 28×28 uint8 -> resized RGB
    assert feats.shape == (3, 2048) and torch.isfinite(feats).all()
    a = compute_statistics(module, batches_of(images[:6], batch_size=3))
    b = compute_statistics(module, batches_of(degrade(images[:6], "noise", 0.5), batch_size=3))
    assert a.sigma.shape == (2048, 2048) and abs(a.distance(a)) < 1e-6 and np.isfinite(a.distance(b))

    # A weights file that is a pickle with code in it is refused (weights_only), never executed.
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(QualityError, match="cannot be read as Inception weights"):
        load_inception(tmp_path / "evil.pth")
    with pytest.raises(QualityError) as e:
        load_inception(tmp_path / "nowhere.pth")
    assert INCEPTION_URL in str(e.value) and "--inception-weights" in str(e.value)


def test_robustdiff_fid_command(classifier, tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    argv = ["ref", "--dataset", "fashionmnist", "--split", "test", "--count", "500", "--classifier", str(classifier),
            "--out", str(ref), "--no-progress"]
    assert fid_main(argv) == 0 and load_statistics(ref).meta["source"] == "fashionmnist:test[0:500]"
    assert fid_main(argv) == 1 and "--overwrite" in capsys.readouterr().err  # never overwrites silently
    # an output file's directory must exist (as for every command's output files): refused before any work
    missing = tmp_path / "no-such-dir" / "ref.npz"
    assert fid_main([*argv[:-3], "--out", str(missing), "--no-progress"]) == 1
    assert "does not exist; create it first" in capsys.readouterr().err and not missing.parent.exists()
    x, y = load_split("fashionmnist", "test")
    store = write_store(tmp_path / "store", x[500:900], y[500:900])
    assert fid_main(["score", str(store), "--ref", str(ref), "--classifier", str(classifier), "--json",
                     str(tmp_path / "nowhere" / "q.json"), "--no-progress"]) == 1
    assert "does not exist; create it first" in capsys.readouterr().err
    out_json = tmp_path / "q.json"
    assert fid_main(["score", str(store), "--ref", str(ref), "--classifier", str(classifier), "--json",
                     str(out_json), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "classifier FD" in printed and "only 400 of the 50,000" in printed
    assert json.loads(out_json.read_text())["n"] == 400
    # --n-examples, the count's name on every command (--n its short form): the first 300 images only
    for flag in ("--n-examples", "--n"):
        assert fid_main(["score", str(store), "--ref", str(ref), "--classifier", str(classifier), flag, "300",
                         "--json", str(out_json), "--no-progress"]) == 0
        assert json.loads(out_json.read_text())["n"] == 300
    capsys.readouterr()
    # Inception statistics compared with classifier features: refused, naming the file and the field.
    edm_ref = tmp_path / "edm.npz"
    np.savez(edm_ref, mu=np.zeros(2048), sigma=np.eye(2048))
    assert fid_main(["score", str(store), "--ref", str(edm_ref), "--classifier", str(classifier)]) == 1
    assert "meta.features is 'inception'" in capsys.readouterr().err
    assert fid_main(["score", str(store), "--ref", str(ref), "--features", "classifier"]) == 1
    assert "needs a classifier" in capsys.readouterr().err
