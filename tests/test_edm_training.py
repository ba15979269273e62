"""EDM training on real Fashion-MNIST (center-cropped to 16 px, small SongUNet): the loss drops, an
interrupted run resumes exactly, network.pt loads weights-only, and bad configs fail before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from robustdiff.cli.hydra_conf import CONF_DIR
from robustdiff.data.datasets import load_split
from robustdiff.diffusion.edm import EDMPrecond, edm_loss
from robustdiff.training.diffusion import load_network
from robustdiff.training.edm_run import train_edm
from robustdiff.training.run import ConfigError

FAST = ["resolution=16", "limit_train=256", "edm.batch_size=16", "edm.lr_rampup_kimg=0", "grid.rows=1",
        "grid.steps=2", "logger=none", "trainer.enable_progress_bar=false", "edm.ema_halflife_kimg=0.05"]


def fmnist_available() -> bool:
    try:
        load_split("fashionmnist", "test", "/nonexistent")
    except (OSError, ValueError):
        return False
    return True


needs_data = pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST not installed")


pytestmark = pytest.mark.usefixtures("one_thread")


def config(*overrides: str, fast: bool = True):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train_edm", overrides=[*(FAST if fast else []), "data_dir=/nonexistent", *overrides])


def eval_loss(net: EDMPrecond, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Loss on fixed images with fixed σ and noise (8 draws), no augmentation, no dropout."""
    g = torch.Generator().manual_seed(123)
    net.eval()
    with torch.no_grad():
        return float(np.mean([edm_loss(net, images, labels, generator=g).item() for _ in range(8)]))


def net_from_ckpt(run_dir: Path, kwargs: dict) -> EDMPrecond:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    net = EDMPrecond(**kwargs)
    net.load_state_dict({k[len("net."):]: v for k, v in state.items() if k.startswith("net.")})
    return net


@needs_data
def test_short_run_lowers_loss_and_writes_run_files(tmp_path):
    cfg = config("edm.duration_kimg=0.48", "edm.snapshot_kimg=0.24", "edm.lr=2e-3", "edm.augment_p=0")
    summary = train_edm(cfg, tmp_path / "run")
    assert summary["finished"] and summary["steps"] == 30
    run = tmp_path / "run"
    desc = json.loads((run / "run.json").read_text())
    x, y = load_split("fashionmnist", "train", "/nonexistent")
    images = torch.from_numpy(x[256:320, 6:22, 6:22]).permute(0, 3, 1, 2).float() / 127.5 - 1  # unseen images
    labels = torch.from_numpy(y[256:320])
    torch.manual_seed(0)
    initial = eval_loss(EDMPrecond(**desc["kwargs"]), images, labels)
    trained = eval_loss(net_from_ckpt(run, desc["kwargs"]), images, labels)
    assert trained < 0.8 * initial, (initial, trained)  # 351 → 256 here

    net, info = load_network(run / "network.pt")  # weights_only load of the EMA network
    assert info["kwargs"] == desc["kwargs"] and info["kimg"] == pytest.approx(0.48)
    assert net.label_dim == 10 and net.img_resolution == 16 and net.img_channels == 1
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["grid-000000.24.png", "grid-000000.48.png"]
    # Every scheduled snapshot keeps its network (generators of two training lengths from one run).
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["network-000000.24.pt", "network-000000.48.pt"]
    early, _ = load_network(run / "snapshots" / "network-000000.24.pt")
    final, info_final = load_network(run / "snapshots" / "network-000000.48.pt")
    assert info_final["kimg"] == pytest.approx(0.48)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in final.state_dict().items())
    assert not all(torch.equal(v, net.state_dict()[k]) for k, v in early.state_dict().items())
    from PIL import Image

    width, height = Image.open(run / "samples" / "grid-000000.48.png").size
    # One row per class (grid.rows=1 sample each), 16 px upscaled 4×, 2 px padding, class names on the left.
    assert height == 10 * (16 * 4 + 2) + 2 and width > 16 * 4 + 4 + 40
    # Re-running a finished run does nothing.
    assert train_edm(cfg, run)["finished"]


@needs_data
def test_a_run_shorter_than_its_logging_interval_says_it_will_have_no_loss_curve(tmp_path, capsys):
    train_edm(config("edm.duration_kimg=0.08", "edm.snapshot_kimg=0.08", "trainer.log_every_n_steps=10"),
              tmp_path / "short")  # 5 steps of 16
    out = capsys.readouterr().out
    assert out.count("no loss curve will be recorded") == 1 and "trainer.log_every_n_steps=1" in out
    train_edm(config("edm.duration_kimg=0.16", "edm.snapshot_kimg=0.16", "trainer.log_every_n_steps=10"),
              tmp_path / "long")  # 10 steps: one logged point
    assert "no loss curve" not in capsys.readouterr().out


