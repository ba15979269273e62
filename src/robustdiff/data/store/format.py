"""The on-disk format of a generated-data store: constants, StoreError, shard file names, manifest reading."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

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


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def _file_sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()
