"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same directory; on success it is fsynced and renamed onto `path`.

    On an exception the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file 0600; a published file gets the mode a plain open() would give it (0666 less the
    # umask), so teammates on shared storage can read stores, models and reports.
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    """The process umask. Read through /proc where possible: os.umask() can only read it by setting it, which
    races with files created meanwhile by other threads (generation writes shards on a background thread)."""
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch  # here, so numpy-only tools (the store CLI) don't pay torch's import

    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            # Through a file object, torch names the archive's records "archive/..." instead of after the (random)
            # temporary file name: the same tensors give the same bytes, so a file's sha256 identifies its content.
            torch.save(obj, f)
    except (RuntimeError, OSError) as e:
        raise disk_error(path, e) from e


def disk_error(path: str | os.PathLike, error: BaseException) -> BaseException:
    """A failed write as an OSError that says what happened: torch reports a full disk as "unexpected pos"."""
    import errno
    import shutil

    path = Path(path)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = getattr(error, "errno", None) == errno.ENOSPC or "unexpected pos" in str(error) or (
        free is not None and free < 64 * 2**20)
    if not full:
        return error
    return OSError(errno.ENOSPC, f"no space left on the device writing {path} ({free if free is not None else '?'} "
                   f"bytes free); the previous {path.name}, if any, is intact (writes go to a temporary file first) — "
                   f"free some space and run the same command again to resume", str(path))


def describe_os_error(error: OSError, hint: str = "") -> str:
    """One line for a failed file operation: the file (absolute), what the system said, and what to do.

    A temporary file (``.<name>.<random>.tmp``, see `atomic_path`) is named by the file it was writing."""
    import errno

    name = error.filename
    where = Path(os.fsdecode(name)).absolute() if name is not None else None
    if where is not None and where.name.startswith(".") and where.name.endswith(".tmp") and where.name.count(".") >= 3:
        where = where.with_name(where.name[1:].rsplit(".", 2)[0])
    what = error.strerror or str(error)
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR):
        fix = hint or "choose a place you can write to"
    elif error.errno == errno.ENOSPC:
        fix = "free some space and run the same command again"
    else:
        fix = hint
    head = f"{where}: {what}" if where is not None else what
    return head + (f" — {fix}" if fix else "")


def remove_orphan_temporaries(directory: str | os.PathLike, subdirs: tuple[str, ...] = ("", "checkpoints")) -> list[Path]:
    """Delete the temporary files ``atomic_path`` leaves when a process dies mid-write (``.<name>.<random>.tmp``)
    in ``directory`` and its ``subdirs``. Call only while holding the directory's lock. Returns what was removed."""
    import re

    pattern = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
    removed = []
    for sub in subdirs:
        d = Path(directory) / sub
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.is_file() and pattern.match(p.name):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    return removed


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 4 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()



class UnreadableWeightsError(ValueError):
    """A torch file that ``torch.load(weights_only=True)`` cannot read; the message names the file and the reason,
    never torch's advice to load it with ``weights_only=False`` (that would run whatever code the file holds).
    ``pickled``: the file holds pickled objects (else it is truncated or corrupt); ``cause``: torch's error type."""

    def __init__(self, message: str, *, pickled: bool, cause: str):
        super().__init__(message)
        self.pickled, self.cause = pickled, cause


def load_weights(path: str | os.PathLike, what: str = "a weights file", map_location: str = "cpu",
                 mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``, with an UnreadableWeightsError naming ``path`` on failure."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # unpickling and archive errors come in many types
        text = str(e)
        pickled = "weights_only" in text or "Unpickl" in text or "pickle" in text.lower()
        if pickled:
            reason = ("it holds pickled Python objects, not only tensors — robustdiff refuses to unpickle it, since "
                      "that would run whatever code the file holds; give a file written by robustdiff or "
                      "torch.save(state_dict)")
        else:
            reason = f"truncated or corrupt ({type(e).__name__}); restore it or write it again"
        raise UnreadableWeightsError(f"{path}: cannot be read as {what}: {reason}", pickled=pickled,
                                     cause=type(e).__name__) from None
