"""Hydra multirun sweeps of robustdiff-train, through the real command line: one run directory per job, named
from its overrides; re-running resumes unfinished jobs and skips finished ones; a report over the sweep's jobs
at the end; W&B runs grouped by sweep; DDP jobs whose re-launched ranks run only their own job."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from robustdiff_aids import aids_vars

from conftest import TINY
from wandb_records import _chunks

CLI = Path(sys.executable).parent / "robustdiff-train"


def sweep(tmp_path: Path, *overrides: str, env_extra: dict | None = None,
          code: int = 0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}  # W&B offline
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})})
    tiny = [o for o in TINY if not any(o.startswith(k.split("=")[0] + "=") for k in overrides)]
    proc = subprocess.run([str(CLI), "-m", *tiny, "epochs=1", f"run_root={tmp_path / 'runs'}", *overrides],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_dirs(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "runs").iterdir() if (p / "run.json").is_file())


def report_path(proc: subprocess.CompletedProcess) -> Path:
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "sweep report" in ln]
    assert len(lines) == 1, lines  # written once, by the launching process only
    return Path(lines[0].rsplit(": ", 1)[1])


def wandb_groups(run_dir: Path) -> set[str]:
    """The W&B group of every offline run in ``run_dir`` (a resumed run adds one)."""
    from wandb.proto import wandb_internal_pb2 as pb

    groups = set()
    for path in (run_dir / "wandb").glob("offline-run-*/*.wandb"):
        for raw in _chunks(path.read_bytes()):
            rec = pb.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") == "run":
                groups.add(rec.run.run_group)
    return groups


@pytest.mark.slow
def test_sweep_resumes_unfinished_jobs_and_groups_wandb_runs(tmp_path):
    """A SIGTERM after 2 steps stops the sweep in its first job (saved, exit 143); the same sweep again resumes
    that job from last.ckpt and runs the other."""
    env = {"HOME": str(tmp_path), "WANDB_SILENT": "true"}  # no ~/.netrc login either
    tiny_wandb = ("logger=wandb", "norm=linf,l2")
    sweep(tmp_path, *tiny_wandb, env_extra={**env, **aids_vars(stop_after_steps=2)}, code=143)
    (first,) = run_dirs(tmp_path)
    assert json.loads((first / "run.json").read_text())["norm"]["name"] == "linf"
    assert (first / "checkpoints" / "last.ckpt").is_file()
    assert not (first / "summary.json").is_file()  # stopped in the first epoch
    proc = sweep(tmp_path, *tiny_wandb, env_extra=env)
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 2 and {json.loads((d / "run.json").read_text())["norm"]["name"] for d in dirs} == {"linf", "l2"}
    assert proc.stdout.count("resuming") == 1, proc.stdout[-3000:]  # the first job; the second starts
    for d in dirs:
        assert json.loads((d / "summary.json").read_text())["finished"]
    groups = set.union(*(wandb_groups(d) for d in dirs))
    assert len(groups) == 1 and groups.pop().startswith("norm:linf,l2__batch_size:32__epochs:1"), groups  # swept first
    md = report_path(proc)
    text = md.read_text()
    assert md.parent.parent.name == "sweeps" and all(d.name in text for d in dirs)


@pytest.mark.slow
def test_ddp_sweep_makes_one_directory_per_job_and_skips_finished_jobs(tmp_path):
    ddp = ("seed=0,1", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    proc = sweep(tmp_path, *ddp)
    dirs = run_dirs(tmp_path)
    others = [p.name for p in (tmp_path / "runs").iterdir() if p.is_dir() and p not in dirs]
    assert len(dirs) == 2 and others == ["sweeps"], (dirs, others)
    for d in dirs:
        assert json.loads((d / "summary.json").read_text())["finished"]
        assert json.loads((d / "run.json").read_text())["seed"] in (0, 1)
        assert (d / "train_ddp_process_1.log").is_file()  # rank 1 of this job ran in this directory
    assert {json.loads((d / "run.json").read_text())["seed"] for d in dirs} == {0, 1}
    # Each job started its own rank 1 (no rank left over from the previous job joined the next one).
    assert proc.stdout.count("Initializing distributed: GLOBAL_RANK: 1") + \
        proc.stderr.count("Initializing distributed: GLOBAL_RANK: 1") == 2
    md = report_path(proc)
    assert md.is_file() and md.with_name("report.csv").is_file()
    figures = sorted(p.name for p in (md.parent / "figures").glob("*.png"))
    assert len(figures) == 3 and "_sweep.png" in figures, figures  # one per job, and the sweep overlay

    mtimes = {d: (d / "checkpoints" / "last.ckpt").stat().st_mtime_ns for d in dirs}
    again = sweep(tmp_path, *ddp)
    assert again.stdout.count("already finished") == 2
    assert "Initializing distributed" not in again.stdout + again.stderr
    assert run_dirs(tmp_path) == dirs
    assert {d: (d / "checkpoints" / "last.ckpt").stat().st_mtime_ns for d in dirs} == mtimes
    assert report_path(again) == md


def test_sweep_names_lead_with_swept_values_and_its_folder_reports_exactly_its_jobs(tmp_path):
    """Constant overrides long enough that the names must be cut: the cut drops constant keys, never the swept
    value (which sorts last); the sweep's folder has its multirun.yaml and jobs.txt, and robustdiff-report on
    it reports its two jobs only, not another run in the same run_root."""
    long = ("label_smoothing=0.10000000000000000001", "momentum=0.90000000000000000001")  # ~210 characters in all
    proc = sweep(tmp_path, *long, "weight_decay=0.0005,0.001")
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 2, dirs
    assert sorted(d.name.split("__")[0] for d in dirs) == ["weight_decay:0.0005", "weight_decay:0.001"]
    # Cut (a hash of the full name ends it) by dropping the last constant keys, not by cutting the swept value.
    assert all(len(d.name) <= 120 and "val_size" not in d.name and "batch_size:32" in d.name for d in dirs)
    folders = list((tmp_path / "runs" / "sweeps").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("weight_decay:0.0005_0.001__"), folders
    folder = folders[0]
    assert (folder / "multirun.yaml").is_file() and not (tmp_path / "runs" / "multirun.yaml").exists()
    assert sorted((folder / line).resolve() for line in (folder / "jobs.txt").read_text().split()) == \
        [d.resolve() for d in dirs]
    assert report_path(proc).parent == folder
    other = tmp_path / "runs" / "another-run"
    other.mkdir()
    (other / "run.json").write_text((dirs[0] / "run.json").read_text())
    out = subprocess.run([str(CLI.with_name("robustdiff-report")), str(folder), "--out", str(tmp_path / "rep")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = (tmp_path / "rep" / "report.md").read_text()
    assert all(d.name in text for d in dirs) and "another-run" not in text
