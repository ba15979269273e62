"""The mixed real/generated DataModule: exact ratio, DDP shares, resume, checks before training."""

import json

import numpy as np
import pytest
import torch

from conftest import TINY, compose_train
from robustdiff.data.datamodule import MixedBatchLoader, RobustDataModule
from robustdiff.data.store import StoreError, StoreWriter
from robustdiff.training.run import train

N_GEN = 200


@pytest.fixture
def fmnist_store(tmp_path):
    """Generated images are recognisable: a constant image whose value encodes the index (never a real image)."""
    path = tmp_path / "gen"
    idx = np.arange(N_GEN)
    images = np.broadcast_to((idx % 200 + 30).astype(np.uint8)[:, None, None, None], (N_GEN, 28, 28, 1)).copy()
    images[:, 0, 0, 0] = 255  # marker pixel
    images[:, 0, 1, 0] = 7
    with StoreWriter(path, (28, 28, 1), 10, shard_size=64, provenance={"test": True}) as w:
        w.append(images, idx % 10)
    return path


def is_generated(batch_images: torch.Tensor) -> torch.Tensor:
    return (batch_images[:, 0, 0, 0] == 255) & (batch_images[:, 0, 1, 0] == 7) & (batch_images[:, 5, 5, 0] >= 30)


def datamodule(store, ratio=0.25, sampling="with_replacement", batch_size=32):
    dm = RobustDataModule("fashionmnist", batch_size, generated=str(store), ratio=ratio, generated_sampling=sampling,
                          seed=3, limit_train=320, val_size=64)
    dm.setup("fit")
    return dm


def loader(dm, rank=0, world=1, epoch=0, consumed=(0, 0)):
    return MixedBatchLoader(dm.plan, dm.train_x, dm.train_y, dm.store, rank, world, lambda: epoch, lambda: consumed)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.3, 1.0])
def test_exact_generated_count_in_every_batch(fmnist_store, ratio):
    dm = datamodule(fmnist_store, ratio)
    assert dm.iterations_per_epoch == 10  # ceil(320 / 32): the real set before the validation split
    n_gen = int(32 * (1 - ratio))
    batches = list(loader(dm))
    assert len(batches) == 10
    for b in batches:
        assert b["image"].dtype == torch.uint8 and b["image"].shape == (32, 28, 28, 1)
        assert int(is_generated(b["image"]).sum()) == n_gen
        assert b["label"].dtype == torch.int64


def test_generated_labels_follow_images(fmnist_store):
    dm = datamodule(fmnist_store, 0.5)
    b = next(iter(loader(dm)))
    gen = is_generated(b["image"])
    index = b["image"][gen][:, 5, 5, 0].long() - 30
    assert torch.equal(b["label"][gen], index % 10)


def test_two_ranks_share_the_global_batch(fmnist_store):
    dm = datamodule(fmnist_store, 0.3)
    single = list(loader(dm))
    r0, r1 = list(loader(dm, 0, 2)), list(loader(dm, 1, 2))
    for s, a, b in zip(single, r0, r1):
        assert a["image"].shape[0] == b["image"].shape[0] == 16
        union = torch.cat([a["image"][is_generated(a["image"]) == 0], b["image"][is_generated(b["image"]) == 0],
                           a["image"][is_generated(a["image"])], b["image"][is_generated(b["image"])]])
        assert torch.equal(union, s["image"])  # [real | generated] order of the single process
        assert torch.equal(torch.cat([a["position"], b["position"]]).sort().values, torch.arange(32))
        # same ratio on each rank (22 generated split 11 / 11)
        assert abs(int(is_generated(a["image"]).sum()) - int(is_generated(b["image"]).sum())) <= 1


def test_mid_epoch_resume_yields_the_remaining_batches(fmnist_store):
    dm = datamodule(fmnist_store, 0.3, sampling="permutation")
    full = list(loader(dm, epoch=1))
    resumed = loader(dm, epoch=1)
    resumed.load_state_dict({"epoch": 1, "consumed": 4})
    rest = list(resumed)
    assert [b["step"] for b in rest] == list(range(4, 10))
    for a, b in zip(full[4:], rest):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert loader(dm, consumed=(1, 4)).state_dict() == {"epoch": 1, "consumed": 4}
    # different epochs see different real orders
    assert not torch.equal(list(loader(dm, epoch=0))[0]["image"], full[0]["image"])


