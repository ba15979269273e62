"""Block-layout stores: shards written in any order (by several processes), assembled at the end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from robustdiff.data.store import (
    MANIFEST,
    GeneratedStore,
    StoreError,
    StoreWriter,
    assemble_block_store,
    block_ranges,
    finished_blocks,
    open_block_store,
    verify_store,
    write_block,
)

SHAPE = (4, 4, 1)
PROV = {"generator": "test", "seed": 3}


def data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8), np.arange(n) % 5


def test_block_ranges():
    assert block_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert block_ranges(8, 4) == [(0, 4), (4, 8)]
    with pytest.raises(StoreError):
        block_ranges(0, 4)


def test_out_of_order_blocks_equal_sequential_writer(tmp_path):
    images, labels = data(23)
    open_block_store(tmp_path / "b", 23, SHAPE, 5, 10, PROV)
    for b in (2, 0, 1):  # any order
        a, z = block_ranges(23, 10)[b]
        write_block(tmp_path / "b", b, images[a:z], labels[a:z])
    manifest = assemble_block_store(tmp_path / "b")
    assert manifest["complete"] and manifest["count"] == 23 and manifest["class_counts"] == [5, 5, 5, 4, 4]
    assert verify_store(tmp_path / "b") == []
    store = GeneratedStore(tmp_path / "b")
    got_x, got_y = store.get(np.arange(23))
    np.testing.assert_array_equal(got_x, images)
    np.testing.assert_array_equal(got_y, labels)
    # Same shard files and checksums as the one-process StoreWriter.
    with StoreWriter(tmp_path / "w", SHAPE, 5, shard_size=10, provenance=PROV) as w:
        w.append(images, labels)
    ref = json.loads((tmp_path / "w" / MANIFEST).read_text())
    assert ref["shards"] == manifest["shards"]
    assert assemble_block_store(tmp_path / "b") == manifest  # idempotent


def test_resume_and_refusals(tmp_path):
    images, labels = data(20)
    path = tmp_path / "b"
    open_block_store(path, 20, SHAPE, 5, 8, PROV)
    write_block(path, 1, images[8:16], labels[8:16])
    (path / ".shard-00000.images.u8.abc.tmp").write_bytes(b"partial")  # a crashed writer's leftover
    assert finished_blocks(path) == [1]
    with pytest.raises(StoreError, match="not written yet.*shard-00000, shard-00002"):
        assemble_block_store(path)
    with pytest.raises(StoreError, match="incomplete"):
        GeneratedStore(path)
    with pytest.raises(StoreError, match="block-layout"):
        StoreWriter(path, SHAPE, 5)
    with pytest.raises(StoreError, match="provenance"):
        open_block_store(path, 20, SHAPE, 5, 8, {**PROV, "seed": 4})
    with pytest.raises(StoreError, match="shard_size"):
        open_block_store(path, 20, SHAPE, 5, 10, PROV)
    assert open_block_store(path, 20, SHAPE, 5, 8, dict(PROV))["complete"] is False  # resumable
    with pytest.raises(StoreError, match="shape"):
        write_block(path, 0, images[:7], labels[:7])
    with pytest.raises(StoreError, match=r"labels must lie in \[0, 5\)"):
        write_block(path, 0, images[:8], labels[:8] + 5)
    with pytest.raises(StoreError, match="outside"):
        write_block(path, 3, images[:4], labels[:4])
    write_block(path, 0, images[:8], labels[:8])
    write_block(path, 2, images[16:], labels[16:])
    assert assemble_block_store(path)["count"] == 20
    assert verify_store(path) == []
    assert not list(path.glob(".*.tmp"))  # the crashed writer's leftover is gone


def test_open_refuses_foreign_directories(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        open_block_store(tmp_path / "x", 4, SHAPE, 5, 2, PROV)
    images, labels = data(4)
    with StoreWriter(tmp_path / "w", SHAPE, 5, shard_size=2) as w:
        w.append(images, labels)
    with pytest.raises(StoreError, match="another tool"):
        open_block_store(tmp_path / "w", 4, SHAPE, 5, 2, PROV)
