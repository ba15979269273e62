"""Faults a long run meets: a crash at every publication point of an epoch, two processes on one run directory,
a resume with changed hyperparameters, overwrites, and bad values — each must end in a clean state or a clear
error, never in a stale run that reports success."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from robustdiff_aids import Crash, aids_env

from conftest import TINY, compose_train, run_files, same
from robustdiff.training.run import ConfigError, train

pytestmark = pytest.mark.usefixtures("one_thread")

POINTS = ("best.ckpt", "model.pt", "history", "summary.json", "last.ckpt")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted reference runs: 1 epoch and 2 epochs."""
    root = tmp_path_factory.mktemp("straight")
    out = {}
    for epochs in (1, 2):
        train(compose_train(*TINY, f"epochs={epochs}"), root / f"e{epochs}")
        out[epochs] = run_files(root / f"e{epochs}")
    return out


@pytest.mark.parametrize("point,epochs", [(p, 1) for p in POINTS] + [("model.pt", 2), ("summary.json", 2)])
def test_crash_at_every_publication_point_then_rerun_equals_a_straight_run(point, epochs, straight, tmp_path,
                                                                          crash_after):
    run = tmp_path / "run"
    cfg = compose_train(*TINY, f"epochs={epochs}")
    crash_after(point, epochs)
    with pytest.raises(Crash):
        train(cfg, run)
    crash_after(None)
    (run / "checkpoints" / ".last.ckpt.zz99zz99.tmp").write_bytes(b"half")  # as a kill mid-write leaves
    # The crash left files of the last epoch published before last.ckpt; the rerun must not take them for a
    # finished run (the reported defect), and must end exactly where a straight run ends.
    summary = train(compose_train(*TINY, f"epochs={epochs}"), run)
    assert summary["finished"]
    assert same(run_files(run), straight[epochs]), point
    assert not list(run.glob("**/*.tmp"))


EDM_FAST = ["resolution=16", "limit_train=256", "edm.batch_size=16", "edm.lr_rampup_kimg=0", "grid.rows=1",
            "grid.steps=2", "logger=none", "trainer.enable_progress_bar=false", "edm.duration_kimg=0.064",
            "edm.snapshot_kimg=0.032"]


def edm_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    from robustdiff.cli.hydra_conf import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train_edm", overrides=[*EDM_FAST, *overrides])


@pytest.mark.parametrize("point", ["network.pt", "summary.json", "last.ckpt"])
def test_edm_crash_at_the_last_snapshot_then_rerun_equals_a_straight_run(point, tmp_path, crash_after):
    from robustdiff.training.edm_run import train_edm

    train_edm(edm_config(), tmp_path / "straight")
    # The last snapshot (step 4 of 4) dies after publishing `point`: summary.json may already say "finished".
    crash_after(point, 4)
    with pytest.raises(Crash):
        train_edm(edm_config(), tmp_path / "run")
    crash_after(None)
    summary = train_edm(edm_config(), tmp_path / "run")
    assert summary["finished"] and summary["steps"] == 4
    for name in ("network.pt", "snapshots/network-000000.032.pt", "snapshots/network-000000.064.pt"):
        a = torch.load(tmp_path / "straight" / name, weights_only=True)
        b = torch.load(tmp_path / "run" / name, weights_only=True)
        assert same(a, b), name
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == json.loads(
        (tmp_path / "straight" / "summary.json").read_text())


def test_a_second_process_on_one_directory_is_refused_naming_the_holder(tmp_path, lock_holder):
    from robustdiff.utils.lock import DirectoryLockedError

    run = tmp_path / "run"
    with lock_holder(run) as holder:
        with pytest.raises(DirectoryLockedError, match=rf"in use by process {holder.pid} on .*robustdiff-train"):
            train(compose_train(*TINY, "epochs=1"), run)
        assert not (run / "run.json").exists()  # refused before writing anything
        # Evaluating into the directory while it is held: refused before any attack.
        from robustdiff.cli.evaluate import main as eval_main

        (run / "run.json").write_text("{}")
        with pytest.raises(SystemExit, match=f"process {holder.pid}"):
            eval_main([str(run), "--dataset", "fashionmnist", "--norm", "linf", "--attacks", "clean"])
        (run / "run.json").unlink()
    # The holder is gone (the kernel drops its lock): the same command now runs.
    assert train(compose_train(*TINY, "epochs=1"), run)["finished"]


