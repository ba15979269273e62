"""Block-layout stores: a store of known size written shard by shard, in any order, by several processes at once."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from robustdiff.utils.io import atomic_write_json

from .format import (
    _TEMP_RE,
    FORMAT_VERSION,
    IMAGE_DTYPE,
    LABEL_DTYPE,
    MANIFEST,
    StoreError,
    _file_sha256,
    _image_file,
    _jsonable,
    _label_file,
    _read_manifest,
    shard_name,
)
from .writer import _OpenShard

# Block layout: a store whose size is known up front, written shard by shard in any order and by
# several processes at once (multi-GPU generation). Shard b holds images [b·S, min((b+1)·S, N)).
#
# The manifest says ``complete: false`` and carries a ``blocks`` entry (count, shard_size) until
# `assemble_block_store` lists every shard. Each shard is written atomically by `write_block`, so
# a shard on disk with the expected sizes is finished; an interrupted job keeps its finished shards
# and a rerun writes only the missing ones. Writers of different shards need no coordination; the
# manifest is written only by `open_block_store` (once, before the shards) and by the assembly.


def block_ranges(count: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) image ranges of the shards of a `count`-image store with `shard_size` per shard."""
    if count < 1 or shard_size < 1:
        raise StoreError(f"block layout needs count >= 1 and shard_size >= 1, got {count} and {shard_size}")
    return [(a, min(a + shard_size, count)) for a in range(0, count, shard_size)]


def _differences(key: str, a: Any, b: Any) -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, a's value, b's value) for every leaf where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _differences(f"{key}.{k}", a.get(k), b.get(k))
    elif a != b:
        yield key, a, b


def open_block_store(
    path: str | os.PathLike,
    count: int,
    image_shape: tuple[int, int, int],
    num_classes: int,
    shard_size: int,
    provenance: dict,
) -> dict:
    """Create the partial manifest of a block-layout store at `path`, or reopen one with the same
    layout and provenance (to resume it). Returns the manifest; ``manifest['complete']`` is true
    when a previous run already assembled it. A store with another layout or provenance, a store
    written by `StoreWriter`, or a non-empty directory without a manifest: `StoreError`."""
    path = Path(path)
    image_shape = tuple(int(s) for s in image_shape)
    blocks = {"count": int(count), "shard_size": int(shard_size)}
    block_ranges(count, shard_size)  # validates
    if len(image_shape) != 3 or min(image_shape) < 1 or int(num_classes) < 1:
        raise StoreError(f"generated store {path}: image_shape (H, W, C) and num_classes must be positive, "
                         f"got {image_shape} and {num_classes}")
    wanted = {
        "format_version": FORMAT_VERSION,
        "count": 0,
        "image_shape": list(image_shape),
        "num_classes": int(num_classes),
        "class_counts": [0] * int(num_classes),
        "shard_size": int(shard_size),
        "shards": [],
        "complete": False,
        "blocks": blocks,
        "provenance": _jsonable(provenance),
    }
    mpath = path / MANIFEST
    if path.exists() and not path.is_dir():
        raise StoreError(f"generated store {path}: exists and is not a directory — choose another path")
    if mpath.exists():
        old = _read_manifest(path)
        if old.get("blocks") is None:
            raise StoreError(
                f"generated store {mpath}: was written by another tool (no block layout) — "
                f"write to a new directory"
            )
        diffs = [
            f"{key}: store has {json.dumps(a, sort_keys=True)}, this run has {json.dumps(b, sort_keys=True)}"
            for name in ("image_shape", "num_classes", "shard_size", "blocks", "provenance")
            for key, a, b in _differences(name, _jsonable(old.get(name)), wanted[name])
        ]
        if diffs:
            raise StoreError(
                f"generated store {mpath}: holds a different generation, refusing to continue or overwrite it:\n  "
                + "\n  ".join(diffs) + "\nRerun with the original settings, or write to a new directory."
            )
        return old
    if path.is_dir() and any(not p.name.startswith(".") for p in path.iterdir()):
        raise StoreError(
            f"generated store {path}: directory is not empty and has no {MANIFEST} — choose an empty or new directory"
        )
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(mpath, wanted)
    return wanted


def _block_manifest(path: Path) -> dict:
    manifest = _read_manifest(path)
    if manifest.get("blocks") is None:
        raise StoreError(f"generated store {path / MANIFEST}: not a block-layout store (no 'blocks' entry)")
    return manifest


