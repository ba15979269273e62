"""StoreWriter: append labelled images to a generated-data store, shard by shard, under a writer lock."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import numpy as np

from robustdiff.utils.io import atomic_path, atomic_write_json

from .format import (
    _TEMP_RE,
    DEFAULT_SHARD_SIZE,
    FORMAT_VERSION,
    IMAGE_DTYPE,
    LABEL_DTYPE,
    LOCK,
    MANIFEST,
    StoreError,
    _fmt_shape,
    _image_file,
    _label_file,
    _read_manifest,
    shard_name,
)

try:  # advisory lock so two writers never interleave in one store (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None


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
