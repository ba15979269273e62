"""Dataset loaders on real Fashion-MNIST and on small files written in the real on-disk formats."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from robustdiff.data.augment import augment_batch, random_crop, random_hflip, random_rotate, to_float_nchw
from robustdiff.data.datasets import DATASETS, DatasetError, load_split, split_validation


def test_fashion_mnist_real_files():
    x, y = load_split("fashionmnist", "train")
    assert x.shape == (60000, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [6000] * 10
    xt, yt = load_split("fashionmnist", "test")
    assert xt.shape == (10000, 28, 28, 1)
    (tx, ty), (vx, vy) = split_validation(x, y)
    assert len(vx) == 1024 and len(tx) == 60000 - 1024
    assert np.array_equal(vx, x[:1024]) and np.array_equal(tx[0], x[1024])
    assert 0.28 < x.mean() / 255 < 0.29  # Fashion-MNIST's pixel mean is 0.2860


def _write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_from_data_dir_and_truncated_file(tmp_path):
    d = tmp_path / "fashionmnist"
    d.mkdir()
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    _write_idx(d / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(d / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    x, y = load_split("fashionmnist", "test", tmp_path)
    assert np.array_equal(x[..., 0], imgs) and y.tolist() == [0, 1, 2, 3, 4]  # local files win over Debian's
    with gzip.open(d / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">3I", 5, 28, 28) + b"\0" * 100)
    with pytest.raises(DatasetError, match="truncated"):
        load_split("fashionmnist", "test", tmp_path)


def _cifar_batch(path, n, label_key, classes, rng):
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, classes, n).tolist()
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"data": data, label_key: labels}, f, protocol=2)
    return data, labels


def test_cifar10_and_cifar100_python_format(tmp_path):
    rng = np.random.default_rng(0)
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    parts = [_cifar_batch(c10 / f"data_batch_{i}", 4, b"labels", 10, rng) for i in range(1, 6)]
    _cifar_batch(c10 / "test_batch", 3, b"labels", 10, rng)
    x, y = load_split("cifar10", "train", tmp_path)
    assert x.shape == (20, 32, 32, 3)
    # CIFAR rows are planar RGB: pixel (0,0) of image 0 is (data[0], data[1024], data[2048])
    d0 = parts[0][0][0]
    assert x[0, 0, 0].tolist() == [d0[0], d0[1024], d0[2048]]
    assert y.tolist() == sum((p[1] for p in parts), [])
    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    _cifar_batch(c100 / "train", 6, b"fine_labels", 100, rng)
    _cifar_batch(c100 / "test", 2, b"fine_labels", 100, rng)
    x, y = load_split("cifar100", "test", tmp_path)
    assert x.shape == (2, 32, 32, 3) and y.max() < 100


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/robustdiff-pwned",))


def test_cifar_pickle_with_code_is_refused(tmp_path):
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    with open(c10 / "test_batch", "wb") as f:
        pickle.dump({b"data": Boom(), b"labels": [0]}, f)
    with pytest.raises(DatasetError, match="system"):
        load_split("cifar10", "test", tmp_path)
    assert not os.path.exists("/tmp/robustdiff-pwned")


def test_svhn_mat_format(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (32, 32, 3, 7), dtype=np.uint8)
    y = np.array([[10], [1], [2], [3], [4], [5], [9]], dtype=np.uint8)  # SVHN stores digit 0 as 10
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": X, "y": y})
    x, labels = load_split("svhn", "test", tmp_path)
    assert x.shape == (7, 32, 32, 3) and np.array_equal(x[3], X[..., 3])
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 9]


def test_tinyimagenet_folder_format_and_cache(tmp_path):
    from PIL import Image

    base = tmp_path / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(200)]
    (base).mkdir()
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(0)
    for w in wnids[:2]:
        d = base / "train" / w / "images"
        d.mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{w}_{j}.JPEG")
    (base / "val" / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(base / "val" / "images" / "val_0.JPEG")
    (base / "val" / "val_annotations.txt").write_text(f"val_0.JPEG\t{wnids[1]}\t0\t0\t64\t64\n")
    x, y = load_split("tinyimagenet", "train", tmp_path)
    assert x.shape == (4, 64, 64, 3) and y.tolist() == [0, 0, 1, 1]
    assert (base / "robustdiff-train-images.npy").is_file()  # decoded once, then cached
    x2, _ = load_split("tinyimagenet", "train", tmp_path)
    assert np.array_equal(x, x2)
    xv, yv = load_split("tinyimagenet", "test", tmp_path)
    assert xv.shape == (1, 64, 64, 3) and yv.tolist() == [1]


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "tinyimagenet"])
def test_missing_files_error_lists_places(tmp_path, name):
    with pytest.raises(DatasetError) as e:
        load_split(name, "train", tmp_path)
    assert str(tmp_path) in str(e.value)


def test_dataset_table_matches_spec():
    assert DATASETS["cifar10"].n_base == 50_000 and DATASETS["svhn"].n_base == 73_257
    assert DATASETS["tinyimagenet"].num_classes == 200 and DATASETS["tinyimagenet"].image_shape == (64, 64, 3)
    assert DATASETS["cifar100"].augmentation == "crop_flip_rotate" and DATASETS["svhn"].augmentation == "none"
    assert DATASETS["fashionmnist"].crop_padding == 2 and DATASETS["fashionmnist"].mean == (0.2860,)


def test_batch_augmentation_ops():
    g = torch.Generator().manual_seed(0)
    x = to_float_nchw(torch.randint(0, 256, (64, 8, 8, 3), dtype=torch.uint8))
    assert x.shape == (64, 3, 8, 8) and 0 <= x.min() and x.max() <= 1
    c = random_crop(x, 2, g)
    # every crop is a shifted window of the zero-padded image
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(8):
        assert any(torch.equal(c[i], padded[i, :, dy:dy + 8, dx:dx + 8]) for dy in range(5) for dx in range(5))
    shifts = {tuple((c[i] == x[i]).all().view(-1).tolist()) for i in range(64)}
    assert len(shifts) > 1  # not all identical offsets
    f = random_hflip(x, torch.Generator().manual_seed(1))
    flipped = [torch.equal(f[i], x[i].flip(2)) for i in range(64)]
    assert 10 < sum(flipped) < 54 and all(fl or torch.equal(f[i], x[i]) for i, fl in enumerate(flipped))
    r = random_rotate(x, 15.0, g)
    assert r.shape == x.shape
    assert torch.equal(augment_batch(x, "none"), x)
    out1 = augment_batch(x, "crop_flip_rotate", 4, torch.Generator().manual_seed(5))
    out2 = augment_batch(x, "crop_flip_rotate", 4, torch.Generator().manual_seed(5))
    assert torch.equal(out1, out2)  # a pure function of the generator's seed


def _write_class_sorted_tinyimagenet(root, wnids, per_class, val_per_class):
    """A tiny-imagenet-200 folder: train/<wnid>/images/*.JPEG (class-sorted, as ImageFolder stores it) and
    val/ with val_annotations.txt. Every image is a flat grey whose level encodes its wnid's line in wnids.txt."""
    from PIL import Image

    base = root / "tiny-imagenet-200"
    base.mkdir()
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for line, w in enumerate(wnids):
        d = base / "train" / w / "images"
        d.mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(np.full((64, 64, 3), 10 * line + 5, np.uint8)).save(d / f"{w}_{j}.JPEG")
    (base / "val" / "images").mkdir(parents=True)
    rows = []
    for j in range(val_per_class):
        for line, w in enumerate(wnids):
            name = f"val_{j}_{line}.JPEG"
            Image.fromarray(np.full((64, 64, 3), 10 * line + 5, np.uint8)).save(base / "val" / "images" / name)
            rows.append(f"{name}\t{w}\t0\t0\t64\t64")
    (base / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")


def test_tinyimagenet_class_index_is_the_wnids_line(tmp_path):
    # wnids.txt is not in sorted order here: class i must be line i (the order generated data is labelled in),
    # not the i-th folder name in sorted order (torchvision ImageFolder's rule).
    wnids = ["n09999999", "n01443537", "n05555555", "n02124075", "n07777777", "n01629819"]
    _write_class_sorted_tinyimagenet(tmp_path, wnids, per_class=2, val_per_class=2)
    for split, n in (("train", 12), ("test", 12)):
        x, y = load_split("tinyimagenet", split, tmp_path)
        assert len(y) == n
        level = np.rint((x.reshape(n, -1).mean(1) - 5) / 10).astype(int)  # the wnids.txt line each image came from
        np.testing.assert_array_equal(y, level)
    assert load_split("tinyimagenet", "train", tmp_path)[1].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_class_sorted_set_gets_a_stratified_validation_split(tmp_path):
    from robustdiff.data.datamodule import RobustDataModule
    from robustdiff.data.datasets import validation_indices

    wnids = [f"n{i:08d}" for i in range(12)]
    _write_class_sorted_tinyimagenet(tmp_path, wnids, per_class=6, val_per_class=1)
    dm = RobustDataModule("tinyimagenet", 16, data_dir=str(tmp_path), val_size=24)
    dm.setup("fit")
    val_y = dm.val[1].numpy()
    assert np.bincount(val_y, minlength=12).tolist() == [2] * 12  # every class, in proportion
    assert dm.val_split_info == {"rule": "stratified", "seed": 0, "size": 24, "classes": 12, "num_classes": 200}
    assert len(dm.train_y) == 72 - 24 and np.bincount(dm.train_y, minlength=12).tolist() == [4] * 12
    # validation and training images are disjoint, and together the whole training set
    train_x, _ = load_split("tinyimagenet", "train", tmp_path)
    rows = validation_indices(load_split("tinyimagenet", "train", tmp_path)[1], 24, "stratified", 0)
    assert torch.equal(dm.val[0], torch.from_numpy(train_x[rows]))
    # the reference's "first 24" sees 4 of the 12 classes
    first = RobustDataModule("tinyimagenet", 16, data_dir=str(tmp_path), val_size=24, val_split="first")
    first.setup("fit")
    assert first.val_split_info["classes"] == 4


def test_validation_split_rules():
    from robustdiff.data.datasets import validation_indices

    # a class-sorted 200-class set of 500 images each (TinyImageNet's training set)
    labels = np.repeat(np.arange(200), 500)
    assert len(np.unique(labels[validation_indices(labels, 1024, "first")])) == 3
    rows = validation_indices(labels, 1024, "stratified", seed=0)
    assert len(rows) == 1024 == len(np.unique(rows))
    counts = np.bincount(labels[rows], minlength=200)
    assert counts.min() == 5 and counts.max() == 6 and counts.sum() == 1024  # 1024 / 200 = 5.12 per class
    np.testing.assert_array_equal(rows, validation_indices(labels, 1024, "stratified", seed=0))  # seeded
    assert not np.array_equal(rows, validation_indices(labels, 1024, "stratified", seed=1))
    # unequal classes get their share; fewer images than classes still cover distinct classes
    uneven = np.repeat(np.arange(4), [100, 50, 30, 20])
    assert np.bincount(uneven[validation_indices(uneven, 20, "stratified")], minlength=4).tolist() == [10, 5, 3, 2]
    assert len(np.unique(labels[validation_indices(labels, 50, "stratified")])) == 50
    assert len(validation_indices(labels, 0, "stratified")) == 0
    with pytest.raises(ValueError, match="val_split"):
        validation_indices(labels, 10, "random")
    from robustdiff.data.datasets import get_info

    assert [get_info(n).val_split for n in ("cifar10", "cifar100", "svhn", "fashionmnist", "tinyimagenet")] == [
        "first", "first", "first", "first", "stratified"]
