"""The generated-data store: fixed-size shards of raw uint8 images and int64 labels, plus a manifest.

Layout of a store directory::

    manifest.json                 format_version, count, image_shape [H, W, C], num_classes,
                                  class_counts, shard_size, shards [...], complete, provenance
    shard-00000.images.u8         raw uint8, (count, H, W, C), C order
    shard-00000.labels.i64        raw little-endian int64, (count,)
    shard-00001.images.u8 ...

Every shard but the last holds exactly `shard_size` images. A shard is listed in the manifest only
after both of its files are fully written, fsynced and renamed into place, so a crash leaves at
most hidden temporary files (``.shard-*.tmp``), which the next writer removes. A store whose
manifest says ``complete: false`` is a partial store: `StoreWriter` continues it, `GeneratedStore`
refuses to open it.

Reading memory-maps the shards: RAM use does not grow with the store's size. The reference code
instead loads one `.npz` whole into RAM; `import_npz` / `export_npz` convert between the two,
streaming, chunk by chunk.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import mmap
import os
import re
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from robustdiff.utils.io import atomic_path, atomic_write_json

try:  # advisory lock so two writers never interleave in one store (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".writer.lock"
IMAGE_DTYPE = np.dtype(np.uint8)
LABEL_DTYPE = np.dtype("<i8")
DEFAULT_SHARD_SIZE = 100_000
# Images per read when streaming an .npz member; 8192 CIFAR images are 25 MB.
NPZ_CHUNK = 8192
_HASH_BLOCK = 1 << 22

_TEMP_RE = re.compile(r"^\.(shard-\d+\.(images\.u8|labels\.i64)|manifest\.json)\..*\.tmp$")


class StoreError(ValueError):
    """A store or an .npz file is missing, incomplete, corrupted or does not fit; the message says
    which file, which field, and what to do."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _image_file(name: str) -> str:
    return f"{name}.images.u8"


def _label_file(name: str) -> str:
    return f"{name}.labels.i64"


def _fmt_shape(shape: Sequence[int]) -> str:
    return "×".join(str(int(s)) for s in shape)