def test_store_that_does_not_fit_the_dataset_is_refused_before_training(tmp_path):
    bad = tmp_path / "cifar_store"
    with StoreWriter(bad, (32, 32, 3), 10, shard_size=8) as w:
        w.append(np.zeros((8, 32, 32, 3), np.uint8), np.zeros(8, np.int64))
    with pytest.raises(StoreError, match=r"manifest\.json.*32×32×3.*fashionmnist"):
        train(compose_train(*TINY, f"generated={bad}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    partial = tmp_path / "partial"
    w = StoreWriter(partial, (28, 28, 1), 10, shard_size=8)
    w.append(np.zeros((8, 28, 28, 1), np.uint8), np.zeros(8, np.int64))
    w.close()
    with pytest.raises(StoreError, match="incomplete|not complete|partial"):
        train(compose_train(*TINY, f"generated={partial}"), tmp_path / "run")


def test_training_on_real_plus_generated(fmnist_store, tmp_path):
    run = tmp_path / "mixed"
    summary = train(compose_train(*TINY, "epochs=1", f"generated={fmnist_store}", "ratio=0.5",
                                  "generated_sampling=permutation"), run)
    assert summary["finished"]
    desc = json.loads((run / "run.json").read_text())
    assert desc["n_generated"] == N_GEN and desc["ratio"] == 0.5 and desc["generated"] == str(fmnist_store)
    # Fashion-MNIST is stored in random order: the reference's "first val_size" split, recorded
    assert desc["val_split"] == {"rule": "first", "seed": None, "size": 64, "classes": 10, "num_classes": 10}


def test_short_batch_reaches_every_rank_with_its_positions():
    # no generated data, 330 − 64 = 266 real images, batch 32: batch 8 of each epoch is the end of a
    # permutation, 266 mod 32 = 10 images (last_batch=reference); ceil(330 / 32) = 11 batches per epoch.
    dm = RobustDataModule("fashionmnist", 32, seed=3, limit_train=330, val_size=64)
    dm.setup("fit")
    single = list(loader(dm))
    assert [b["image"].shape[0] for b in single] == [32] * 8 + [10] + [32] * 2
    assert [b["global_size"] for b in single] == [32] * 8 + [10] + [32] * 2
    r0, r1 = list(loader(dm, 0, 2)), list(loader(dm, 1, 2))
    assert len(r0) == len(r1) == 11  # the same number of steps on every rank: DDP cannot hang
    for s, a, b in zip(single, r0, r1):
        assert torch.equal(torch.cat([a["image"], b["image"]]), s["image"])
        assert torch.equal(torch.cat([a["position"], b["position"]]), torch.arange(s["global_size"]))
        assert a["global_size"] == b["global_size"] == s["global_size"]
    assert (r0[8]["image"].shape[0], r1[8]["image"].shape[0]) == (5, 5)
    fill = RobustDataModule("fashionmnist", 32, seed=3, limit_train=330, val_size=64, last_batch="fill")
    fill.setup("fit")
    assert [b["image"].shape[0] for b in loader(fill)] == [32] * 11


def test_run_with_a_short_batch_records_its_split(tmp_path):
    run = tmp_path / "short"
    summary = train(compose_train(*TINY, "epochs=1", "limit_train=330", "val_split=stratified", "val_seed=5"), run)
    assert summary["finished"]
    desc = json.loads((run / "run.json").read_text())
    assert desc["last_batch"] == "reference"
    assert desc["val_split"] == {"rule": "stratified", "seed": 5, "size": 64, "classes": 10, "num_classes": 10}
    assert desc["identity"]["val_split"] == "stratified" and desc["identity"]["last_batch"] == "reference"


@pytest.mark.slow
def test_resume_right_before_the_short_batch_is_exact(tmp_path, stop_after):
    # 266 real images, batch 32: step 8 of 11 is the short batch (10 images); stop after 8 steps, resume there
    common = (*TINY, "epochs=1", "limit_train=330")
    straight = train(compose_train(*common), tmp_path / "straight")
    stop_after(8)
    stopped = train(compose_train(*common), tmp_path / "resumed")
    assert straight["finished"] and stopped.get("interrupted")
    stop_after(None)
    assert train(compose_train(*common), tmp_path / "resumed")["finished"]
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
            for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override,message", [("last_batch=drop", "last_batch='drop': choose reference"),
                                              ("val_split=random", "val_split='random': choose first"),
                                              ("val_seed=-1", "val_seed=-1 must be an integer >= 0")])
def test_bad_split_and_last_batch_values_are_refused_before_any_work(override, message, tmp_path):
    from robustdiff.training.run import ConfigError

    with pytest.raises(ConfigError, match=message):
        train(compose_train(*TINY, override), tmp_path / "run")
    assert not (tmp_path / "run").exists()
