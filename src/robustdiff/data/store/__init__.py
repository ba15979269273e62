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

The package, one job per module (import everything from ``robustdiff.data.store``):

- ``format``: the format's constants (`FORMAT_VERSION`, `MANIFEST`, `LOCK`, dtypes,
  `DEFAULT_SHARD_SIZE`, `NPZ_CHUNK`), `StoreError`, shard file names, reading and checking a manifest.
- ``writer``: `StoreWriter`, the sequential, resumable writer and its advisory lock.
- ``blocks``: the block layout (`open_block_store`, `write_block`, `finished_blocks`,
  `assemble_block_store`, `block_ranges`): a store of known size written shard by shard, in any
  order, by several processes at once.
- ``reader``: `GeneratedStore` (memory-mapped random access), `verify_store` (full checksum pass),
  `store_info` (the manifest, no shard checks).
- ``npz``: streaming `.npz` conversion (`NpyMember`, `iter_npz_array`, `import_npz`, `export_npz`)
  and `check_new_file`.
- ``quality``: generator-quality records in the manifest (`record_quality`, `quality_summary`).
"""

from __future__ import annotations

from .blocks import assemble_block_store, block_ranges, finished_blocks, open_block_store, write_block
from .format import (
    DEFAULT_SHARD_SIZE,
    FORMAT_VERSION,
    IMAGE_DTYPE,
    LABEL_DTYPE,
    LOCK,
    MANIFEST,
    NPZ_CHUNK,
    StoreError,
    shard_name,
)
from .npz import NpyMember, check_new_file, export_npz, import_npz, iter_npz_array
from .quality import QUALITY_KEYS, quality_summary, record_quality
from .reader import GeneratedStore, store_info, verify_store
from .writer import StoreWriter

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "FORMAT_VERSION",
    "IMAGE_DTYPE",
    "LABEL_DTYPE",
    "LOCK",
    "MANIFEST",
    "NPZ_CHUNK",
    "QUALITY_KEYS",
    "GeneratedStore",
    "NpyMember",
    "StoreError",
    "StoreWriter",
    "assemble_block_store",
    "block_ranges",
    "check_new_file",
    "export_npz",
    "finished_blocks",
    "import_npz",
    "iter_npz_array",
    "open_block_store",
    "quality_summary",
    "record_quality",
    "shard_name",
    "store_info",
    "verify_store",
    "write_block",
]
