"""Test aids for robustdiff's training jobs: stop, signal, hold or crash a run at an exact point.

robustdiff has no testing hooks of its own; these aids wrap its methods from outside (at class or module level),
so what they exercise is the product's own code path:

* ``stop_after_steps(n)``: once ``trainer.global_step >= n`` the process sends itself a real SIGTERM (once per
  run), before ``RunCheckpoint.on_train_batch_end`` (or ``EDMSnapshot.on_train_batch_end``) runs; the handler
  the callback installed notes it, and the callback saves and stops at that step boundary, as on any SIGTERM.
* ``self_signal(signum, step)``: the same with any signal, from optimiser step ``step`` on.
* ``step_gate(step, folder)``: after optimiser step ``step`` the process writes "<pid> <step>" to the FIFO
  ``<folder>/ready`` and waits for a line on the FIFO ``<folder>/go``, so that another process can signal it at
  exactly that step boundary.
* ``crash_after(name, at)``: ``Crash`` (a BaseException, so nothing catches it) is raised right after the run
  publishes ``name`` — best.ckpt, model.pt, history, summary.json, last.ckpt at epoch ``at`` of a TRADES run;
  network.pt, summary.json, last.ckpt at optimiser step ``at`` of an EDM run (``at=None``: the first time).

Each takes ``patch``, a ``setattr(target, name, value)``: pytest's ``monkeypatch.setattr`` in-process (undone
after the test; see the fixtures in tests/conftest.py), plain ``setattr`` by default. Subprocesses get the aids
through tests/aids/sitecustomize.py: ``aids_env(...)`` is an environment with tests/aids first on PYTHONPATH and
the AIDS_* variables that ``install_from_env`` reads (``aids_vars(...)``: just those variables).

This module imports robustdiff only when an aid is installed.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

AIDS_DIR = Path(__file__).resolve().parent

STOP_ENV = "AIDS_STOP_AFTER_STEPS"  # "<n>"
SIGNAL_ENV = "AIDS_SELF_SIGNAL"  # "<signum>@<step>"
GATE_ENV = "AIDS_STEP_GATE"  # "<step>:<folder>"
CRASH_ENV = "AIDS_CRASH_AFTER"  # "<file>" or "<file>@<epoch or step>"
ENV_VARS = (STOP_ENV, SIGNAL_ENV, GATE_ENV, CRASH_ENV)

Patch = Callable[[Any, str, Any], None]


class Crash(BaseException):
    """A crash right after a publication point (``crash_after``); BaseException so nothing catches it."""


class Settings:
    """What the installed wrappers do; None: nothing."""

    stop_after: int | None = None
    signal: tuple[int, int] | None = None  # (signum, step)
    gate: tuple[int, Path] | None = None  # (step, folder)
    crash: tuple[str, int | None] | None = None  # (file, epoch or step)


settings = Settings()
# While a run publishes (RunCheckpoint.on_validation_end, EDMSnapshot.snapshot): a callable giving the epoch
# (TRADES) or optimiser step (EDM) of what it publishes. Innermost last.
_publishing: list[Callable[[], int | None]] = []


# ---------------------------------------------------------------------------------------------------- the aids


def stop_after_steps(steps: int | None, patch: Patch = setattr) -> None:
    """A real SIGTERM once ``trainer.global_step >= steps`` (None: no more)."""
    _install_step_hooks(patch)
    patch(settings, "stop_after", None if steps is None else int(steps))


def self_signal(signum: int | None, step: int = 0, patch: Patch = setattr) -> None:
    """A real ``signum`` once ``trainer.global_step >= step`` (None: no more)."""
    _install_step_hooks(patch)
    patch(settings, "signal", None if signum is None else (int(signum), int(step)))


def step_gate(step: int | None, folder: str | os.PathLike = "", patch: Patch = setattr) -> None:
    """Wait at the gate in ``folder`` after optimiser step ``step`` (None: no gate)."""
    _install_step_hooks(patch)
    patch(settings, "gate", None if step is None else (int(step), Path(folder)))


def crash_after(name: str | None, at: int | None = None, patch: Patch = setattr) -> None:
    """``Crash`` right after publishing ``name`` at epoch/step ``at`` (None: any; ``name=None``: no crash)."""
    if name is not None and name not in CRASH_POINTS:
        raise ValueError(f"crash_after({name!r}): choose one of {CRASH_POINTS}")
    _install_crash_hooks(patch)
    patch(settings, "crash", None if name is None else (name, None if at is None else int(at)))


CRASH_POINTS = ("best.ckpt", "model.pt", "history", "summary.json", "last.ckpt", "network.pt")


def install_from_env(environ: Mapping[str, str] = os.environ) -> None:
    """Install the aids the AIDS_* variables ask for (see ``aids_env``)."""
    if environ.get(STOP_ENV):
        stop_after_steps(int(environ[STOP_ENV]))
    if environ.get(SIGNAL_ENV):
        signum, _, step = environ[SIGNAL_ENV].partition("@")
        self_signal(int(signum), int(step or 0))
    if environ.get(GATE_ENV):
        step, _, folder = environ[GATE_ENV].partition(":")
        step_gate(int(step), folder)
    if environ.get(CRASH_ENV):
        name, _, at = environ[CRASH_ENV].partition("@")
        crash_after(name, int(at) if at else None)


def aids_env(base: Mapping[str, str] | None = None, **aids: Any) -> dict[str, str]:
    """``base`` (default: os.environ) without AIDS_* variables, plus those of ``aids`` (see ``aids_vars``)."""
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if k not in ENV_VARS}
    env.update(aids_vars(base.get("PYTHONPATH", ""), **aids))
    return env


def aids_vars(pythonpath: str | None = None, *, stop_after_steps: int | None = None,
              self_signal: tuple[int, int] | None = None, step_gate: tuple[int, str | os.PathLike] | None = None,
              crash_after: tuple[str, int | None] | None = None) -> dict[str, str]:
    """The variables that give a Python process these aids: AIDS_* and PYTHONPATH, tests/aids first, then
    ``pythonpath`` (default: this process's PYTHONPATH); tests/aids/sitecustomize.py installs them at start-up.
    Nothing when no aid is asked for."""
    wanted = {STOP_ENV: None if stop_after_steps is None else str(stop_after_steps),
              SIGNAL_ENV: None if self_signal is None else f"{self_signal[0]}@{self_signal[1]}",
              GATE_ENV: None if step_gate is None else f"{step_gate[0]}:{step_gate[1]}",
              CRASH_ENV: None if crash_after is None else
              crash_after[0] + ("" if crash_after[1] is None else f"@{crash_after[1]}")}
    out = {k: v for k, v in wanted.items() if v is not None}
    if out:
        pythonpath = os.environ.get("PYTHONPATH", "") if pythonpath is None else pythonpath
        rest = [p for p in pythonpath.split(os.pathsep) if p and Path(p).resolve() != AIDS_DIR]
        out["PYTHONPATH"] = os.pathsep.join([str(AIDS_DIR), *rest])
    return out


# ---------------------------------------------------------------------------------------------------- wrappers


def _wrap(patch: Patch, owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    original = getattr(owner, name)
    if getattr(original, "__aids__", False):
        return  # already wrapped
    wrapper = make(original)
    wrapper.__aids__ = True
    wrapper.__wrapped__ = original
    wrapper.__name__ = getattr(original, "__name__", name)
    wrapper.__qualname__ = getattr(original, "__qualname__", name)
    patch(owner, name, wrapper)


def _before_step(callback: Any, trainer: Any) -> None:
    """What the step aids do after an optimiser step, before the callback looks for a signal."""
    step = int(trainer.global_step)
    if callback.received is None:
        if settings.stop_after is not None and step >= settings.stop_after:
            _send(signal.SIGTERM)
        elif settings.signal is not None and step >= settings.signal[1]:
            _send(settings.signal[0])
    if settings.gate is not None and settings.gate[0] == step:
        folder = settings.gate[1]
        with open(folder / "ready", "w") as ready:
            ready.write(f"{os.getpid()} {step}\n")
        with open(folder / "go") as go:
            go.readline()


def _send(signum: int) -> None:
    if signal.getsignal(signum) in (signal.SIG_DFL, None):
        # No handler (the callback could not install its own): a real signal would end this process (pytest).
        raise RuntimeError(f"robustdiff_aids: no handler for signal {signum} in this process; not sending it")
    os.kill(os.getpid(), signum)  # the handler runs before os.kill returns (CPython checks for signals there)


def _install_step_hooks(patch: Patch) -> None:
    from robustdiff.training.callbacks import RunCheckpoint
    from robustdiff.training.diffusion import EDMSnapshot

    def make(original):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _before_step(self, trainer)
            return original(self, trainer, pl_module, outputs, batch, batch_idx)
        return on_train_batch_end

    _wrap(patch, RunCheckpoint, "on_train_batch_end", make)
    _wrap(patch, EDMSnapshot, "on_train_batch_end", make)


def _crash_if(name: str, at: int | None) -> None:
    want = settings.crash
    if want is not None and want[0] == name and (want[1] is None or at is None or want[1] == at):
        raise Crash(f"robustdiff_aids.crash_after({name!r}, {want[1]}): crashed after publishing {name}")


def _current() -> int | None:
    return _publishing[-1]() if _publishing else None


def _install_crash_hooks(patch: Patch) -> None:
    """The publication points. TRADES (RunCheckpoint.on_validation_end): best.ckpt, then model.pt (the
    ``atomic_torch_save`` that ``_save_checkpoint`` calls after best.ckpt), ``write_history``, summary.json
    (``atomic_write_json``), last.ckpt (``_save_checkpoint``). EDM (EDMSnapshot.snapshot): network.pt
    (``save_network``), summary.json (``atomic_write_json``), last.ckpt (the end of ``snapshot``)."""
    from robustdiff.training import callbacks, diffusion

    def publishing(original, at):  # a method during which the run publishes; ``at(self, args)``: epoch/step
        def method(self, *args, **kwargs):
            _publishing.append(lambda: at(self, args))
            try:
                return original(self, *args, **kwargs)
            finally:
                _publishing.pop()
        return method

    def epoch(cb, args):
        return getattr(cb, "_epoch", None)

    def edm_step(cb, args):
        return int(args[0].global_step)  # snapshot(trainer, ...)

    _wrap(patch, callbacks.RunCheckpoint, "on_validation_end", lambda original: publishing(original, epoch))

    def make_save_checkpoint(original):
        def _save_checkpoint(self, trainer, filepath):
            original(self, trainer, filepath)
            if Path(filepath).name == "last.ckpt":
                _crash_if("last.ckpt", getattr(self, "_epoch", None))
        return _save_checkpoint

    _wrap(patch, callbacks.RunCheckpoint, "_save_checkpoint", make_save_checkpoint)

    def make_torch_save(original):
        def atomic_torch_save(obj, path, *args, **kwargs):
            model = bool(_publishing) and Path(path).name == "model.pt"
            if model:
                _crash_if("best.ckpt", _current())  # best.ckpt is published; model.pt comes next
            out = original(obj, path, *args, **kwargs)
            if model:
                _crash_if("model.pt", _current())
            return out
        return atomic_torch_save

    _wrap(patch, callbacks, "atomic_torch_save", make_torch_save)

    def make_write_history(original):
        def write_history(*args, **kwargs):
            original(*args, **kwargs)
            if _publishing:
                _crash_if("history", _current())
        return write_history

    _wrap(patch, callbacks, "write_history", make_write_history)

    def make_write_json(original):
        def atomic_write_json(path, *args, **kwargs):
            out = original(path, *args, **kwargs)
            if _publishing and Path(path).name == "summary.json":
                _crash_if("summary.json", _current())
            return out
        return atomic_write_json

    _wrap(patch, callbacks, "atomic_write_json", make_write_json)
    _wrap(patch, diffusion, "atomic_write_json", make_write_json)

    def make_snapshot(original):
        inner = publishing(original, edm_step)

        def snapshot(self, trainer, *args, **kwargs):
            inner(self, trainer, *args, **kwargs)
            _crash_if("last.ckpt", int(trainer.global_step))  # last.ckpt is the snapshot's last file
        return snapshot

    _wrap(patch, diffusion.EDMSnapshot, "snapshot", make_snapshot)

    def make_save_network(original):
        def save_network(path, *args, **kwargs):
            out = original(path, *args, **kwargs)
            if _publishing and Path(path).name == "network.pt":  # not snapshots/network-<kimg>.pt
                _crash_if("network.pt", _current())
            return out
        return save_network

    _wrap(patch, diffusion, "save_network", make_save_network)


__all__ = ["Crash", "stop_after_steps", "self_signal", "step_gate", "crash_after", "install_from_env", "aids_env",
           "aids_vars",
           "settings", "ENV_VARS", "STOP_ENV", "SIGNAL_ENV", "GATE_ENV", "CRASH_ENV", "AIDS_DIR", "CRASH_POINTS"]