def test_generation_into_a_store_another_process_writes_is_refused(tmp_path, lock_holder):
    from robustdiff.diffusion.generate import GenerationError, generate

    out = tmp_path / "store"
    with lock_holder(out) as holder:
        cfg = {"network": str(tmp_path / "none.pt"), "n": 10, "out": str(out), "dataset": None,
               "trainer": {"accelerator": "cpu", "devices": 1, "strategy": "auto", "num_nodes": 1}}
        with pytest.raises(GenerationError, match=f"process {holder.pid}"):
            generate(cfg)


@pytest.mark.parametrize("change", ["lr=0.05", "beta=3.0", "label_smoothing=0.2", "ema_decay=0.9",
                                    "weight_decay=0.001", "eval.steps=5", "precision=bf16-mixed"])
def test_resume_with_a_changed_hyperparameter_is_refused(change, tmp_path, stop_after):
    run = tmp_path / "run"
    stop_after(2)
    first = train(compose_train(*TINY, "epochs=2"), run)
    assert first.get("interrupted") and not first["finished"]
    stop_after(None)
    before = {p.name: p.read_bytes() for p in run.glob("*.json")}
    with pytest.raises(ConfigError, match=rf"{change.split('=')[0]}: run has .* you asked for"):
        train(compose_train(*TINY, "epochs=2", change), run)
    assert {p.name: p.read_bytes() for p in run.glob("*.json")} == before  # nothing rewritten
    # What may change on resume does not count: the evaluation batch size, the logger, the devices.
    assert train(compose_train(*TINY, "epochs=2", "eval.batch_size=64", "logger=csv"), run)["finished"]


@pytest.mark.parametrize("override,message", [
    ("lr=abc", "lr='abc' is not a number"),
    ("ratio=abc", "ratio='abc' is not a number"),
    ("ratio=0", "ratio=0 needs generated data"),
    ("seed=-1", "seed=-1 must be an integer >= 0"),
    ("model.depth=11", "model.depth=11: a WideResNet's depth is 6·n + 4"),
    ("loss=mse", "loss='mse': choose trades"),
    ("schedule=step", "schedule='step': choose cosinew"),
    ("generated_sampling=foo", "generated_sampling='foo': choose with_replacement"),
    ("batch_size=100000", "batch_size=100000 is larger than the 256 real training images"),
    ("+epoch=3", "epoch: not a robustdiff-train setting (added with +epoch=...); did you mean epochs=...?"),
])
def test_bad_values_are_refused_before_any_work(override, message, tmp_path):
    with pytest.raises(ConfigError) as e:
        train(compose_train(*TINY, override), tmp_path / "run")
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()


def small_store(path: Path, n: int = 40) -> Path:
    import numpy as np

    from robustdiff.data.store import StoreWriter

    rng = np.random.default_rng(0)
    with StoreWriter(path, (28, 28, 1), num_classes=10, shard_size=16) as w:
        w.append(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), np.arange(n) % 10)
        w.finalize()
    return path


def test_a_damaged_label_is_caught_when_the_store_opens(tmp_path):
    from robustdiff.data.store import GeneratedStore, StoreError

    store = small_store(tmp_path / "store")
    shard = sorted(store.glob("*.labels.i64"))[1]
    data = bytearray(shard.read_bytes())
    data[8 * 3] = 99  # image 3 of shard 1: label 99
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=rf"{shard.name}: label 99 is outside \[0, 10\)"):
        GeneratedStore(store).check_compatible((28, 28, 1), 10, "fashionmnist")