def _read_manifest(path: Path) -> dict:
    """Read and sanity-check `path`/manifest.json (not the shards)."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise StoreError(
            f"generated store {mpath}: no manifest — {path} is not a generated store "
            f"(create one with robustdiff-store import or the generator)"
        )
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(
            f"generated store {mpath}: unreadable manifest ({e}) — restore or regenerate it"
        ) from e
    if not isinstance(manifest, dict):
        raise StoreError(
            f"generated store {mpath}: the manifest holds a JSON {type(manifest).__name__}, not an object "
            f"of fields — the manifest is damaged; restore or regenerate it"
        )
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"generated store {mpath}: format_version is {version!r} but this robustdiff reads "
            f"version {FORMAT_VERSION} — use the robustdiff version that wrote it, or re-import/export it"
        )
    required = ("count", "image_shape", "num_classes", "class_counts", "shard_size", "shards", "complete")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise StoreError(
            f"generated store {mpath}: missing field(s) {', '.join(missing)} — the manifest is damaged"
        )
    _check_field_types(manifest, mpath)
    return manifest


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_field_types(manifest: dict, mpath: Path) -> None:
    """Every field the readers index into has the type they expect, so damage is named, not a traceback."""
    def bad(field: str, want: str) -> StoreError:
        return StoreError(f"generated store {mpath}: field {field} is {manifest[field]!r}, expected {want} "
                          f"— the manifest is damaged; restore or regenerate it")

    for field in ("count", "num_classes", "shard_size"):
        if not _is_count(manifest[field]):
            raise bad(field, "a whole number >= 0")
    if not isinstance(manifest["complete"], bool):
        raise bad("complete", "true or false")
    shape = manifest["image_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(_is_count(v) and v > 0 for v in shape)):
        raise bad("image_shape", "[H, W, C] (three whole numbers > 0)")
    counts = manifest["class_counts"]
    if not (isinstance(counts, list) and all(_is_count(v) for v in counts)):
        raise bad("class_counts", "a list of whole numbers >= 0")
    shards = manifest["shards"]
    if not isinstance(shards, list):
        raise bad("shards", "a list of shard entries")
    for i, entry in enumerate(shards):
        where = f"generated store {mpath}: shards[{i}]"
        if not isinstance(entry, dict):
            raise StoreError(f"{where} is {entry!r}, expected an object — the manifest is damaged")
        for key in ("count", "images_bytes", "labels_bytes"):
            if not _is_count(entry.get(key)):
                raise StoreError(f"{where}.{key} is {entry.get(key)!r}, expected a whole number >= 0 "
                                 f"— the manifest is damaged")
        for key in ("name", "images", "labels"):
            value = entry.get(key)
            # a bare file name inside the store: a manifest must not point the reader at other files
            if not (isinstance(value, str) and value and Path(value).name == value and value not in (".", "..")):
                raise StoreError(f"{where}.{key} is {value!r}, expected the bare name of a file in the store "
                                 f"— the manifest is damaged")


def _shard_offsets(manifest: dict) -> np.ndarray:
    counts = [int(s["count"]) for s in manifest["shards"]]
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Writing


class _OpenShard:
    """One shard being written: both files stream into temporaries that are renamed on close."""

    def __init__(self, directory: Path, index: int):
        self.name = shard_name(index)
        self.count = 0
        self.class_counts: np.ndarray | None = None
        self._stack = contextlib.ExitStack()
        self._img_tmp = self._stack.enter_context(atomic_path(directory / _image_file(self.name)))
        self._lab_tmp = self._stack.enter_context(atomic_path(directory / _label_file(self.name)))
        self._img_f = self._stack.enter_context(open(self._img_tmp, "wb"))  # noqa: SIM115 - spans append calls
        self._lab_f = self._stack.enter_context(open(self._lab_tmp, "wb"))  # noqa: SIM115
        self._img_hash = hashlib.sha256()
        self._lab_hash = hashlib.sha256()
        self._img_bytes = 0
        self._lab_bytes = 0

    def write(self, images: np.ndarray, labels: np.ndarray) -> None:
        ib = memoryview(np.ascontiguousarray(images)).cast("B")
        lb = memoryview(np.ascontiguousarray(labels, dtype=LABEL_DTYPE)).cast("B")
        self._img_f.write(ib)
        self._lab_f.write(lb)
        self._img_hash.update(ib)
        self._lab_hash.update(lb)
        self._img_bytes += ib.nbytes
        self._lab_bytes += lb.nbytes
        self.count += len(labels)

    def close(self) -> dict:
        """Close both files; atomic_path fsyncs and renames them into place. Return the manifest entry."""
        self._stack.close()
        return {
            "name": self.name,
            "count": self.count,
            "images": _image_file(self.name),
            "labels": _label_file(self.name),
            "images_bytes": self._img_bytes,
            "labels_bytes": self._lab_bytes,
            "images_sha256": self._img_hash.hexdigest(),
            "labels_sha256": self._lab_hash.hexdigest(),
        }

    def abort(self) -> None:
        """Drop the partial shard (its temporaries are removed)."""
        with contextlib.suppress(BaseException):
            self._stack.__exit__(StoreError, StoreError("aborted"), None)


class StoreWriter:
    """Append labelled images to a store at `path`, shard by shard.

    - `path` missing or empty: a new store is created (manifest with ``complete: false`` at once).
    - `path` holds a partial store with the same `image_shape` and `num_classes`: it is continued;
      its finished shards are kept, stray temporaries from a crashed writer removed, `count` starts
      at the number of images in finished shards, and the stored `shard_size` is kept. `provenance`
      is merged into the stored one (new keys win).
    - `path` holds a complete store, something else, or a store of another shape: `StoreError`.
      Nothing the user wrote is ever deleted or overwritten.

    `append` streams straight into the current shard's temporary file (no shard-sized buffer);
    `finalize` closes the last, possibly short, shard and marks the store complete.
    Use as a context manager: on an exception the current partial shard is discarded and the
    store stays partial (resumable), on success `finalize` is called if it was not already.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_shape: tuple[int, int, int],
        num_classes: int,
        shard_size: int = DEFAULT_SHARD_SIZE,
        provenance: dict | None = None,
    ):
        self.path = Path(path)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_classes = int(num_classes)
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise StoreError(
                f"generated store {self.path}: image_shape must be (H, W, C) > 0, got {image_shape}"
            )
        if self.num_classes < 1:
            raise StoreError(f"generated store {self.path}: num_classes must be >= 1, got {num_classes}")
        if int(shard_size) < 1:
            raise StoreError(f"generated store {self.path}: shard_size must be >= 1, got {shard_size}")
        self._lock_file = None
        self._open: _OpenShard | None = None
        self._closed = False

        mpath = self.path / MANIFEST
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(
                f"generated store {self.path}: exists and is not a directory — choose another path"
            )
        try:
            if mpath.exists():
                self._acquire_lock()
                old = _read_manifest(self.path)
                if old.get("blocks") is not None and not old["complete"]:
                    raise StoreError(
                        f"generated store {mpath}: is a block-layout store (written shard by shard by "
                        f"robustdiff-generate) — rerun that generation to finish it, or write to a new directory"
                    )
                if old["complete"]:
                    raise StoreError(
                        f"generated store {mpath}: is already complete ({old['count']} images) — refusing to "
                        f"overwrite it; write to a new directory, or delete it yourself if it is unwanted"
                    )
                if (
                    tuple(old["image_shape"]) != self.image_shape
                    or int(old["num_classes"]) != self.num_classes
                ):
                    raise StoreError(
                        f"generated store {mpath}: the partial store holds {_fmt_shape(old['image_shape'])} images "
                        f"of {old['num_classes']} classes but this writer writes {_fmt_shape(self.image_shape)} "
                        f"images of {self.num_classes} classes — write to a new directory"
                    )
                self.manifest = old
                self.manifest["provenance"] = {**old.get("provenance", {}), **(provenance or {})}
                self._check_finished_shards()
                self._remove_own_temporaries()
            else:
                if self.path.is_dir() and any(not p.name.startswith(".") for p in self.path.iterdir()):
                    raise StoreError(
                        f"generated store {self.path}: directory is not empty and has no {MANIFEST} — "
                        f"choose an empty or new directory"
                    )
                self.path.mkdir(parents=True, exist_ok=True)
                self._acquire_lock()
                self._remove_own_temporaries()
                self.manifest = {
                    "format_version": FORMAT_VERSION,
                    "count": 0,
                    "image_shape": list(self.image_shape),
                    "num_classes": self.num_classes,
                    "class_counts": [0] * self.num_classes,
                    "shard_size": int(shard_size),
                    "shards": [],
                    "complete": False,
                    "provenance": dict(provenance or {}),
                }
                self._write_manifest()
        except BaseException:
            self._release_lock()
            raise
        self.shard_size = int(self.manifest["shard_size"])
        self._class_counts = np.asarray(self.manifest["class_counts"], dtype=np.int64)

    # -- bookkeeping -------------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        if fcntl is None:
            return
        self._lock_file = open(self.path / LOCK, "a+b")  # noqa: SIM115 - held until finalize/close
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            self._lock_file = None
            raise StoreError(
                f"generated store {self.path}: another process is writing it ({self.path / LOCK} is locked) "
                f"— wait for it to finish or stop it"
            ) from None

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                (self.path / LOCK).unlink()
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def _remove_own_temporaries(self) -> None:
        # Only names this module creates; anything else in the directory is the user's.
        for p in self.path.iterdir():
            if _TEMP_RE.match(p.name):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def _check_finished_shards(self) -> None:
        for s in self.manifest["shards"]:
            for key in ("images", "labels"):
                f = self.path / s[key]
                size = f.stat().st_size if f.is_file() else None
                if size != s[f"{key}_bytes"]:
                    raise StoreError(
                        f"generated store {f}: listed in {self.path / MANIFEST} with {s[f'{key}_bytes']} bytes "
                        f"but {'missing' if size is None else f'has {size}'} — restore the file or start "
                        f"the store again in a new directory"
                    )

    def _write_manifest(self) -> None:
        atomic_write_json(self.path / MANIFEST, self.manifest)

    @property
    def count(self) -> int:
        """Images written so far: finished shards plus the shard being written."""
        return int(self.manifest["count"]) + (self._open.count if self._open else 0)

    @property
    def finished_count(self) -> int:
        """Images in finished shards (what survives a crash; what a resumed writer starts from)."""
        return int(self.manifest["count"])

    # -- writing -----------------------------------------------------------------------------

    def append(self, images: np.ndarray, labels: np.ndarray) -> None:
        """images: uint8 (n, H, W, C); labels: integers (n,) in [0, num_classes)."""
        if self._closed:
            raise StoreError(f"generated store {self.path}: writer already finalized or closed")
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != IMAGE_DTYPE:
            raise StoreError(
                f"generated store {self.path}: images must be uint8 (n, H, W, C), got dtype {images.dtype} "
                f"— convert with clip(x·255 + 0.5, 0, 255).astype(uint8) (x in [0, 1])"
            )
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise StoreError(
                f"generated store {self.path}: images must be (n, {', '.join(map(str, self.image_shape))}) "
                f"(N×H×W×C), got {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise StoreError(
                f"generated store {self.path}: labels must have shape ({images.shape[0]},) to match the images, "
                f"got {labels.shape}"
            )
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise StoreError(
                f"generated store {self.path}: labels must be integers, got dtype {labels.dtype}"
            )
        labels = labels.astype(LABEL_DTYPE, copy=False)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise StoreError(
                f"generated store {self.path}: labels must lie in [0, {self.num_classes}), got "
                f"[{labels.min()}, {labels.max()}] — check num_classes"
            )
        start = 0
        n = len(labels)
        while start < n:
            if self._open is None:
                self._open = _OpenShard(self.path, len(self.manifest["shards"]))
            take = min(n - start, self.shard_size - self._open.count)
            self._open.write(images[start : start + take], labels[start : start + take])
            self._class_counts += np.bincount(labels[start : start + take], minlength=self.num_classes)
            start += take
            if self._open.count == self.shard_size:
                self._finish_shard()

    def _finish_shard(self) -> None:
        entry = self._open.close()
        self._open = None
        self.manifest["shards"].append(entry)
        self.manifest["count"] = int(self.manifest["count"]) + entry["count"]
        self.manifest["class_counts"] = self._class_counts.tolist()
        self._write_manifest()

    def finalize(self) -> dict:
        """Close the last shard, write the manifest with ``complete: true``; return the manifest."""
        if self._closed:
            raise StoreError(f"generated store {self.path}: writer already finalized or closed")
        if self._open is not None and self._open.count > 0:
            self._finish_shard()
        elif self._open is not None:
            self._open.abort()
            self._open = None
        self.manifest["complete"] = True
        self._write_manifest()
        self._closed = True
        self._release_lock()
        return self.manifest

    def close(self) -> None:
        """Stop writing without finalizing: the current partial shard is dropped, the store stays
        partial and can be continued by a new writer."""
        if self._open is not None:
            self._open.abort()
            self._open = None
        self._closed = True
        self._release_lock()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.finalize()
        else:
            self.close()


