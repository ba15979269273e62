"""Writing the shards of a generated-data store while the next shard is sampled.

A shard's images and labels go to the block layout of ``robustdiff.data.store`` (`write_block`); with a
classifier filter, its confidence scores go beside them to ``scores/shard-<b>.f32`` (float32, one per image,
read back by ``robustdiff.diffusion.selection``). A scores file never exists without its shard.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.store import write_block
from ..utils.io import atomic_path

SCORES_DIR = "scores"


def scores_path(target: Path, block: int) -> Path:
    """The classifier scores of shard ``block`` of the store at ``target``."""
    return target / SCORES_DIR / f"shard-{block:05d}.f32"


class ShardWriter:
    """Writes finished shards on one background thread while the next shard is sampled.

    At most one write is pending (memory: the shard being written plus the one being sampled). A write's
    error is raised by the next ``submit`` or by ``close``; ``close`` (in a ``finally``) waits for the pending
    write, so an interrupted job still leaves every sampled shard complete on disk."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending = None

    def submit(self, fn, *args) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def write_shard(target: Path, block: int, images: np.ndarray | None, labels: np.ndarray | None,
                scores: np.ndarray | None) -> None:
    """The block's images and labels (unless already on disk), then its classifier scores: a scores file never
    exists without its block."""
    if images is not None:
        write_block(target, block, images, labels)
    if scores is not None:
        with atomic_path(scores_path(target, block)) as tmp:
            scores.tofile(tmp)
