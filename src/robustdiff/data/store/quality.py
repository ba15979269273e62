"""Generator-quality records (FID, classifier FD) kept in a store's manifest, and their one-line summaries."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from robustdiff.utils.io import atomic_write_json

from .format import LOCK, MANIFEST, StoreError, _jsonable, _read_manifest

try:  # advisory lock so two writers never interleave in one store (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None


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
