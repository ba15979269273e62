"""Reading a generated-data store: GeneratedStore (memory-mapped random access), verify_store and store_info."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from robustdiff.utils.progress import progress_bar

from .format import (
    _HASH_BLOCK,
    IMAGE_DTYPE,
    LABEL_DTYPE,
    MANIFEST,
    StoreError,
    _fmt_shape,
    _read_manifest,
    _shard_offsets,
)


def _random_access(array: np.memmap) -> None:
    """Training gathers random images: tell the kernel not to read ahead around each one (disk traffic on a
    cold page cache). Pages already cached may still be mapped around each access (fault-around), which
    shows as file-backed, reclaimable RSS, not as private memory."""
    mm = getattr(array, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        with contextlib.suppress(OSError):
            mm.madvise(mmap.MADV_RANDOM)


class GeneratedStore:
    """A complete store, memory-mapped. `get` gathers any indices; RAM does not grow with the store.

    Shard maps are opened lazily and at most `max_open_shards` are kept (each holds a file
    descriptor), so stores of thousands of shards work under a 1024-descriptor limit.
    Picklable (for DataLoader workers): maps are reopened in the new process.
    """

    def __init__(self, path: str | os.PathLike, max_open_shards: int | None = None):
        self.path = Path(path)
        manifest = _read_manifest(self.path)
        mpath = self.path / MANIFEST
        if not manifest["complete"]:
            raise StoreError(
                f"generated store {mpath}: is incomplete ({manifest['count']} images in finished shards) — "
                f"an import or generation was interrupted; rerun the same command to resume it"
            )
        self.manifest = manifest
        self.image_shape: tuple[int, int, int] = tuple(int(s) for s in manifest["image_shape"])
        self.num_classes: int = int(manifest["num_classes"])
        self.class_counts: list[int] = [int(c) for c in manifest["class_counts"]]
        self.provenance: dict = manifest.get("provenance", {})
        self._offsets = _shard_offsets(manifest)
        if int(self._offsets[-1]) != int(manifest["count"]):
            raise StoreError(
                f"generated store {mpath}: count is {manifest['count']} but the shards hold "
                f"{int(self._offsets[-1])} images — the manifest is damaged; re-import or regenerate"
            )
        if len(self.class_counts) != self.num_classes or sum(self.class_counts) != manifest["count"]:
            raise StoreError(
                f"generated store {mpath}: class_counts (length {len(self.class_counts)}, sum "
                f"{sum(self.class_counts)}) does not match num_classes {self.num_classes} and count "
                f"{manifest['count']} — the manifest is damaged; re-import or regenerate"
            )
        image_bytes = int(np.prod(self.image_shape))
        for s in manifest["shards"]:
            for key, per_item in (("images", image_bytes), ("labels", LABEL_DTYPE.itemsize)):
                f = self.path / s[key]
                expected = int(s["count"]) * per_item
                if s[f"{key}_bytes"] != expected:
                    raise StoreError(
                        f"generated store {mpath}: shard {s['name']} lists {s[f'{key}_bytes']} "
                        f"{key} bytes for {s['count']} items (expected {expected}) — damaged manifest"
                    )
                if not f.is_file():
                    raise StoreError(
                        f"generated store {f}: shard file is missing — restore it, or re-import "
                        f"or regenerate the store"
                    )
                size = f.stat().st_size
                if size != expected:
                    raise StoreError(
                        f"generated store {f}: shard file has {size} bytes but {mpath} says {expected} "
                        f"({'truncated' if size < expected else 'too long'}) — restore it, or re-import or "
                        f"regenerate the store; robustdiff-store verify checks every shard"
                    )
        if max_open_shards is None:
            max_open_shards = _default_max_open()
        self.max_open_shards = max(1, int(max_open_shards))
        self._maps: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = collections.OrderedDict()
        return state

    def _shard(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        maps = self._maps.get(i)
        if maps is not None:
            self._maps.move_to_end(i)
            return maps
        s = self.manifest["shards"][i]
        n = int(s["count"])
        images = np.memmap(self.path / s["images"], dtype=IMAGE_DTYPE, mode="r", shape=(n, *self.image_shape))
        labels = np.memmap(self.path / s["labels"], dtype=LABEL_DTYPE, mode="r", shape=(n,))
        _random_access(images)
        self._maps[i] = (images, labels)
        while len(self._maps) > self.max_open_shards:
            self._maps.popitem(last=False)
        return images, labels

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """indices: integers (n,) in [0, len), any order, duplicates allowed.
        Returns (images uint8 (n, H, W, C), labels int64 (n,)) in the order of `indices`."""
        idx = np.asarray(indices)
        if idx.ndim != 1:
            idx = idx.reshape(-1)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"generated store {self.path}: indices must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        n = len(idx)
        images = np.empty((n, *self.image_shape), dtype=IMAGE_DTYPE)
        labels = np.empty((n,), dtype=np.int64)
        if n == 0:
            return images, labels
        total = len(self)
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= total:
            raise IndexError(
                f"generated store {self.path}: index {lo if lo < 0 else hi} out of range [0, {total})"
            )
        # Sorting groups indices by shard (shards are contiguous ranges) and reads each map in order.
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        bounds = np.searchsorted(sorted_idx, self._offsets, side="left")
        for shard in np.nonzero(np.diff(bounds))[0]:
            a, b = int(bounds[shard]), int(bounds[shard + 1])
            img_map, lab_map = self._shard(int(shard))
            local = sorted_idx[a:b] - self._offsets[shard]
            dest = order[a:b]
            images[dest] = img_map[local]
            labels[dest] = lab_map[local]
        return images, labels

    def labels(self) -> np.ndarray:
        """All labels, int64 (len,), in store order (8 bytes per image in RAM: 400 MB at 50M)."""
        out = np.empty(len(self), dtype=np.int64)
        for i, s in enumerate(self.manifest["shards"]):
            a, b = int(self._offsets[i]), int(self._offsets[i + 1])
            out[a:b] = np.fromfile(self.path / s["labels"], dtype=LABEL_DTYPE, count=b - a)
        return out

    def check_compatible(self, image_shape: Sequence[int], num_classes: int, dataset_name: str) -> None:
        """Raise StoreError unless the store's images and labels fit dataset `dataset_name`."""
        mpath = self.path / MANIFEST
        if tuple(int(s) for s in image_shape) != self.image_shape:
            raise StoreError(
                f"generated store {mpath}: images are {_fmt_shape(self.image_shape)} but dataset "
                f"{dataset_name} is {_fmt_shape(image_shape)} — generate or import a store for {dataset_name}"
            )
        if self.num_classes != int(num_classes):
            raise StoreError(
                f"generated store {mpath}: has {self.num_classes} classes but dataset {dataset_name} has "
                f"{num_classes} — generate or import a store for {dataset_name}"
            )
        beyond = [c for c, k in enumerate(self.class_counts) if k and c >= int(num_classes)]
        if beyond or any(k < 0 for k in self.class_counts):
            raise StoreError(
                f"generated store {mpath}: class_counts has labels outside [0, {num_classes}) "
                f"(classes {beyond[:5]}) — the store does not belong to dataset {dataset_name}"
            )
        self.check_labels(int(num_classes))

    def check_labels(self, num_classes: int) -> None:
        """Every shard's labels in [0, num_classes): read once at open (8 bytes an image; 50M labels are 400 MB
        read in seconds), so a damaged label byte fails here, naming the shard, not as an index error mid-run."""
        for s in self.manifest["shards"]:
            count = int(s["count"])
            if count == 0:
                continue
            labels = np.memmap(self.path / s["labels"], dtype=LABEL_DTYPE, mode="r", shape=(count,))
            lo, hi = int(labels.min()), int(labels.max())
            del labels
            if lo < 0 or hi >= num_classes:
                bad = lo if lo < 0 else hi
                raise StoreError(
                    f"generated store {self.path / s['labels']}: label {bad} is outside [0, {num_classes}) — the "
                    f"shard is damaged (robustdiff-store verify {self.path} checks its checksum); restore it, or "
                    f"re-import or regenerate the store"
                )

    def __repr__(self) -> str:
        return (
            f"GeneratedStore({str(self.path)!r}, {len(self)} images {_fmt_shape(self.image_shape)}, "
            f"{self.num_classes} classes, {len(self.manifest['shards'])} shards)"
        )


