"""robustdiff-report: training curves and a comparison table for one run directory or a sweep.

    robustdiff-report PATH [--out DIR] [--wandb-project P [--wandb-entity E]]

Writes report.md, report.csv and figures/<run>.png (with two or more TRADES runs also figures/_sweep.png; with
EDM runs figures/_edm-loss.png) into DIR (default PATH).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ..utils.extras import missing_extra
from .common import argument_parser

log = logging.getLogger("robustdiff.report")


def build_parser() -> argparse.ArgumentParser:
    p = argument_parser("robustdiff-report", description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path, help="a run directory (with run.json), a directory of runs, or a sweep's folder "
                                           "(<run_root>/sweeps/<sweep>: exactly the jobs its jobs.txt lists)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: PATH)")
    p.add_argument("--wandb-project", default=None, help="also log the table and curves to this W&B project")
    p.add_argument("--wandb-entity", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Here, not at the top: --help answers without torch.
    from ..evaluation.report import write_report
    from .sweep import JOBS_FILE, read_jobs, report_root

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    wandb_run = None
    if args.wandb_project:
        if missing := missing_extra("wandb", "--wandb-project"):
            raise SystemExit(f"robustdiff-report: {missing}")
        import wandb

        from ..training.logging import resolve_mode

        wandb_run = wandb.init(project=args.wandb_project, entity=args.wandb_entity, job_type="report",
                               mode=resolve_mode("auto"),
                               name=f"report-{args.path.resolve().name}")
    try:
        jobs = read_jobs(args.path)  # a sweep's folder: its own jobs, which live in <run_root>/<job>
        if jobs is None:
            rows = write_report(args.path, args.out, wandb_run=wandb_run)
        else:
            done = [d for d in jobs if (d / "run.json").is_file()]
            if not done:
                raise FileNotFoundError(f"{args.path / JOBS_FILE}: none of its {len(jobs)} job directories has a "
                                        f"run.json yet (the sweep has not started them)")
            rows = write_report(report_root(done), args.out or args.path, wandb_run=wandb_run, runs=done,
                                title=f"robustdiff sweep {args.path.resolve().name}: {len(done)} of {len(jobs)} job(s)")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"robustdiff-report: {e}") from None
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    out = args.out or args.path
    standard = sum(str(r.get("training", "")).startswith("standard") for r in rows)
    kinds = f"{len(rows) - standard} adversarial" + (f" and {standard} standard (loss=ce)" if standard else "")
    log.info("%s training run(s); wrote %s, %s and figures/", kinds, out / "report.md", out / "report.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