def test_exports_never_overwrite_silently(tmp_path, capsys):
    from robustdiff.cli.evaluate import main as eval_main
    from robustdiff.cli.store import main as store_main

    store = small_store(tmp_path / "store")
    existing = tmp_path / "existing.npz"
    existing.write_bytes(b"precious")
    assert store_main(["export", str(store), str(existing), "--no-progress"]) == 1
    assert "--overwrite" in capsys.readouterr().err and existing.read_bytes() == b"precious"
    assert store_main(["export", str(store), str(tmp_path / "nodir" / "x.npz"), "--no-progress"]) == 1
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "nodir").exists()
    assert store_main(["export", str(store), str(store / "inside.npz"), "--no-progress"]) == 1
    assert store_main(["export", str(store), str(existing), "--no-progress", "--overwrite"]) == 0
    assert existing.stat().st_size > 40 * 784

    # A model export into another run's directory, or over an existing file, is refused before any work.
    mine, other = tmp_path / "mine", tmp_path / "other"
    for d in (mine, other):
        d.mkdir()
        (d / "run.json").write_text("{}")
    (other / "model.pt").write_bytes(b"theirs")
    with pytest.raises(SystemExit, match="inside another run directory"):
        eval_main(["export", str(mine), "--out", str(other / "model.pt")])
    (tmp_path / "card.json").write_text("{}")
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        eval_main(["export", str(mine), "--out", str(tmp_path / "m.pt"), "--card", str(tmp_path / "card.json")])
    assert (other / "model.pt").read_bytes() == b"theirs"


def test_eval_checks_its_output_before_any_attack(tmp_path):
    from robustdiff.cli.evaluate import main as eval_main

    run = tmp_path / "run"
    train(compose_train(*TINY, "epochs=1", "eval.steps=1"), run)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit, match="is a file"):
        eval_main([str(run), "--out", str(blocker), "--attacks", "clean,autoattack"])
    with pytest.raises(SystemExit, match="cannot write results to"):
        eval_main([str(run), "--out", str(blocker / "sub"), "--attacks", "clean,autoattack"])
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "eval.json").write_text('{"someone": "else"}')
    with pytest.raises(SystemExit, match="is not a robustdiff-eval result"):
        eval_main([str(run), "--out", str(tmp_path / "foreign"), "--attacks", "clean"])


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(15, 143), (2, 130)])
def test_a_signal_saves_exits_non_zero_and_the_rerun_finishes(signum, code, tmp_path):
    import os
    import subprocess
    import sys

    cli = Path(sys.executable).parent / "robustdiff-train"
    argv = [str(cli), *TINY, "epochs=1", f"run_root={tmp_path}", "name=run"]
    env = aids_env({**os.environ, "OMP_NUM_THREADS": "1"}, self_signal=(signum, 3))
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "run the same command again to resume" in proc.stdout
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["robustdiff"]["consumed"] == [0, 3]  # saved at the step boundary, mid-epoch
    env = aids_env(env)  # no aids
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "resuming" in proc.stdout, proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["finished"]


