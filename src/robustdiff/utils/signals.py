"""How every robustdiff job stops on a signal: SIGTERM (a scheduler's stop), SIGUSR1 (SLURM's warning before the
time limit) and Ctrl-C are noted by a handler and acted on at the job's next safe point (a training step, a
generated shard), where the state on disk is whole, so the same command resumes it. A second Ctrl-C stops at
once, without saving."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), signal.SIGINT) if s is not None)


def stop_requested(signum: int, already: int | None, at: str = "the end of this step") -> int:
    """The rule of every handler: note the signal (returned, to record); on a first Ctrl-C say when the job will
    stop (``at``); on a second Ctrl-C raise KeyboardInterrupt."""
    if signum == signal.SIGINT:
        if already == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving this step's position
        print(f"\nrobustdiff: Ctrl-C — saving the run at {at} (press Ctrl-C again to stop without saving)",
              flush=True)
    return signum


def install_stop_handlers(handler: Callable[[int, Any], None]) -> dict[int, Any]:
    """``handler`` for every stop signal; returns the handlers it replaced (for `restore_handlers`). Outside the
    main thread, where Python cannot set handlers, nothing is installed."""
    previous: dict[int, Any] = {}
    for sig in STOP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            break
    return previous


def restore_handlers(previous: dict[int, Any]) -> None:
    """Put back the handlers `install_stop_handlers` replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    previous.clear()


class StopSignals:
    """``with StopSignals("the end of this shard") as stop:`` — ``stop.received`` is the first stop signal that
    came inside the block (None if none); the previous handlers are back when it ends."""

    def __init__(self, at: str = "the end of this step"):
        self.at, self.received = at, None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.received = stop_requested(signum, self.received, self.at)

    def __enter__(self) -> StopSignals:
        self._previous = install_stop_handlers(self._handle)
        return self

    def __exit__(self, *exc) -> None:
        restore_handlers(self._previous)
