"""What the Hydra CLIs share: where the configs are (package data, so a wheel carries them) and the groups
their ``--help`` lists. Light on purpose: torch, Lightning and wandb are imported inside the task functions,
so that ``--help``, ``--cfg``, ``--info`` and shell completion answer at once."""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import OmegaConf

from ..conf.compose import CONF_DIR  # the same files as a directory (compose API)
from ..utils import naming  # noqa: F401  (registers the rd_* resolvers the configs use)

CONFIG_PATH = "pkg://robustdiff.conf"


def config_groups(groups: Iterable[str], conf_dir: str = CONF_DIR) -> str:
    """``group: option, option`` for each of ``groups`` (the package's options; recipes added through
    hydra.searchpath are not listed but can be chosen)."""
    lines = []
    for group in groups:
        options = sorted(p.stem for p in (Path(conf_dir) / group).glob("*.yaml"))
        lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


OmegaConf.register_new_resolver("rd_config_groups", lambda groups: config_groups(groups), replace=True)


# Hydra writes its config copies here, not into .hydra/: a command that is refused (a resume with another
# configuration, a locked run) must not rewrite the record of the run it names. They move to .hydra/ once the
# job has been accepted (publish_hydra_files) and are removed when it is refused (discard_hydra_files).
PENDING_SUBDIR = ".hydra-pending"
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


def remove_unused_run_dir(run_dir: Path) -> bool:
    """After a rejected config: remove the run directory Hydra created for the job if it holds nothing but what
    Hydra wrote there (its ``.hydra/`` config copies and the job's log). Anything else, e.g. the run.json of an
    earlier run, leaves it untouched. Never removes more than those files and the two directories."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    sub = hc.output_subdir
    own = {f"{hc.job.name}.log", *(f"{sub}/{f}" for f in HYDRA_FILES if sub)}
    if not run_dir.is_dir():
        return False
    files = [p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if not p.is_dir()]
    if any(f not in own for f in files):
        return False
    for f in files:
        (run_dir / f).unlink()
    for d in ([run_dir / sub] if sub else []) + [run_dir]:
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    return True



def _pending(run_dir: Path) -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    sub = HydraConfig.get().output_subdir
    return run_dir / sub if sub == PENDING_SUBDIR else None


def publish_hydra_files(run_dir: Path) -> None:
    """Move the accepted job's Hydra config copies into ``<run_dir>/.hydra/`` (each by an atomic rename)."""
    pending = _pending(run_dir)
    if pending is None or not pending.is_dir():
        return
    final = run_dir / ".hydra"
    final.mkdir(exist_ok=True)
    for name in HYDRA_FILES:
        if (pending / name).is_file():
            os.replace(pending / name, final / name)
    if not any(pending.iterdir()):
        pending.rmdir()


def discard_hydra_files(run_dir: Path) -> None:
    """Remove a refused job's Hydra config copies; the run's own ``.hydra/`` stays as it was."""
    pending = _pending(run_dir)
    if pending is None or not pending.is_dir():
        return
    for name in HYDRA_FILES:
        (pending / name).unlink(missing_ok=True)
    if not any(pending.iterdir()):
        pending.rmdir()


