"""The shared helpers of ``robustdiff.utils`` on their own: atomic writes and safe loading (``io``), the directory
lock (``lock``), fraction parsing (``choices``), ``_target_`` resolution (``targets``) and run names (``naming``)."""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import CONF_DIR
from robustdiff.utils.choices import parse_fraction
from robustdiff.utils.io import (
    UnreadableWeightsError,
    atomic_path,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    describe_os_error,
    disk_error,
    file_sha256,
    load_weights,
    remove_orphan_temporaries,
)
from robustdiff.utils.lock import LOCK_NAME, DirectoryLock, DirectoryLockedError
from robustdiff.utils.naming import (
    SWEPT_ENV,
    fit_items,
    item_key,
    job_dir,
    override_items,
    run_name,
    swept_keys,
)
from robustdiff.utils.targets import resolve_class


def _temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --- io: atomic writes ---------------------------------------------------------------------------------------

def test_atomic_writes_publish_the_whole_file(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "sub" / "dir" / "b.txt", "héllo")  # missing parents are made
    atomic_write_json(tmp_path / "c.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "dir" / "b.txt").read_bytes() == "héllo".encode()
    text = (tmp_path / "c.json").read_text()
    assert json.loads(text) == {"b": 1, "a": [1, 2]} and text.index('"a"') < text.index('"b"') and text.endswith("\n")
    atomic_write_text(tmp_path / "a.bin", "new")  # replaces an existing file
    assert (tmp_path / "a.bin").read_text() == "new"
    assert _temporaries(tmp_path) == []


def test_atomic_path_writes_beside_the_target_and_renames_only_on_success(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.pt.") and tmp.name.endswith(".tmp")
        tmp.write_text("new")
        assert target.read_text() == "old"  # not yet published
    assert target.read_text() == "new" and not tmp.exists()


def test_an_exception_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="mid-write"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the ne")
            raise RuntimeError("mid-write")
    assert target.read_text() == "old" and _temporaries(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):  # an interrupt too (BaseException)
        with atomic_path(tmp_path / "fresh.json") as tmp:
            tmp.write_text("{")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # absent, not half written


class _SaveFails:
    """Pickling this fails: ``torch.save`` stops part way through the file."""

    def __reduce__(self):
        raise _Unsaveable("mid-save")


class _Unsaveable(Exception):
    pass


def test_a_failed_torch_save_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "w.pt"
    atomic_torch_save({"w": torch.arange(3)}, target)
    with pytest.raises(_Unsaveable, match="mid-save"):
        atomic_torch_save({"w": torch.zeros(1000), "f": _SaveFails()}, target)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(3))
    assert _temporaries(tmp_path) == []


def test_orphan_temporaries_are_removed_and_nothing_else(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    orphans = []
    for d in (tmp_path, tmp_path / "checkpoints"):  # named exactly as atomic_path names them
        fd, name = tempfile.mkstemp(prefix=".last.ckpt.", suffix=".tmp", dir=d)
        os.close(fd)
        orphans.append(Path(name))
    keep = [tmp_path / "model.pt", tmp_path / ".robustdiff.lock", tmp_path / "notes.tmp", tmp_path / ".a.short.tmp"]
    for p in keep:
        p.write_text("x")
    assert sorted(remove_orphan_temporaries(tmp_path)) == sorted(orphans)
    assert all(not p.exists() for p in orphans) and all(p.exists() for p in keep)


def test_file_sha256_is_the_sha256_of_the_bytes_across_read_blocks(tmp_path):
    data = os.urandom(1 << 16) * 80 + b"tail"  # over one 4 MiB block
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


# --- io: failures named ------------------------------------------------------------------------------------

def test_a_full_disk_becomes_an_enospc_error_naming_the_file(tmp_path):
    for error in (OSError(errno.ENOSPC, "No space left on device"), RuntimeError("[enforce fail] unexpected pos 64")):
        e = disk_error(tmp_path / "model.pt", error)
        assert isinstance(e, OSError) and e.errno == errno.ENOSPC
        assert f"writing {tmp_path / 'model.pt'}" in str(e) and "is intact" in str(e)
        assert "unexpected pos" not in str(e)


def test_an_os_error_on_a_temporary_is_named_by_the_file_it_was_writing(tmp_path):
    tmp = tmp_path / ".model.pt.k2j4h_x9.tmp"
    line = describe_os_error(OSError(errno.ENOSPC, "No space left on device", str(tmp)))
    assert line == f"{tmp_path / 'model.pt'}: No space left on device — free some space and run the same command again"
    line = describe_os_error(OSError(errno.EACCES, "Permission denied", "rel/out.json"), hint="pass --out")
    assert line == f"{Path('rel/out.json').absolute()}: Permission denied — pass --out"


# --- io: safe loading ----------------------------------------------------------------------------------------

class _Code:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_load_weights_reads_tensors(tmp_path):
    atomic_torch_save({"w": torch.ones(2, 2), "meta": {"epoch": 3}}, tmp_path / "w.pt")
    state = load_weights(tmp_path / "w.pt")
    assert torch.equal(state["w"], torch.ones(2, 2)) and state["meta"] == {"epoch": 3}


def test_load_weights_refuses_pickled_code_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"w": torch.ones(1), "x": _Code(marker)}, tmp_path / "bad.pt")
    with pytest.raises(UnreadableWeightsError) as e:
        load_weights(tmp_path / "bad.pt", what="a classifier")
    assert not marker.exists()
    assert e.value.pickled and str(e.value).startswith(f"{tmp_path / 'bad.pt'}: cannot be read as a classifier")
    assert "refuses to unpickle" in str(e.value) and "weights_only" not in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # torch's advice is not chained in