@needs_data
def test_interrupted_run_resumes_exactly(tmp_path, stop_after):
    cfg = config("edm.duration_kimg=0.096", "edm.snapshot_kimg=1")  # 6 steps; snapshot only at the end
    train_edm(cfg, tmp_path / "straight")
    stop_after(3)
    stopped = train_edm(cfg, tmp_path / "resumed")
    assert stopped.get("interrupted") and stopped["steps"] == 3 and not stopped["finished"]
    stop_after(None)
    assert train_edm(cfg, tmp_path / "resumed")["finished"]

    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    assert a["robustdiff"]["consumed"] == b["robustdiff"]["consumed"] == [0, 6]
    for key, value in a["state_dict"].items():  # net and EMA weights, bit for bit
        assert torch.equal(value, b["state_dict"][key]), key
    for key, value in a["optimizer_states"][0]["state"].items():
        assert all(torch.equal(v, b["optimizer_states"][0]["state"][key][k]) for k, v in value.items())
    # A snapshot forced by the signal is not a scheduled one: only the end's network is kept.
    assert [p.name for p in (tmp_path / "resumed" / "snapshots").iterdir()] == ["network-000000.096.pt"]
    na = torch.load(tmp_path / "straight" / "network.pt", weights_only=True)
    nb = torch.load(tmp_path / "resumed" / "network.pt", weights_only=True)
    assert all(torch.equal(v, nb["ema"][k]) for k, v in na["ema"].items())


def test_ema_and_lr_follow_edm(tmp_path):
    from robustdiff.training.diffusion import EDMTraining, network_kwargs

    m = EDMTraining(network_kwargs("small", 8, 1, 10), batch_size=100, ema_halflife_kimg=0.5, ema_rampup=0.05)
    assert m.update_ema(images_before_step=0) == 0.0  # the first update copies the network
    assert all(torch.equal(p, q) for p, q in zip(m.ema.parameters(), m.net.parameters()))
    assert m.update_ema(images_before_step=4000) == pytest.approx(0.5 ** (100 / 200))  # ramp: 0.05·4000
    assert m.update_ema(images_before_step=10**6) == pytest.approx(0.5 ** (100 / 500))  # cap: 500 images
    opt = m.configure_optimizers()
    sched = opt["lr_scheduler"]["scheduler"]
    assert opt["optimizer"].param_groups[0]["lr"] == 0.0  # NVIDIA: the first step has lr 0
    opt["optimizer"].step()  # (no gradients: a no-op that keeps the scheduler's order check quiet)
    for _ in range(50):
        sched.step()
    assert opt["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-3 * 5000 / 10**7)


def test_presets_compose_and_unknown_preset_lists_choices():
    cifar = config("dataset=cifar10", "edm=cifar10", fast=False)
    assert (cifar.edm.network, cifar.edm.batch_size, cifar.edm.duration_kimg) == ("ddpmpp", 512, 200000)
    assert (cifar.edm.dropout, cifar.edm.augment_p, cifar.edm.ema_halflife_kimg) == (0.13, 0.12, 500)
    from robustdiff.training.edm_run import validate

    desc = validate(cifar)
    assert desc["max_steps"] == 390625 and desc["kwargs"]["attn_resolutions"] == [16]
    assert sum(p.numel() for p in EDMPrecond(**desc["kwargs"]).parameters()) == 55_735_299
    with pytest.raises(MissingConfigException, match=r"(?s)edm/nonexistent.*Available options.*cifar10.*small"):
        config("edm=nonexistent")


@pytest.mark.parametrize("overrides, message", [
    (["label_dim=5"], "label_dim=5 but dataset fashionmnist has 10 classes"),
    (["resolution=26"], "resolution=26: the small network.*cannot be halved 2 times"),
    (["resolution=40"], r"integer in \[1, 28\]"),
    (["edm.network=huge"], "SongUNet preset"),
    (["edm.batch_size=15", "trainer.devices=2"], "divisible"),
    (["val_size=256"], r"val_size=256 must be a whole number in \[0, 256\)"),
    (["val_size=-1"], r"val_size=-1 must be a whole number"),
])
def test_bad_configs_fail_before_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train_edm(config(*overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@needs_data
def test_resume_with_other_settings_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"dataset": "fashionmnist", "lr": 1.0}))
    with pytest.raises(ConfigError, match="different EDM run"):
        train_edm(config(), tmp_path / "run")


@needs_data
def test_val_size_leaves_out_exactly_the_classifiers_validation_images():
    from robustdiff.data.datamodule import RobustDataModule
    from robustdiff.training.edm_run import edm_datamodule, validate

    cfg = config("limit_train=96", "val_size=32", "resolution=null")
    desc = validate(cfg)
    assert desc["val_size"] == 32 and "val_size" not in validate(config("limit_train=96", "resolution=null"))
    edm = edm_datamodule(cfg, desc)
    classifier = RobustDataModule("fashionmnist", 16, data_dir="/nonexistent", limit_train=96, val_size=32)
    classifier.setup("fit")
    images, labels = load_split("fashionmnist", "train", "/nonexistent")
    np.testing.assert_array_equal(edm.train_x, classifier.train_x)
    np.testing.assert_array_equal(edm.train_x, images[32:96])
    np.testing.assert_array_equal(classifier.val[0].numpy(), images[:32])
    np.testing.assert_array_equal(edm.train_y, labels[32:96])