def _default_max_open() -> int:
    # Two descriptors per open shard; leave most of the process's limit to everything else.
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return 1024
        return max(8, min(1024, soft // 8))
    except (ImportError, OSError, ValueError):  # pragma: no cover
        return 64


def verify_store(path: str | os.PathLike, progress: bool = False) -> list[str]:
    """Full pass over every shard: sizes, sha256 checksums, label range and per-class counts.
    Returns a list of problems (empty when the store is sound), each naming the file."""
    path = Path(path)
    try:
        manifest = _read_manifest(path)
    except StoreError as e:
        return [str(e)]
    mpath = path / MANIFEST
    problems: list[str] = []
    if not manifest["complete"]:
        problems.append(
            f"{mpath}: store is incomplete (complete: false) — rerun the import or generation to resume it"
        )
    shape = tuple(manifest["image_shape"])
    num_classes = int(manifest["num_classes"])
    image_bytes = int(np.prod(shape))
    counts = np.zeros(num_classes, dtype=np.int64)
    total_bytes = sum(int(s["images_bytes"]) + int(s["labels_bytes"]) for s in manifest["shards"])
    with progress_bar(total_bytes, "verify", progress, unit="B") as bar:
        for s in manifest["shards"]:
            for key, per_item in (("images", image_bytes), ("labels", LABEL_DTYPE.itemsize)):
                f = path / s[key]
                expected = int(s["count"]) * per_item
                if not f.is_file():
                    problems.append(f"{f}: shard file is missing")
                    continue
                size = f.stat().st_size
                if size != expected or size != int(s[f"{key}_bytes"]):
                    problems.append(f"{f}: has {size} bytes, manifest expects {expected}")
                    continue
                h = hashlib.sha256()
                with open(f, "rb") as fh:
                    while block := fh.read(_HASH_BLOCK):
                        h.update(block)
                        bar.update(len(block))
                        if key == "labels":
                            lab = np.frombuffer(block, dtype=LABEL_DTYPE)
                            if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
                                problems.append(f"{f}: labels outside [0, {num_classes})")
                                lab = lab[(lab >= 0) & (lab < num_classes)]
                            counts += np.bincount(lab, minlength=num_classes)
                if h.hexdigest() != s[f"{key}_sha256"]:
                    problems.append(
                        f"{f}: sha256 mismatch (file is corrupted) — restore it, or re-import/regenerate"
                    )
    if sum(int(s["count"]) for s in manifest["shards"]) != int(manifest["count"]):
        problems.append(f"{mpath}: count {manifest['count']} differs from the sum of the shard counts")
    if not problems and counts.tolist() != [int(c) for c in manifest["class_counts"]]:
        problems.append(f"{mpath}: class_counts do not match the labels in the shards")
    return problems


def store_info(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a store, complete or partial (no shard checks)."""
    return _read_manifest(Path(path))
