"""Real datasets, local-first, in torchvision's on-disk formats.

Every loader returns ``(images, labels)``: uint8 numpy arrays of shape (N, H, W, C) and int64
(N,). Images are converted to float in [0, 1] on the device, never here.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..conf.schema import choices
from ..utils.io import atomic_path

VALIDATION_SIZE = 1024
# How the validation images are chosen (docs/method.md, "TRADES"): "first" = the first n_val training images
# (the reference; a fair sample where the stored order is random), "stratified" = a seeded sample with every
# class in proportion to its size (for sets stored sorted by class, ImageFolder-style).
VAL_SPLITS = tuple(rule for rule in choices("val_split") if rule is not None)
_TAG_VAL = 0x7A1  # seeds the stratified split apart from every training stream
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    n_train: int
    n_test: int
    augmentation: str  # see data/augment.py
    crop_padding: int = 4
    val_split: str = "first"  # the default rule: "stratified" where the stored training set is sorted by class

    @property
    def n_base(self) -> int:
        """Epoch base N: the real training set's size before the validation split (docs/method.md, "Data and the mixing ratio")."""
        return self.n_train


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616),
                           50_000, 10_000, "crop_flip"),
    "cifar100": DatasetInfo("cifar100", 100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            50_000, 10_000, "crop_flip_rotate"),
    "svhn": DatasetInfo("svhn", 10, (32, 32, 3), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 73_257, 26_032, "none"),
    "tinyimagenet": DatasetInfo("tinyimagenet", 200, (64, 64, 3), (0.4802, 0.4481, 0.3975),
                                (0.2302, 0.2265, 0.2262), 100_000, 10_000, "crop_flip", val_split="stratified"),
    "fashionmnist": DatasetInfo("fashionmnist", 10, (28, 28, 1), (0.2860,), (0.3530,), 60_000, 10_000, "crop_flip",
                                 crop_padding=2),
}


class DatasetError(FileNotFoundError):
    pass


def get_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def load_split(name: str, split: str, data_dir: str | os.PathLike | None = None,
               download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Load a split ("train" or "test") of a dataset: (uint8 (N, H, W, C), int64 (N,)).

    Local files are used when present; a download is attempted only when ``download`` is true
    and nothing was found. The error for missing files lists every place searched.
    """
    info = get_info(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(data_dir if data_dir is not None else "data").expanduser()
    images, labels = _LOADERS[name](root, split, download)
    if images.shape[1:] != info.image_shape:
        raise DatasetError(f"{name} {split} under {root}: images are {images.shape[1:]} but {name} should be "
                           f"{info.image_shape}; the files are not {name}")
    if labels.min() < 0 or labels.max() >= info.num_classes:
        raise DatasetError(f"{name} {split} under {root}: labels outside [0, {info.num_classes})")
    return np.ascontiguousarray(images, dtype=np.uint8), labels.astype(np.int64)


def validation_indices(labels: np.ndarray, n_val: int = VALIDATION_SIZE, rule: str = "first",
                       seed: int = 0) -> np.ndarray:
    """Rows of the training set (int64, ascending) that form the validation split.

    labels: int (N,); n_val in [0, N]; rule "first" (rows 0 .. n_val−1) or "stratified": class c gets
    floor(n_val·N_c/N) rows, the n_val left over go one each to the classes with the largest remainders
    (ties broken at random), and each class's rows are a seeded random sample of that class. With
    n_val >= the number of classes every class (and with fewer, n_val distinct classes) is covered.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if rule not in VAL_SPLITS:
        raise ValueError(f"val_split must be one of {VAL_SPLITS}, got {rule!r}")
    if int(n_val) != n_val or not 0 <= n_val <= n:
        raise ValueError(f"val_size={n_val!r} must be an integer in [0, {n}] (the training images)")
    if rule == "first" or n_val == 0:
        return np.arange(int(n_val), dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), _TAG_VAL])))
    classes, counts = np.unique(labels, return_counts=True)
    exact = n_val * counts / n
    quota = np.floor(exact).astype(np.int64)
    left = int(n_val - quota.sum())
    # Largest remainder first; a random key breaks ties so that no class is favoured by its index.
    order = np.lexsort((rng.random(len(classes)), -(exact - quota)))
    quota[order[:left]] += 1
    rows = [rng.choice(np.flatnonzero(labels == c), size=int(q), replace=False)
            for c, q in zip(classes, quota) if q]
    return np.sort(np.concatenate(rows)).astype(np.int64)