def test_load_weights_names_a_truncated_file(tmp_path):
    torch.save({"w": torch.ones(1000)}, tmp_path / "w.pt")
    (tmp_path / "w.pt").write_bytes((tmp_path / "w.pt").read_bytes()[:500])
    with pytest.raises(UnreadableWeightsError, match=r"w\.pt: cannot be read as a weights file: truncated or corrupt"):
        load_weights(tmp_path / "w.pt")
    with pytest.raises(UnreadableWeightsError) as e:
        load_weights(tmp_path / "w.pt")
    assert not e.value.pickled


# --- lock ----------------------------------------------------------------------------------------------------

def test_a_second_holder_is_refused_naming_the_first(tmp_path, lock_holder):
    run = tmp_path / "run"
    with lock_holder(run, what="robustdiff-edm") as holder:
        with pytest.raises(DirectoryLockedError) as e:
            DirectoryLock(run, what="generation").acquire()
        assert e.value.directory == run
        assert e.value.holder.startswith(f"process {holder.pid} on {socket.gethostname()} (robustdiff-edm, since ")
        assert str(e.value).startswith(f"{run}: in use by {e.value.holder}") and "for this generation" in str(e.value)
        recorded = json.loads((run / LOCK_NAME).read_text())
        assert recorded["pid"] == holder.pid and recorded["what"] == "robustdiff-edm"
    with DirectoryLock(run):  # the holder is gone: the lock is free
        pass


def test_a_holder_that_dies_leaves_no_stale_lock(tmp_path, lock_holder):
    with lock_holder(tmp_path) as holder:
        holder.kill()  # no release: the kernel drops the lock
        holder.wait(timeout=30)
        with DirectoryLock(tmp_path):
            pass


def test_the_lock_is_released_on_exit_even_after_an_error(tmp_path):
    (tmp_path / "kept").write_text("x")
    with pytest.raises(ValueError):
        with DirectoryLock(tmp_path, what="training"):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
            with pytest.raises(DirectoryLockedError, match="in use by process"):
                DirectoryLock(tmp_path).acquire()  # a second holder, even in this process
            raise ValueError
    with DirectoryLock(tmp_path):
        pass
    assert (tmp_path / LOCK_NAME).read_text() == ""  # the holder's record is cleared


def test_a_directory_the_lock_made_is_removed_if_nothing_was_written_in_it(tmp_path):
    with DirectoryLock(tmp_path / "refused"):
        pass
    assert not (tmp_path / "refused").exists()
    with DirectoryLock(tmp_path / "ran"):
        (tmp_path / "ran" / "run.json").write_text("{}")
    assert (tmp_path / "ran" / "run.json").exists()


# --- choices.parse_fraction ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [("8/255", 8 / 255), (" 8 / 255 ", 8 / 255), ("0.1", 0.1), (0.0314, 0.0314),
                                            (2, 2.0), ("1e-3", 1e-3), ("0.5/2", 0.25)])
def test_parse_fraction_reads_numbers_and_fractions(value, expected):
    assert parse_fraction(value) == expected


@pytest.mark.parametrize("value", ["8/0", "8/", "a/255", "8/255/2"])
def test_parse_fraction_refuses_a_bad_fraction_saying_how_to_write_one(value):
    with pytest.raises(ValueError, match=f"^{value!r} is not a number or a fraction like 8/255$"):
        parse_fraction(value)


@pytest.mark.parametrize("value", ["eight", "", "8//255"])
def test_parse_fraction_refuses_what_is_not_a_number(value):
    with pytest.raises(ValueError):
        parse_fraction(value)


# --- targets.resolve_class -------------------------------------------------------------------------------------

class TargetError(Exception):
    pass


def _resolve(target, base=collections.abc.Mapping):
    return resolve_class(target, base, what="Mapping", where="data._target_", example="collections.OrderedDict",
                         hint="give a Mapping class whose constructor takes no arguments", error=TargetError)


@pytest.mark.parametrize("target", [None, "", 3])
def test_resolve_class_refuses_a_missing_target_with_an_example(target):
    with pytest.raises(TargetError, match=r"^data\._target_ is missing: .*Mapping class, e\.g\. collections\.OrderedDict"):
        _resolve(target)


def test_resolve_class_refuses_a_target_that_cannot_be_imported():
    with pytest.raises(TargetError, match=r"^data\._target_='no_such_module_xyz\.Thing' cannot be imported \(.+\); "
                                          r"give the dotted path of a Mapping class importable"):
        _resolve("no_such_module_xyz.Thing")
    with pytest.raises(TargetError, match="cannot be imported"):
        _resolve("collections.NoSuchClass")