# ---------------------------------------------------------------------------------------------
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


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


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


def _file_sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


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


# ---------------------------------------------------------------------------------------------
# Reading


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


def _progress(total: int, desc: str, enabled: bool, unit: str = "img"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled, dynamic_ncols=True)


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
    with _progress(total_bytes, "verify", progress, unit="B") as bar:
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


# ---------------------------------------------------------------------------------------------
# .npz import / export (the reference layout: 'image' uint8 N×H×W×C, 'label' int N)


class NpyMember:
    """An array stored inside an .npz, read as a stream: header first, then rows on demand.

    Works for np.savez (stored) and np.savez_compressed (deflated) archives; never holds more than
    one chunk in memory. Use as a context manager.
    """

    def __init__(self, npz_path: str | os.PathLike, key: str):
        self.npz_path = Path(npz_path)
        self.key = key
        try:
            self._zip = zipfile.ZipFile(self.npz_path)
        except (OSError, zipfile.BadZipFile) as e:
            raise StoreError(f"{self.npz_path}: cannot open as .npz ({e}) — is the download complete?") from e
        member = key if key.endswith(".npy") else f"{key}.npy"
        if member not in self._zip.namelist():
            names = [n.removesuffix(".npy") for n in self._zip.namelist()]
            self._zip.close()
            raise StoreError(
                f"{self.npz_path}: has no array '{key}' (it holds {names}) — the reference layout "
                f"is 'image' uint8 N×H×W×C and 'label' int N"
            )
        self._f: BinaryIO = self._zip.open(member)
        try:
            version = np.lib.format.read_magic(self._f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(self._f)
        except ValueError as e:
            self.close()
            raise StoreError(f"{self.npz_path}: member '{member}' is not a valid .npy array ({e})") from e
        if fortran and len(shape) > 1:
            self.close()
            raise StoreError(
                f"{self.npz_path}: array '{key}' is Fortran-ordered; save it C-ordered "
                f"(np.ascontiguousarray) and import again"
            )
        if dtype.hasobject:
            self.close()
            raise StoreError(
                f"{self.npz_path}: array '{key}' holds Python objects; refusing to unpickle them"
            )
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype: np.dtype = dtype
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * dtype.itemsize
        self.position = 0

    def __len__(self) -> int:
        return self.shape[0]

    def skip(self, n: int) -> None:
        """Advance `n` rows without keeping them."""
        remaining = n * self.row_bytes
        while remaining > 0:  # ZipExtFile.seek reads forward anyway; bounded blocks keep memory flat
            block = self._f.read(min(remaining, _HASH_BLOCK * 8))
            if not block:
                raise StoreError(f"{self.npz_path}: array '{self.key}' ends early — the file is truncated")
            remaining -= len(block)
        self.position += n

    def read(self, n: int) -> np.ndarray:
        """The next min(n, remaining) rows, as an array (n, *shape[1:])."""
        n = min(n, len(self) - self.position)
        if n <= 0:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        buf = bytearray(n * self.row_bytes)
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            k = self._f.readinto(view[got:])
            if not k:
                raise StoreError(f"{self.npz_path}: array '{self.key}' ends early — the file is truncated")
            got += k
        self.position += n
        return np.frombuffer(buf, dtype=self.dtype).reshape(n, *self.shape[1:])

    def chunks(self, chunk: int) -> Iterator[np.ndarray]:
        while self.position < len(self):
            yield self.read(chunk)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._f.close()
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_npz_array(npz_path: str | os.PathLike, key: str, chunk: int = NPZ_CHUNK) -> Iterator[np.ndarray]:
    """Yield array `key` of an .npz in chunks of at most `chunk` rows (never the whole array)."""
    with NpyMember(npz_path, key) as member:
        yield from member.chunks(chunk)


def _npz_part_info(path: Path) -> dict:
    with NpyMember(path, "image") as im, NpyMember(path, "label") as lab:
        if im.dtype != IMAGE_DTYPE or len(im.shape) != 4:
            raise StoreError(f"{path}: 'image' must be uint8 N×H×W×C, got {im.dtype} {im.shape}")
        if im.shape[3] not in (1, 3):
            hint = (f"it looks channels-first (N×C×H×W with C = {im.shape[1]}): convert it with "
                    "images.transpose(0, 2, 3, 1)" if im.shape[1] in (1, 3) else "images have 1 or 3 channels")
            raise StoreError(f"{path}: 'image' has shape {im.shape}, read as N×H×W×C that is {im.shape[3]} channels "
                             f"— a store wants N×H×W×C uint8 images; {hint}")
        if not np.issubdtype(lab.dtype, np.integer) or len(lab.shape) != 1:
            raise StoreError(f"{path}: 'label' must be integers of shape (N,), got {lab.dtype} {lab.shape}")
        if lab.shape[0] != im.shape[0]:
            raise StoreError(f"{path}: 'image' has {im.shape[0]} rows but 'label' has {lab.shape[0]}")
        return {
            "path": str(path.resolve()),
            "bytes": path.stat().st_size,
            "count": im.shape[0],
            "image_shape": list(im.shape[1:]),
        }


def _label_range(path: Path, chunk: int) -> tuple[int, int]:
    """(smallest, largest) label of an .npz part, one pass over its label array; (0, -1) when it has none."""
    low, top = None, -1
    for lab in iter_npz_array(path, "label", chunk * 64):
        if lab.size:
            top = max(top, int(lab.max()))
            low = int(lab.min()) if low is None else min(low, int(lab.min()))
    return (0 if low is None else low), top


def import_npz(
    npz_paths: Sequence[str | os.PathLike] | str | os.PathLike,
    out_path: str | os.PathLike,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool = True,
    num_classes: int | None = None,
    chunk: int = NPZ_CHUNK,
    provenance: dict | None = None,
) -> dict:
    """Import reference-layout .npz files (several parts, in order) into one store at `out_path`.

    Reads chunk by chunk (`chunk` images at a time), never a whole array. `num_classes` defaults
    to max(label) + 1 over all parts (one pass over the small label arrays). If `out_path` holds a
    partial import of the same files, it is resumed: the images already in finished shards are
    skipped. Returns the manifest.
    """
    if isinstance(npz_paths, (str, os.PathLike)):
        npz_paths = [npz_paths]
    paths = [Path(p) for p in npz_paths]
    if not paths:
        raise StoreError("import_npz: no .npz files given")
    for p in paths:
        if not p.is_file():
            raise StoreError(f"{p}: no such .npz file — check the path")
    parts = [_npz_part_info(p) for p in paths]
    shape = tuple(parts[0]["image_shape"])
    for part in parts[1:]:
        if tuple(part["image_shape"]) != shape:
            raise StoreError(
                f"{part['path']}: images are {_fmt_shape(part['image_shape'])} but "
                f"{parts[0]['path']} has {_fmt_shape(shape)} — parts of one store must match"
            )
    total = sum(part["count"] for part in parts)
    if total == 0:
        raise StoreError(f"{', '.join(str(p) for p in paths)}: no images to import (0 rows) — a store needs at "
                         "least one image; check that this is the file you meant")
    # Every check that can refuse the import runs before anything is written, so a refused import leaves no
    # partial store behind and the corrected command starts afresh.
    ranges = {p: _label_range(p, chunk) for p in paths}
    for p, (low, _) in ranges.items():
        if low < 0:
            raise StoreError(f"{p}: 'label' holds negative values (smallest {low}) — labels must be class "
                             "indices 0..num_classes-1")
    top = max(t for _, t in ranges.values())
    if num_classes is None:
        num_classes = top + 1
    elif top >= num_classes:
        where = next(p for p, (_, t) in ranges.items() if t == top)
        raise StoreError(f"{where}: 'label' holds class {top} but num_classes is {num_classes} — pass "
                         f"--num-classes {top + 1} (or more), or import files whose labels are below {num_classes}")
    sources = [{k: part[k] for k in ("path", "bytes", "count")} for part in parts]
    prov = {"source": "import_npz", "npz_files": sources, **(provenance or {})}

    out_path = Path(out_path)
    if (out_path / MANIFEST).exists():
        old = _read_manifest(out_path)
        old_sources = old.get("provenance", {}).get("npz_files")
        if not old["complete"] and old_sources is not None and old_sources != sources:
            raise StoreError(
                f"generated store {out_path / MANIFEST}: is a partial import of other files "
                f"({[s['path'] for s in old_sources]}) — rerun with those files, or import into a new directory"
            )
    writer = StoreWriter(out_path, shape, num_classes, shard_size=shard_size, provenance=prov)
    done = writer.count
    try:
        with _progress(total, f"import → {out_path.name}", progress) as bar:
            bar.update(done)
            skip = done
            for path, part in zip(paths, parts):
                if skip >= part["count"]:
                    skip -= part["count"]
                    continue
                with NpyMember(path, "image") as images, NpyMember(path, "label") as labels:
                    images.skip(skip)
                    labels.skip(skip)
                    skip = 0
                    while images.position < len(images):
                        x = images.read(chunk)
                        y = labels.read(chunk)
                        writer.append(x, y)
                        bar.update(len(y))
        manifest = writer.finalize()
    except BaseException:
        writer.close()
        raise
    return manifest


def _write_npy_stream(
    zf: zipfile.ZipFile, key: str, shape: tuple, dtype: np.dtype, blocks: Iterator[np.ndarray]
):
    with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        for block in blocks:
            f.write(memoryview(np.ascontiguousarray(block, dtype=dtype)).cast("B"))


def check_new_file(out: str | os.PathLike, overwrite: bool = False, what: str = "output") -> Path:
    """Refuse to replace an existing file unless ``overwrite``; never create missing parent directories."""
    out = Path(out)
    if out.is_dir():
        raise StoreError(f"{what} {out} is a directory; give a file path")
    if out.exists() and not overwrite:
        raise StoreError(f"{what} {out} exists; pass --overwrite to replace it, or choose another path "
                         f"(nothing was written)")
    if not out.parent.is_dir():
        raise StoreError(f"{what} {out}: directory {out.parent} does not exist; create it first (robustdiff does "
                         f"not create it for you, so a typo cannot scatter files)")
    return out


def export_npz(store_path: str | os.PathLike, out_npz: str | os.PathLike, progress: bool = True,
               overwrite: bool = False) -> None:
    """Write the store as an uncompressed reference-layout .npz ('image' uint8 N×H×W×C, 'label'
    int64 N), streaming shard by shard; the file appears only when complete. An existing file is
    refused unless ``overwrite`` (never the store's own source files)."""
    check_new_file(out_npz, overwrite, "export")
    store = GeneratedStore(store_path)
    sources = [Path(str(f.get("path"))).resolve() for f in store.provenance.get("npz_files") or []
               if isinstance(f, dict) and f.get("path")]
    if Path(out_npz).resolve() in sources or Path(out_npz).resolve().parent == Path(store_path).resolve():
        raise StoreError(f"export {out_npz}: is a source file of {store_path} or inside the store; choose another path")
    n = len(store)
    shards = store.manifest["shards"]

    def image_blocks(bar):
        for i in range(len(shards)):
            images, _ = store._shard(i)
            for a in range(0, len(images), NPZ_CHUNK):
                block = np.asarray(images[a : a + NPZ_CHUNK])
                bar.update(len(block))
                yield block

    def label_blocks():
        for i in range(len(shards)):
            yield np.asarray(store._shard(i)[1])

    with (
        atomic_path(out_npz) as tmp,
        _progress(n, f"export → {Path(out_npz).name}", progress) as bar,
        zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf,
    ):
        _write_npy_stream(zf, "image", (n, *store.image_shape), IMAGE_DTYPE, image_blocks(bar))
        _write_npy_stream(zf, "label", (n,), LABEL_DTYPE, label_blocks())


def store_info(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a store, complete or partial (no shard checks)."""
    return _read_manifest(Path(path))


QUALITY_KEYS = ("metric", "reference", "classifier_sha256", "weights_sha256", "n")


def record_quality(path: str | os.PathLike, result: dict[str, Any]) -> dict:
    """Add a generator-quality measurement (``robustdiff.evaluation.generative``) to the manifest's ``quality``
    list, replacing an earlier one of the same metric, reference, feature network and image count. Atomic, under
    the writer lock, so the data a training run reads carries the quality it was measured at."""
    path = Path(path)
    lock = None
    if fcntl is not None:
        lock = open(path / LOCK, "a+b")  # noqa: SIM115
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise StoreError(f"generated store {path}: another process is writing it ({path / LOCK} is locked) — "
                             f"measure it once that process has finished") from None
    try:
        manifest = _read_manifest(path)
        if not manifest["complete"]:
            raise StoreError(f"generated store {path / MANIFEST}: is incomplete; finish it before measuring it")
        record = _jsonable(result)
        key = tuple(record.get(k) for k in QUALITY_KEYS)
        kept = [q for q in manifest.get("quality", []) if tuple(q.get(k) for k in QUALITY_KEYS) != key]
        manifest["quality"] = [*kept, record]
        atomic_write_json(path / MANIFEST, manifest)
        return manifest
    finally:
        if lock is not None:
            with contextlib.suppress(OSError):
                (path / LOCK).unlink()
            with contextlib.suppress(OSError):
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
            lock.close()


def quality_summary(manifest: dict) -> list[str]:
    """One line per recorded quality measurement (for `robustdiff-store info`)."""
    lines = []
    for q in manifest.get("quality", []):
        what = "FID" if q.get("metric") == "fid" else f"classifier FD ({q.get('classifier_model', '?')} " \
            f"{str(q.get('classifier_sha256', ''))[:12]})"
        agree = q.get("label_agreement")
        lines.append(f"{what} {q.get('value'):.4g} on {q.get('n'):,} images vs {q.get('reference')}"
                     + (f"; label agreement {100 * agree:.2f}%" if agree is not None else ""))
    return lines