def refuse_job(prog: str, error: Exception, run_dir: Path) -> NoReturn:
    """Refuse a training job in one line (``<prog>: error: ...``, exit status 2), leaving no run directory
    behind when Hydra made it for this job only, and an existing run's recorded configuration as it was."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    if not remove_unused_run_dir(run_dir):  # a rejected config leaves no run directory behind
        discard_hydra_files(run_dir)  # and an existing run's recorded configuration as it was
    sys.exit(2)


def run_training_job(prog: str, run_dir: Path, job: Callable[[], dict[str, Any]],
                     after: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run a training job (robustdiff-train, robustdiff-edm) in its Hydra task and return its summary.

    ``job()`` runs under ``sweep.ddp_job`` (under -m: DDP ranks run this job only). What the user can fix (a
    ConfigError, a locked run directory, a bad store, dataset or checkpoint file) is refused by ``refuse_job``
    (exit 2); a full disk is one line naming the file (exit 1); the accepted job's Hydra files are published
    either way (a no-op after a refusal). ``after(summary)`` runs next (robustdiff-train: wait_for_requeue);
    then a run stopped by a signal exits with 128 + the signal (143 for SIGTERM), so ``a && b`` chains stop."""
    # Imported here, not at the top: --help, --cfg, --info and completion need none of torch/Lightning.
    from ..data.datasets import DatasetError
    from ..data.store import StoreError
    from ..training.callbacks import CheckpointFileError
    from ..training.config import ConfigError
    from ..utils.lock import DirectoryLockedError
    from .sweep import ddp_job

    try:
        with ddp_job():  # under -m: DDP ranks run this job only
            summary = job()
    except (ConfigError, DirectoryLockedError, StoreError, DatasetError, CheckpointFileError) as e:
        refuse_job(prog, e, run_dir)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"{prog}: error: {e.strerror}", file=sys.stderr)  # full disk: says which file; the rest is intact
        sys.exit(1)
    finally:
        publish_hydra_files(run_dir)  # a no-op after a refusal (already discarded)
    if after is not None:
        after(summary)
    if summary.get("signal"):
        sys.exit(128 + summary["signal"])  # saved, but not done: `a && b` chains stop (143 for SIGTERM)
    return summary


def _undecodable(arg: str) -> int | None:
    """The first byte of `arg` that was not UTF-8 (Python keeps such bytes as lone surrogates), else None."""
    return next((ord(c) - 0xDC00 for c in arg if "\udc80" <= c <= "\udcff"), None)


_task_started = False
_OWN_FULL_ERROR = "ROBUSTDIFF_HYDRA_ERRORS"


def task_started() -> None:
    """Called first by a task function: from here on a failed file operation is the task's, not the job dir's."""
    global _task_started
    _task_started = True


def run_hydra_command(prog: str, hydra_main: Callable[[], object], write_hint: str) -> None:
    """Run a ``@hydra.main`` command so that what goes wrong before the task starts is said in one line.

    Hydra creates the job's directory before the task function runs and reports a failure there (a read-only
    disk, a path through a file) as a trimmed traceback; an argument that is not UTF-8 reaches its override
    parser as a lexer error. Here the first is one line naming the directory and `write_hint`, the second one
    line naming the argument. Hydra's own messages for bad overrides are printed as Hydra prints them, and
    any other error keeps its full traceback. ``HYDRA_FULL_ERROR=1`` set by the user leaves everything to Hydra.
    """
    if "--version" in sys.argv[1:]:
        from .common import version_line

        print(version_line(prog))
        return
    for arg in sys.argv[1:]:
        byte = _undecodable(arg)
        if byte is not None:
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            sys.exit(f"{prog}: error: argument '{shown}' is not valid UTF-8 (byte 0x{byte:02x}) — write names, "
                     f"paths and values in UTF-8 (or plain ASCII)")
    # (processes this job starts, e.g. DDP ranks, inherit both variables: the second says the first is ours)
    if os.environ.get("HYDRA_FULL_ERROR") == "1" and os.environ.get(_OWN_FULL_ERROR) != "1":
        hydra_main()
        return
    from hydra.errors import CompactHydraException
    from omegaconf.errors import OmegaConfBaseException

    from ..utils.io import describe_os_error

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing, so the error can be told here
    os.environ[_OWN_FULL_ERROR] = "1"
    try:
        hydra_main()
    except CompactHydraException as e:  # a bad override or config choice (some are OSErrors): as Hydra prints it
        print(str(e), file=sys.stderr)
        if isinstance(e.__cause__, OmegaConfBaseException):
            print(str(e.__cause__), file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:  # e.g. `--help | head`: the reader has gone; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:  # before the task: the job directory; within it, whatever file the task named
        print(f"{prog}: error: {describe_os_error(e, '' if _task_started else write_hint)}", file=sys.stderr)
        sys.exit(1)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
        os.environ.pop(_OWN_FULL_ERROR, None)
