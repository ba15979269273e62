import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "src" / "robustdiff" / "conf"  # package data (pkg://robustdiff.conf)
EXPERIMENTS_DIR = CONF_DIR  # the recipes are its `experiment` group
AIDS_DIR = ROOT / "tests" / "aids"  # test aids (robustdiff_aids): the product has no testing hooks
sys.path.insert(0, str(AIDS_DIR))

# Two cores: keep torch from oversubscribing them when pytest and DDP workers run side by side.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def compose_train(*overrides: str):
    """The config `robustdiff-train <overrides>` would run with (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir

    import robustdiff.utils.naming  # noqa: F401  (registers the rd_* resolvers)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


# A TRADES run small enough for this CPU: 256 real Fashion-MNIST training images, 64 for validation.
TINY = ("model=wrn-10-1", "batch_size=32", "limit_train=320", "val_size=64", "limit_test=128", "norm.steps=2",
        "eval.steps=3", "eval.batch_size=128", "logger=none", "progress=false")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: a second OpenMP thread buys nothing and makes every op wait for a
    busy core (up to 5x slower under load). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A second process that takes a directory's DirectoryLock, says "locked" and holds it until its stdin closes.
_HOLD_LOCK = ("import sys\nfrom robustdiff.utils.lock import DirectoryLock\n"
              "lock = DirectoryLock(sys.argv[1], sys.argv[2]).acquire()\nprint('locked', flush=True)\nsys.stdin.read()\n")


@pytest.fixture
def lock_holder():
    """``with lock_holder(directory) as holder:`` — another process (``holder``, a Popen) holds ``directory``'s
    DirectoryLock, as ``what`` (default robustdiff-train), from the moment the block starts until it ends."""

    @contextlib.contextmanager
    def hold(directory, what: str = "robustdiff-train"):
        holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(directory), what], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            yield holder
        finally:
            holder.stdin.close()
            try:
                holder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()
            holder.stdout.close()

    return hold


@pytest.fixture
def tiny_overrides():
    return list(TINY)


@pytest.fixture
def stop_after(monkeypatch):
    """``stop_after(n)``: from then on in this test, a training run sends itself a real SIGTERM once it has done
    ``n`` optimiser steps (``stop_after(None)``: no more), as a user's ``kill`` would."""
    import robustdiff_aids

    return lambda steps: robustdiff_aids.stop_after_steps(steps, patch=monkeypatch.setattr)


@pytest.fixture
def crash_after(monkeypatch):
    """``crash_after(name, at)``: from then on in this test, a training run raises ``robustdiff_aids.Crash`` right
    after publishing ``name`` at epoch (EDM: optimiser step) ``at``; ``crash_after(None)``: no more."""
    import robustdiff_aids

    return lambda name, at=None: robustdiff_aids.crash_after(name, at, patch=monkeypatch.setattr)


def run_files(run: Path) -> dict:
    """What a training run directory says, in comparable form (see `same`): model.pt, history, summary and both
    checkpoints' weights, history, global step and consumed-batch count."""
    import json

    import torch

    def ckpt(name):
        c = torch.load(run / "checkpoints" / name, weights_only=True)
        return c["state_dict"], c["robustdiff"]["history"], c["global_step"], c["robustdiff"]["consumed"]

    return {"model.pt": torch.load(run / "model.pt", weights_only=True),
            "history.json": json.loads((run / "history.json").read_text()),
            "history.csv": (run / "history.csv").read_text(),
            "summary.json": json.loads((run / "summary.json").read_text()),
            "best.ckpt": ckpt("best.ckpt"), "last.ckpt": ckpt("last.ckpt")}


def same(a, b) -> bool:
    """Equal, tensors included (bit for bit), through nested dicts, lists and tuples."""
    import torch

    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.fixture
def signal_after_shards(monkeypatch):
    """``signal_after_shards(n)``: robustdiff-generate receives a real SIGTERM (or ``sig``) once it has finished
    ``n`` shards, and its handler has seen it before the loop goes on — the job then stops as a scheduler's stop
    would make it. ``signal_after_shards(None)`` lets the next generation run to the end."""
    import signal
    import time

    from robustdiff.diffusion.generation_wandb import GenerationWandb

    original = GenerationWandb.shard
    state = {"left": None, "sig": signal.SIGTERM}

    def shard(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if state["left"] is None:
            return
        state["left"] -= 1
        if state["left"] == 0:
            state["left"] = None
            handler = signal.getsignal(state["sig"])
            os.kill(os.getpid(), state["sig"])
            while getattr(handler, "__self__", None) is not None and handler.__self__.received is None:
                time.sleep(0.001)  # the handler runs in this (the main) thread, on the next bytecode boundary

    monkeypatch.setattr(GenerationWandb, "shard", shard)

    def arm(n, sig=signal.SIGTERM):
        state["left"], state["sig"] = n, sig

    return arm