@pytest.mark.parametrize("target,kind", [("collections.namedtuple", "function"),  # a callable, not a class
                                         ("collections.deque", "type"),  # a class, not a Mapping
                                         ("os.sep", "str")])
def test_resolve_class_refuses_what_is_not_a_subclass_of_the_base(target, kind):
    with pytest.raises(TargetError, match=rf"^data\._target_='{target}' is a {kind}, not a Mapping subclass; give a "
                                          "Mapping class whose constructor"):
        _resolve(target)


def test_resolve_class_returns_a_subclass_of_the_base():
    assert _resolve("collections.OrderedDict") is collections.OrderedDict
    with pytest.raises(ValueError, match="is missing"):  # ValueError unless told otherwise
        resolve_class(None, dict, what="dict", where="x._target_", example="dict", hint="")


# --- naming ----------------------------------------------------------------------------------------------------

def _override_dirname(*overrides: str) -> str:
    """``hydra.job.override_dirname`` of ``robustdiff-train <overrides>``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True).hydra.job.override_dirname


def test_a_rerun_resumes_the_same_run_name_whatever_the_order_and_the_placement_keys():
    first = run_name(None, _override_dirname("epochs=2", "ratio=0.5"), swept=[])
    assert first == "epochs:2__ratio:0.5"
    again = run_name(None, _override_dirname("ratio=0.5", "data_dir=/elsewhere", "progress=false", "epochs=2",
                                             "trainer.devices=1", "logger=none", "run_root=/runs", "eval.batch_size=64"),
                     swept=[])
    assert again == first  # order, paths, devices, logging and progress don't name the run
    assert run_name(None, _override_dirname("epochs=3", "ratio=0.5"), swept=[]) != first  # a setting does


def test_a_given_name_wins_and_unsafe_characters_are_replaced():
    assert run_name("mine", "epochs:2", swept=[]) == "mine"
    for none in (None, "", "None", "null"):
        assert run_name(none, "epochs:2", swept=[]) == "epochs:2"
        assert run_name(none, "", swept=[]) == "default"
    assert run_name("a b=c,d/e", swept=[]) == "a_b_c_d_e"  # no '=' or ',': the name can be an override value
    assert run_name("...", swept=[]) == "default"


def test_run_name_reads_the_running_sweeps_keys(monkeypatch):
    monkeypatch.setenv(SWEPT_ENV, json.dumps(["ratio"]))
    assert swept_keys() == ["ratio"]
    assert run_name(None, "epochs:2__ratio:0.5") == "ratio:0.5__epochs:2"
    monkeypatch.setenv(SWEPT_ENV, "not json")
    assert swept_keys() == [] and run_name(None, "epochs:2__ratio:0.5") == "epochs:2__ratio:0.5"
    monkeypatch.delenv(SWEPT_ENV)
    assert swept_keys() == []


def test_override_items_keep_a_value_holding_the_separator_whole():
    assert override_items("a:1__b:x__y__+c:2") == ["a:1", "b:x__y", "+c:2"]
    assert override_items("") == []
    assert [item_key(i) for i in ("+c:2", "++d:1", "~e", "f.g:h:i")] == ["c", "d", "e", "f.g"]


def test_a_long_sweep_name_drops_constant_keys_never_a_swept_value():
    items = ["ratio:0.5", *[f"k{i}:{'v' * 20}" for i in range(10)], "norm:l2"]
    name = fit_items(items, ["ratio", "norm"], 80)
    assert len(name) <= 80 and name.startswith("ratio:0.5__norm:l2__k0:")
    assert name == fit_items(items, ["ratio", "norm"], 80)  # stable
    assert name != fit_items([*items[:-2], "k9:other", "norm:l2"], ["ratio", "norm"], 80)  # a hash of the full name
    assert fit_items(["a:1", "b:2"], [], 80) == "a:1__b:2"  # short names are kept whole


def test_a_sweep_job_dir_is_absolute_and_named_like_a_single_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(SWEPT_ENV, raising=False)
    assert job_dir("runs", None, "epochs:2") == str(Path.cwd() / "runs" / "epochs:2")
    assert job_dir("runs", "mine", "epochs:2") == str(Path.cwd() / "runs" / "mine")


# -- signals -----------------------------------------------------------------------------------------------


def test_stop_signals_note_a_real_signal_and_put_the_handlers_back(capsys):
    import os
    import signal
    import time

    from robustdiff.utils.signals import StopSignals

    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals("the end of this shard") as stop:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while stop.received is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert stop.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_first_ctrl_c_says_when_the_job_stops_and_a_second_stops_at_once(capsys):
    import signal

    import pytest

    from robustdiff.utils.signals import stop_requested

    assert stop_requested(signal.SIGINT, None, "the end of this shard") == signal.SIGINT
    assert "saving the run at the end of this shard" in capsys.readouterr().out
    assert stop_requested(signal.SIGTERM, None) == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        stop_requested(signal.SIGINT, signal.SIGINT)