def split_validation(images: np.ndarray, labels: np.ndarray, n_val: int = VALIDATION_SIZE, rule: str = "first",
                     seed: int = 0):
    """((train images, labels), (validation images, labels)): the validation rows are
    ``validation_indices(labels, n_val, rule, seed)``, the rest (in stored order) is trained on.
    "first" returns views (a memory-mapped set stays on disk); "stratified" copies the training rows."""
    val_rows = validation_indices(labels, n_val, rule, seed)
    if rule == "first" or n_val == 0:
        return (images[n_val:], labels[n_val:]), (images[:n_val], labels[:n_val])
    keep = np.ones(len(labels), dtype=bool)
    keep[val_rows] = False
    return (images[keep], labels[keep]), (images[val_rows], labels[val_rows])


def _missing(name: str, searched: list[Path], how: str) -> DatasetError:
    where = "\n  ".join(str(p) for p in searched)
    return DatasetError(f"{name}: no dataset files found. Looked in:\n  {where}\n{how}")


# --- Fashion-MNIST: idx files (gzipped or not), torchvision's FashionMNIST/raw layout or Debian's ---------

def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as e:
        raise DatasetError(f"{path}: unreadable ({type(e).__name__}: {e}) — the download is truncated or corrupt; "
                           "delete it and fetch it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path}: not an idx file of unsigned bytes (bad magic {data[:4]!r})")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(data) != expected:
        raise DatasetError(f"{path}: truncated or corrupt idx file ({len(data)} bytes, expected {expected}); "
                           "delete it and fetch it again")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(dims)).copy()


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_fashionmnist(root: Path, split: str, download: bool):
    prefix = "train" if split == "train" else "t10k"
    dirs = [root / "fashionmnist", root / "FashionMNIST" / "raw", root, DEBIAN_FASHION_MNIST]
    for d in dirs:
        img = _find_idx(d, f"{prefix}-images-idx3-ubyte")
        lab = _find_idx(d, f"{prefix}-labels-idx1-ubyte")
        if bool(img) != bool(lab):  # half a dataset here: never take the other half from somewhere else
            have, missing = (img, f"{prefix}-labels-idx1-ubyte[.gz]") if img else (lab, f"{prefix}-images-idx3-ubyte[.gz]")
            raise DatasetError(f"fashionmnist {split}: {have} is there but {d / missing} is missing — add it, or "
                               f"remove {have.name} so that a complete copy is used")
        if img and lab:
            images, labels = _read_idx(img), _read_idx(lab)
            if images.shape[0] != labels.shape[0]:
                raise DatasetError(f"{img} and {lab}: {images.shape[0]} images but {labels.shape[0]} labels")
            return images[..., None], labels.astype(np.int64)
    if download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=split == "train", download=True)
        return _load_fashionmnist(root, split, False)
    raise _missing("fashionmnist", dirs, "Install Debian's package (apt-get install dataset-fashion-mnist), put the "
                   "four idx .gz files in <data_dir>/fashionmnist/, or set download=true.")


# --- CIFAR-10/100: torchvision's python pickles, read through a restricted unpickler ---------------------

class _ArrayOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; only numpy arrays and builtin containers may come out of them."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a dataset file")


