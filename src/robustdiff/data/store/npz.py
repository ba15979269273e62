"""Streaming .npz import and export (the reference layout: 'image' uint8 N×H×W×C, 'label' int N), chunk by chunk."""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from robustdiff.utils.io import atomic_path
from robustdiff.utils.progress import progress_bar

from .format import (
    _HASH_BLOCK,
    DEFAULT_SHARD_SIZE,
    IMAGE_DTYPE,
    LABEL_DTYPE,
    MANIFEST,
    NPZ_CHUNK,
    StoreError,
    _fmt_shape,
    _read_manifest,
)
from .reader import GeneratedStore
from .writer import StoreWriter


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
        with progress_bar(total, f"import → {out_path.name}", progress) as bar:
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
        progress_bar(n, f"export → {Path(out_npz).name}", progress) as bar,
        zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf,
    ):
        _write_npy_stream(zf, "image", (n, *store.image_shape), IMAGE_DTYPE, image_blocks(bar))
        _write_npy_stream(zf, "label", (n,), LABEL_DTYPE, label_blocks())