def test_unreadable_checkpoint_is_named_without_torch_advice(tmp_path, capsys, stop_after):
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    stop_after(2)
    train(compose_train(*TINY, "epochs=2"), run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    cli = Path(sys.executable).parent / "robustdiff-train"
    proc = subprocess.run([str(cli), *TINY, "epochs=2", f"run_root={tmp_path}", "name=run"], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 2 and f"{last}: cannot be read (truncated or corrupt" in proc.stderr, proc.stderr[-2000:]
    assert "weights_only=False" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_report_names_and_skips_a_run_with_an_unreadable_history(tmp_path):
    from robustdiff.evaluation.report import write_report

    for name in ("good", "bad"):
        train(compose_train(*TINY, "epochs=1", "eval.steps=1"), tmp_path / "runs" / name)
    (tmp_path / "runs" / "bad" / "history.json").write_text("{not json")
    rows = write_report(tmp_path / "runs", tmp_path / "report")
    assert [r["run"] for r in rows] == ["good"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Skipped runs" in text and "bad" in text and "history.json" in text


def test_dataset_files_half_present_or_truncated_are_named(tmp_path):
    import gzip

    from robustdiff.data.datasets import DEBIAN_FASHION_MNIST, DatasetError, load_split

    d = tmp_path / "fashionmnist"
    d.mkdir()
    src = DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz"
    (d / src.name).write_bytes(src.read_bytes())
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.* is missing"):
        load_split("fashionmnist", "test", tmp_path)  # not silently completed from Debian's copy
    lab = gzip.compress((DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(lab[: len(lab) // 2])
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz: unreadable .*truncated or corrupt"):
        load_split("fashionmnist", "test", tmp_path)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 300 KiB tmpfs: room for run.json, not for a checkpoint (root only; skipped where mount is not allowed)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    import gc

    gc.collect()  # torch's zip writer of the failed save holds its (deleted) file until collected
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_is_reported_as_such_and_leaves_no_half_file(tiny_disk):
    import errno

    with pytest.raises(OSError) as e:
        train(compose_train(*TINY, "epochs=1", "eval.steps=1"), tiny_disk / "run")
    assert e.value.errno == errno.ENOSPC and "no space left on the device writing" in str(e.value)
    assert "is intact" in str(e.value) and "unexpected pos" not in str(e.value)
    assert not list(tiny_disk.glob("**/*.tmp"))


def test_the_same_tensors_saved_twice_are_the_same_bytes(tmp_path):
    """A saved file's sha256 identifies its content (stores record their generator's and classifier's sha256;
    shipped generators are checked by it): the temporary file's random name must not leak into the archive."""
    import hashlib

    import torch

    from robustdiff.utils.io import atomic_torch_save

    obj = {"w": torch.arange(12.0).reshape(3, 4), "kimg": 1.5}
    atomic_torch_save(obj, tmp_path / "a.pt")
    atomic_torch_save(obj, tmp_path / "b.pt")
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.pt", "b.pt")]
    assert digest[0] == digest[1]
    assert torch.equal(torch.load(tmp_path / "b.pt", weights_only=True)["w"], obj["w"])


def test_published_files_get_the_usual_permissions(tmp_path):
    import os

    from robustdiff.utils.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.json", "{}")
        assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600  # a private umask is respected
    finally:
        os.umask(old)


def test_malformed_cifar_batches_and_a_corrupt_run_json_are_named(tmp_path, stop_after):
    import pickle

    import numpy as np

    from robustdiff.data.datasets import DatasetError, load_split

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((4, 3072), np.uint8)}))
    with pytest.raises(DatasetError, match=r"test_batch: not a cifar10 batch \(no 'labels' entry\)"):
        load_split("cifar10", "test", tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}))
    with pytest.raises(DatasetError, match=r"expected \(N, 3072\)"):
        load_split("cifar10", "test", tmp_path)

    run = tmp_path / "run"
    stop_after(2)
    train(compose_train(*TINY, "epochs=2"), run)
    (run / "run.json").write_text('{"dataset": "fashionm')
    with pytest.raises(ConfigError, match=r"run.json: unreadable .*left as it is"):
        train(compose_train(*TINY, "epochs=2"), run)


def test_a_refused_resume_leaves_the_runs_recorded_configuration_as_it_ran(tmp_path):
    import os
    import subprocess
    import sys

    cli = Path(sys.executable).parent / "robustdiff-train"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [str(cli), *TINY, "eval.steps=1", f"run_root={tmp_path}", "name=run"]
    proc = subprocess.run([*argv, "epochs=1"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hydra_dir = tmp_path / "run" / ".hydra"
    recorded = {f: (hydra_dir / f).read_text() for f in ("config.yaml", "hydra.yaml", "overrides.yaml")}
    assert "epochs=1" in recorded["overrides.yaml"]
    proc = subprocess.run([*argv, "epochs=3"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "robustdiff-train: error:" in proc.stderr, proc.stderr[-2000:]
    assert {f: (hydra_dir / f).read_text() for f in recorded} == recorded
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".hydra")) == [".hydra"]


@pytest.mark.parametrize("value", [0, -5])
def test_a_test_subset_of_zero_or_fewer_images_is_refused(value):
    with pytest.raises(ConfigError, match=f"limit_test={value} must be an integer >= 1 .*or null"):
        train(compose_train(*TINY, f"limit_test={value}"), "/nonexistent/never-created")


class _Payload:
    """Pickles to a call that creates a marker file: it shows whether a loader ran the file's code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_file_with_code_in_it_is_refused_without_torchs_advice_and_never_runs(command, tmp_path):
    import os
    import subprocess
    import sys

    marker = tmp_path / "code-ran"
    bad = tmp_path / "network.pt"
    torch.save({"kwargs": {}, "ema": _Payload(marker)}, bad)
    bindir = Path(sys.executable).parent
    argv = ([str(bindir / "robustdiff-generate"), f"network={bad}", "n=10", f"out={tmp_path / 'store'}"]
            if command == "generate" else
            [str(bindir / "robustdiff-eval"), str(bad), "--dataset", "fashionmnist", "--out", str(tmp_path / "ev")])
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"{bad}: cannot be read" in text and "refuses to unpickle" in text, text[-3000:]
    assert "weights_only" not in text and "Traceback" not in text and not marker.exists()
    assert not (tmp_path / "ev").exists() and not (tmp_path / "store").exists()
    assert text.count(str(bad)) == 1, text  # the file is named once


def test_a_truncated_model_given_to_eval_is_named(tmp_path):
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    train(compose_train(*TINY, "epochs=1", "eval.steps=1"), run)
    (run / "model.pt").write_bytes((run / "model.pt").read_bytes()[:2000])
    proc = subprocess.run([str(Path(sys.executable).parent / "robustdiff-eval"), str(run / "model.pt"), "--dataset",
                           "fashionmnist", "--out", str(tmp_path / "ev")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode != 0 and "truncated or corrupt" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "ev").exists()


# --- file-system failures and undecodable arguments: one line naming the path and the fix --------------------

BIN = Path(sys.executable).parent


def _under_a_read_only_mount(directory: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """Run `argv` with a read-only file system mounted on `directory` (a private mount namespace)."""
    script = 'mount -t tmpfs -o ro none "$0" && exec "$@"'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, str(directory), *argv], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _read_only_mounts_work(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    if shutil.which("unshare") is None:
        return False
    proc = _under_a_read_only_mount(probe, ["sh", "-c", f"touch {probe}/x"])
    return "Read-only file system" in proc.stderr


def _unwritable(kind: str, tmp_path: Path):
    """A place nothing can be created in, and how to run a command with it so."""
    if kind == "read-only":
        if not _read_only_mounts_work(tmp_path):
            pytest.skip("no private read-only mounts here (unshare -rm)")
        place = tmp_path / "ro"
        place.mkdir()
        return place, lambda argv: _under_a_read_only_mount(place, argv), "Read-only file system"
    blocker = tmp_path / "a-file"  # a path that runs through a regular file
    blocker.write_text("not a directory")
    return blocker / "below", lambda argv: subprocess.run(argv, capture_output=True, text=True, timeout=120), \
        "Not a directory"


@pytest.mark.parametrize("kind", ["read-only", "through-a-file"])
def test_an_unwritable_destination_is_one_line_naming_it(kind, tmp_path):
    import numpy as np

    np.savez(tmp_path / "a.npz", image=np.zeros((10, 8, 8, 3), np.uint8), label=np.arange(10) % 10)
    store = tmp_path / "store"
    assert subprocess.run([BIN / "robustdiff-store", "import", tmp_path / "a.npz", "--out", store, "--no-progress"],
                          capture_output=True, timeout=120).returncode == 0
    place, run, reason = _unwritable(kind, tmp_path)
    cases = {
        "import": ([BIN / "robustdiff-store", "import", tmp_path / "a.npz", "--out", place / "s", "--no-progress"],
                   "give --out a directory you can write to"),
        "export": ([BIN / "robustdiff-store", "export", store, "--out", place / "b.npz", "--no-progress"],
                   "give an output path you can write to"),
        "train": ([BIN / "robustdiff-train", *TINY, "epochs=1", f"run_root={place / 'runs'}"], "run_root="),
        "edm": ([BIN / "robustdiff-edm", "edm=small", f"run_root={place / 'runs'}"], "run_root="),
    }
    for name, (argv, fix) in cases.items():
        proc = run([str(a) for a in argv])
        assert proc.returncode == 1, (name, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, (name, proc.stderr)
        said = reason
        if name == "export" and kind == "through-a-file":  # export checks its directory itself, first
            said, fix = "does not exist; create it first", ""
        assert str(place) in lines[0] and said in lines[0] and fix in lines[0], (name, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "probe") == sorted(
        ["a.npz", "store", "a-file" if kind == "through-a-file" else "ro"])


def test_an_argument_that_is_not_utf8_is_named_and_hydra_messages_are_kept(tmp_path):
    proc = subprocess.run([BIN / "robustdiff-train", b"name=ab\xff", f"run_root={tmp_path}"], capture_output=True,
                          text=True, errors="replace", timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "LexerNoViableAlt" not in proc.stderr
    assert r"argument 'name=ab\xff' is not valid UTF-8 (byte 0xff)" in proc.stderr
    assert not any(tmp_path.iterdir())
    # Hydra's own messages for a bad choice or key are as Hydra prints them, with no added hint
    proc = subprocess.run([BIN / "robustdiff-train", "model=nope", f"run_root={tmp_path}"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "Could not find 'model/nope'" in proc.stderr and "wrn-16-4" in proc.stderr
    assert "run_root=<dir>" not in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([BIN / "robustdiff-train", "nokey=1", f"run_root={tmp_path}"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "Could not override 'nokey'" in proc.stderr and "+nokey=1" in proc.stderr


def test_eval_and_export_of_an_unfinished_run_say_so_and_record_it(tmp_path, caplog, stop_after):
    from robustdiff.cli import evaluate as cli_eval

    run = tmp_path / "run"
    stop_after(12)
    assert train(compose_train(*TINY, "epochs=2"), run)["interrupted"]
    stop_after(None)
    assert json.loads((run / "summary.json").read_text())["finished"] is False
    (tmp_path / "export").mkdir()
    argv = ["export", str(run), "--out", str(tmp_path / "export" / "model.pt")]
    with caplog.at_level("WARNING"):
        cli_eval.main(argv)
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"{run} is an unfinished run (trained 1 of 2 epochs)" in w and "robustdiff-train" in w for w in said)
    cli_eval.main([str(run), "--attacks", "clean", "--n-examples", "8", "--device", "cpu"])
    warnings = json.loads((run / "eval.json").read_text())["warnings"]
    assert any("unfinished run (trained 1 of 2 epochs)" in w for w in warnings), warnings

    assert train(compose_train(*TINY, "epochs=2"), run)["finished"]  # finished: no such word
    caplog.clear()
    with caplog.at_level("WARNING"):
        cli_eval.main([*argv, "--overwrite"])
    assert not any("unfinished" in r.getMessage() for r in caplog.records)
    cli_eval.main([str(run), "--attacks", "clean", "--n-examples", "8", "--device", "cpu"])
    assert not any("unfinished" in w for w in json.loads((run / "eval.json").read_text())["warnings"])
