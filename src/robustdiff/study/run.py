"""Running a study end to end (the job behind ``robustdiff-study``): find and fix its study file in the study
directory, run the flow the file asks for (the generator-quality study, or the study that lists its stores and
arms), keep the seconds of every stage in ``<out>/timing.json`` (summed over invocations, an interrupted one
included) and write the report once every stage is done.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .spec import StudyError, is_listed, load_study, resolve_study
from .stages import stage


@dataclass(frozen=True)
class StudyResult:
    """``report``: the study's report.md; ``complete``: whether it was written (a study listing its arms whose
    arms are not all trained and evaluated yet leaves it for a later run)."""

    report: Path
    complete: bool


def run_study(study: Path, out: Path, data_dir: str = "data", report_only: bool = False,
              arms: Sequence[str] | None = None, generator: Path | None = None,
              ship_generator: Path | None = None) -> StudyResult:
    """Run (or resume) the study ``study`` (a file, or a shipped study's name) in ``out``.

    ``report_only``: only (re)write the report from what exists. ``arms``: for a study listing its arms, train
    and evaluate only these (None: all of them). ``generator``: a shipped generator folder whose snapshots the
    study takes instead of training its EDM (checked against the study and by sha256; see `study.generator`).
    ``ship_generator``: only copy the study's finished generators, with their provenance, into that folder.
    Raises `StudyError` for a study that cannot be run as asked."""
    from ..evaluation.arms_report import write_arms_report
    from ..evaluation.study_report import write_study_report as write_quality_report

    path = resolve_study(study)  # before anything is created
    out.mkdir(parents=True, exist_ok=True)
    spec = load_study(path, out)
    listed = is_listed(spec)
    if arms and not listed:
        raise StudyError(f"--arms: {study} does not list its arms (no arms: section)")
    write_report = write_arms_report if listed else write_quality_report
    if ship_generator is not None:
        from .generator import ship_generator as ship

        provenance = ship(spec, out, ship_generator)
        print(f"robustdiff-study: generators {', '.join(spec.generators)} shipped to {ship_generator} ({provenance})")
        return StudyResult(provenance, True)
    if generator is not None:
        from .generator import seed_generator

        seed_generator(spec, out, generator)
    if report_only:
        return StudyResult(write_report(out, spec), True)
    timing_path = out / "timing.json"

    def timed(key: str, t0: float) -> None:
        """Seconds per stage over every invocation (an interrupted one included), added after each stage."""
        add_seconds(timing_path, key, time.monotonic() - t0)

    if listed:
        from .listed import run_listed_study

        only = [a for a in arms if a] if arms else None
        _, done = run_listed_study(spec, out, data_dir, only, timed)
        if not done:
            return StudyResult(out / "report.md", False)
        stage("report")
    else:
        from .quality_study import run_quality_study

        run_quality_study(spec, out, data_dir, timed)
        stage("9/9 report")
    return StudyResult(write_report(out, spec), True)


def add_seconds(path: Path, key: str, seconds: float) -> dict[str, float]:
    """Add ``seconds`` to ``key`` and to "wall" in the JSON file ``path``, read and written under an exclusive
    lock: two study commands run side by side (``--arms``) each add their own time, neither overwrites the
    other's. "wall" is the sum over all commands, so two commands side by side count their overlap twice."""
    from ..utils.io import atomic_write_json

    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no locking
        fcntl = None
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # blocking: the other command holds it for milliseconds
        totals: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
        totals[key] = totals.get(key, 0.0) + seconds
        totals["wall"] = totals.get("wall", 0.0) + seconds
        atomic_write_json(path, totals)
    return totals
