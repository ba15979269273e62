"""One writer per directory: an exclusive advisory lock held for the life of a job.

Two processes training into one run directory (or generating into one store) would overwrite each other's
checkpoints and report results the directory does not hold. ``DirectoryLock`` takes ``fcntl.flock`` on a lock
file inside the directory (released by the kernel when the process dies, so a crash never leaves a stale
lock) and writes the holder's PID, host and start time into it, so the second process's error can name them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no locking
    fcntl = None

LOCK_NAME = ".robustdiff.lock"


class DirectoryLockedError(RuntimeError):
    """Another process holds the directory's lock; the message names it (``directory`` and ``holder`` too)."""

    def __init__(self, message: str, directory: Path | None = None, holder: str | None = None):
        super().__init__(message)
        self.directory, self.holder = directory, holder


class DirectoryLock:
    """``with DirectoryLock(path, what="training"):`` — refuse to start if another process holds ``path``."""

    def __init__(self, directory: str | os.PathLike, what: str = "job", name: str = LOCK_NAME):
        self.directory = Path(directory)
        self.path = self.directory / name
        self.what = what
        self._file = None
        self._created = False

    def acquire(self) -> DirectoryLock:
        if fcntl is None:
            return self
        self._created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held until release
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = _parse(f.read())
            f.close()
            who = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} ({holder.get('what', 'a job')}, "
                   f"since {holder.get('started', '?')})") if holder else "another process"
            raise DirectoryLockedError(
                f"{self.directory}: in use by {who} — {self.path} is locked. Two processes must never write one "
                f"directory: wait for that one to finish (or stop it), or choose another name/out for this "
                f"{self.what}.", self.directory, who) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.seek(0)
                self._file.truncate()
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
            if self._created and [p.name for p in self.directory.iterdir()] == [self.path.name]:
                # A job refused before writing anything leaves no empty directory behind (it made it itself).
                with contextlib.suppress(OSError):
                    self.path.unlink()
                    self.directory.rmdir()

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _parse(text: str) -> dict:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


__all__ = ["DirectoryLock", "DirectoryLockedError", "LOCK_NAME"]