def _load_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _ArrayOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DatasetError(f"{path}: not a CIFAR batch file ({e}); delete it and fetch it again") from e
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _load_cifar(root: Path, split: str, download: bool, hundred: bool):
    name = "cifar100" if hundred else "cifar10"
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    if hundred:
        files = ["train"] if split == "train" else ["test"]
        key = "fine_labels"
    else:
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        key = "labels"
    if not all((folder / f).is_file() for f in files):
        if download:
            from torchvision.datasets import CIFAR10, CIFAR100

            (CIFAR100 if hundred else CIFAR10)(str(root), train=split == "train", download=True)
            return _load_cifar(root, split, False, hundred)
        raise _missing(name, [folder / f for f in files], f"Put torchvision's {folder.name} folder under data_dir "
                       "or set download=true on a machine with internet.")
    images, labels = [], []
    for f in files:
        d = _load_cifar_batch(folder / f)
        try:
            data = np.asarray(d["data"], dtype=np.uint8)
            batch_labels = np.asarray(d[key], dtype=np.int64)
            if data.ndim != 2 or data.shape[1] != 3072 or len(batch_labels) != len(data):
                raise ValueError(f"'data' is {data.shape} with {len(batch_labels)} labels, expected (N, 3072) and N")
        except (KeyError, TypeError, ValueError) as e:
            what = f"no '{e.args[0]}' entry" if isinstance(e, KeyError) else str(e)
            raise DatasetError(f"{folder / f}: not a {name} batch ({what}); delete it and fetch it again") from None
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


# --- SVHN: torchvision's .mat files ------------------------------------------------------------------

def _load_svhn(root: Path, split: str, download: bool):
    path = root / ("train_32x32.mat" if split == "train" else "test_32x32.mat")
    for candidate in (path, root / "svhn" / path.name):
        if candidate.is_file():
            import scipy.io

            mat = scipy.io.loadmat(str(candidate))
            if "X" not in mat or "y" not in mat:
                raise DatasetError(f"{candidate}: expected variables X and y in an SVHN .mat file")
            images = np.transpose(mat["X"], (3, 0, 1, 2))
            labels = mat["y"].astype(np.int64).reshape(-1) % 10  # SVHN stores digit 0 as label 10
            return images, labels
    if download:
        from torchvision.datasets import SVHN

        SVHN(str(root), split=split, download=True)
        return _load_svhn(root, split, False)
    raise _missing("svhn", [path, root / "svhn" / path.name], "Put torchvision's SVHN .mat files under data_dir "
                   "or set download=true on a machine with internet.")


# --- TinyImageNet: the tiny-imagenet-200 folder, decoded once and cached as .npy ----------------------

def _load_tinyimagenet(root: Path, split: str, download: bool):
    base = root / "tiny-imagenet-200"
    if not (base / "wnids.txt").is_file():
        raise _missing("tinyimagenet", [base / "wnids.txt"], "Unpack tiny-imagenet-200.zip under data_dir "
                       "(no automatic download exists for TinyImageNet).")
    cache_x, cache_y = base / f"robustdiff-{split}-images.npy", base / f"robustdiff-{split}-labels.npy"
    if cache_x.is_file() and cache_y.is_file():
        return np.load(cache_x, mmap_mode="r"), np.load(cache_y)
    from PIL import Image

    wnids = [w.strip() for w in (base / "wnids.txt").read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    paths: list[tuple[Path, int]] = []
    if split == "train":
        for w in wnids:
            paths += [(p, index[w]) for p in sorted((base / "train" / w / "images").glob("*.JPEG"))]
    else:
        for line in (base / "val" / "val_annotations.txt").read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                paths.append((base / "val" / "images" / parts[0], index[parts[1]]))
    images = np.empty((len(paths), 64, 64, 3), dtype=np.uint8)
    for i, (p, _) in enumerate(paths):
        with Image.open(p) as im:
            images[i] = np.asarray(im.convert("RGB").resize((64, 64)))
    labels = np.array([c for _, c in paths], dtype=np.int64)
    with atomic_path(cache_x) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, images)
    with atomic_path(cache_y) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, labels)
    return images, labels


_LOADERS = {
    "fashionmnist": _load_fashionmnist,
    "cifar10": lambda r, s, d: _load_cifar(r, s, d, hundred=False),
    "cifar100": lambda r, s, d: _load_cifar(r, s, d, hundred=True),
    "svhn": _load_svhn,
    "tinyimagenet": _load_tinyimagenet,
}