def finished_blocks(path: str | os.PathLike) -> list[int]:
    """Indices of the shards of a block-layout store that are on disk in full (both files, right sizes)."""
    path = Path(path)
    manifest = _block_manifest(path)
    image_bytes = int(np.prod(manifest["image_shape"]))
    done = []
    for b, (start, stop) in enumerate(block_ranges(manifest["blocks"]["count"], manifest["blocks"]["shard_size"])):
        name = shard_name(b)
        n = stop - start
        sizes = [(path / _image_file(name), n * image_bytes), (path / _label_file(name), n * LABEL_DTYPE.itemsize)]
        if all(f.is_file() and f.stat().st_size == size for f, size in sizes):
            done.append(b)
    return done


def write_block(path: str | os.PathLike, index: int, images: np.ndarray, labels: np.ndarray) -> None:
    """Write shard `index` of the block-layout store at `path` (atomically; an existing file of that
    shard is replaced). images: uint8 (n, H, W, C) with n the shard's size; labels: ints (n,)."""
    path = Path(path)
    manifest = _block_manifest(path)
    ranges = block_ranges(manifest["blocks"]["count"], manifest["blocks"]["shard_size"])
    if not 0 <= index < len(ranges):
        raise StoreError(f"generated store {path}: shard {index} outside [0, {len(ranges)})")
    n = ranges[index][1] - ranges[index][0]
    shape = tuple(manifest["image_shape"])
    num_classes = int(manifest["num_classes"])
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != IMAGE_DTYPE or images.shape != (n, *shape):
        raise StoreError(f"generated store {path}: shard {index} needs uint8 images of shape "
                         f"({n}, {', '.join(map(str, shape))}), got {images.dtype} {images.shape}")
    if labels.shape != (n,) or (n and not np.issubdtype(labels.dtype, np.integer)):
        raise StoreError(f"generated store {path}: shard {index} needs {n} integer labels, got "
                         f"{labels.dtype} {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise StoreError(f"generated store {path}: shard {index} labels must lie in [0, {num_classes}), got "
                         f"[{labels.min()}, {labels.max()}]")
    shard = _OpenShard(path, index)
    try:
        shard.write(images, labels)
    except BaseException:
        shard.abort()
        raise
    shard.close()


def assemble_block_store(path: str | os.PathLike) -> dict:
    """List every shard of a block-layout store in its manifest (sizes, sha256, class counts) and mark
    it complete. Missing shards: `StoreError` naming them. Returns the manifest (already complete: as is)."""
    path = Path(path)
    manifest = _block_manifest(path)
    if manifest["complete"]:
        return manifest
    ranges = block_ranges(manifest["blocks"]["count"], manifest["blocks"]["shard_size"])
    done = set(finished_blocks(path))
    missing = [b for b in range(len(ranges)) if b not in done]
    if missing:
        raise StoreError(
            f"generated store {path}: {len(missing)} of {len(ranges)} shards are not written yet "
            f"({', '.join(shard_name(b) for b in missing[:5])}{', ...' if len(missing) > 5 else ''}) — "
            f"rerun the generation to finish them"
        )
    num_classes = int(manifest["num_classes"])
    counts = np.zeros(num_classes, dtype=np.int64)
    shards = []
    for b, (start, stop) in enumerate(ranges):
        name = shard_name(b)
        labels = np.fromfile(path / _label_file(name), dtype=LABEL_DTYPE)
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise StoreError(f"generated store {path / _label_file(name)}: labels outside [0, {num_classes})")
        counts += np.bincount(labels, minlength=num_classes)
        shards.append({
            "name": name,
            "count": stop - start,
            "images": _image_file(name),
            "labels": _label_file(name),
            "images_bytes": (path / _image_file(name)).stat().st_size,
            "labels_bytes": (path / _label_file(name)).stat().st_size,
            "images_sha256": _file_sha256(path / _image_file(name)),
            "labels_sha256": _file_sha256(path / _label_file(name)),
        })
    manifest.update(count=ranges[-1][1], class_counts=counts.tolist(), shards=shards, complete=True)
    atomic_write_json(path / MANIFEST, manifest)
    for p in path.iterdir():  # temporaries of writers killed mid-shard (all writers are done now)
        if _TEMP_RE.match(p.name):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return manifest
