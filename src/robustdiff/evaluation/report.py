"""Reports over training runs: a comparison table (report.md, report.csv) with the figures beside it.

``write_report`` (what ``robustdiff-report`` runs) reports on one run directory or a sweep (any directory
with run directories below it). The report has the TRADES table, a sweep figure (validation and test PGD per
epoch, one line per run, labelled by the settings that differ between the runs), each run's training curves,
and a section for EDM runs (their latest sample grid and training loss).

Accuracies are fractions in the run files; tables and plots show percentages.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..utils.io import atomic_write_text
from .paper import paper_result
from .plots import plot_edm_losses, plot_sweep, plot_training_curves
from .results import format_count, format_eps
from .runs import Run, edm_losses, find_runs, load_run, pgd_steps, sample_grids, swept_settings

# The gap (test PGD, best minus last, in points) beyond which a run is flagged as robustly overfitting.
OVERFIT_GAP = 3.0

# (key, header) of the comparison table, in order.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("run", "run"),
    ("training", "training"),
    ("dataset", "dataset"),
    ("norm", "norm"),
    ("eps", "ε"),
    ("model", "model"),
    ("ratio", "ratio"),
    ("epochs", "epochs"),
    ("n_generated", "generated"),
    ("gen_fd", "generated FD"),
    ("gen_label_agreement", "label agreement (%)"),
    ("best_epoch", "best epoch"),
    ("pgd_steps", "PGD steps"),
    ("clean_best", "clean best (%)"),
    ("pgd_best", "PGD best (%)"),
    ("clean_last", "clean last (%)"),
    ("pgd_last", "PGD last (%)"),
    ("pgd_gap", "PGD best−last"),
    ("eval_clean", "eval clean (%)"),
    ("eval_pgd_steps", "eval PGD steps"),
    ("eval_pgd", "eval PGD (%)"),
    ("autoattack", "AutoAttack (%)"),
    ("eval_n", "eval points"),
    ("paper_clean", "paper clean (%)"),
    ("paper_autoattack", "paper AA (%)"),
    ("finished", "finished"),
)


# --- EDM runs ----------------------------------------------------------------------------------------

def edm_row(run: Run, root: Path | None = None) -> dict[str, Any]:
    """One row of the EDM table: the network, how far training got, the last logged loss, the latest grid."""
    c, s = run.config, run.summary or {}
    kimgs, losses = edm_losses(run.path)
    grids = sample_grids(run.path)
    label_dim = c.get("label_dim")
    return {
        "run": run.name, "path": _relpath(run.path, root), "dataset": c.get("dataset"),
        "resolution": c.get("resolution"), "network": c.get("network"),
        "conditional": None if label_dim is None else bool(label_dim), "batch_size": c.get("batch_size"),
        "kimg": s.get("kimg"), "duration_kimg": c.get("duration_kimg"), "steps": s.get("steps"),
        "loss_last": round(losses[-1], 4) if losses else None, "finished": s.get("finished"),
        "grid": grids[-1] if grids else None,
    }


EDM_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run", "run"), ("dataset", "dataset"), ("resolution", "resolution"), ("network", "network"),
    ("conditional", "conditional"), ("batch_size", "batch"), ("kimg", "kimg"), ("duration_kimg", "of kimg"),
    ("loss_last", "last loss"), ("finished", "finished"),
)


# --- table -------------------------------------------------------------------------------------------

def _p(v: Any) -> float | None:
    return None if v is None else round(100 * float(v), 2)


def _relpath(run_dir: Path, root: Path | None) -> str:
    if root is None or run_dir == root:
        return run_dir.name
    return run_dir.relative_to(root).as_posix()


def generated_quality(config: dict[str, Any]) -> dict[str, Any] | None:
    """The latest quality measurement (robustdiff-fid) of a run's generated data: recorded in run.json when the
    run started, else read from the store's manifest when the store is still there."""
    records = config.get("generated_quality")
    if not records and config.get("generated"):
        manifest = Path(str(config["generated"])) / "manifest.json"
        if manifest.is_file():
            try:
                records = json.loads(manifest.read_text()).get("quality")
            except (OSError, json.JSONDecodeError):
                records = None
    if not records:
        return None
    fids = [q for q in records if q.get("metric") == "fid"]  # FID where measured, else classifier FD
    return (fids or records)[-1]


def run_row(run: Run, root: Path | None = None) -> dict[str, Any]:
    """One comparison-table row: settings, best/last accuracies (%), eval.json results, the paper's numbers."""
    c, s, e = run.config, run.summary or {}, run.evaluation or {}
    norm = c.get("norm") or {}
    model = c.get("model") or {}
    model_name = f"wrn-{model['depth']}-{model['width']}" if model.get("depth") else model.get("name")
    paper = paper_result(c.get("dataset", ""), norm.get("name", ""), model_name or "", c.get("n_generated") or 0,
                         epochs=c.get("epochs"))
    aa = e.get("autoattack") or {}
    gap = None
    if s.get("test_pgd_acc_best") is not None and s.get("test_pgd_acc_last") is not None:
        gap = round(100 * (s["test_pgd_acc_best"] - s["test_pgd_acc_last"]), 2)
    warnings = list(e.get("warnings") or [])
    if gap is not None and gap > OVERFIT_GAP:
        warnings.append(f"robust overfitting: test PGD fell {gap:.2f} points from the best to the last epoch")
    if s and not s.get("finished", True):
        warnings.append("training has not finished")
    if not s:
        warnings.append("no summary.json")
    quality = generated_quality(c) if c.get("generated") else None
    gen_fd = None
    if quality is not None:
        gen_fd = f"{quality['value']:.2f} ({'FID' if quality.get('metric') == 'fid' else 'clf'})"
    return {
        "run": run.name,
        "training": training_kind(run),
        "path": _relpath(run.path, root),
        "dataset": c.get("dataset"),
        "norm": norm.get("name"),
        "eps": format_eps(norm["eps"]) if norm.get("eps") else None,
        "model": model_name,
        "ratio": c.get("ratio"),
        "epochs": c.get("epochs"),
        "n_generated": c.get("n_generated") or 0,
        "gen_fd": gen_fd,
        "gen_label_agreement": _p(quality.get("label_agreement")) if quality else None,
        "best_epoch": s.get("best_epoch"),
        "last_epoch": s.get("last_epoch"),
        "pgd_steps": pgd_steps(run),
        "clean_best": _p(s.get("test_clean_acc_best")),
        "pgd_best": _p(s.get("test_pgd_acc_best")),
        "clean_last": _p(s.get("test_clean_acc_last")),
        "pgd_last": _p(s.get("test_pgd_acc_last")),
        "pgd_gap": gap,
        "eval_clean": _p((e.get("clean") or {}).get("acc")),
        "eval_pgd": _p((e.get("pgd") or {}).get("acc")),
        "eval_pgd_steps": (e.get("pgd") or {}).get("steps"),
        "autoattack": _p(aa.get("robust_acc")),
        "autoattack_version": aa.get("version"),
        "autoattack_flags": ",".join(aa.get("flags") or []) or None,
        "eval_n": e.get("n_examples"),
        "paper_clean": paper.clean if paper else None,
        "paper_autoattack": paper.autoattack if paper else None,
        "finished": s.get("finished"),
        "warnings": warnings,
    }


def training_kind(run: Run) -> str:
    """How the run was trained, as the table says it: TRADES (the paper), PGD-AT, or standard (no attack)."""
    loss = run.config.get("loss") or "trades"
    kind = {"trades": "TRADES", "pgd_at": "PGD-AT", "pgd_at_train": "PGD-AT (train mode)", "ce": "standard"}
    name = kind.get(loss, loss)
    return f"{name}, by clean" if run.selected_by == "clean accuracy" else name


def table_rows(runs: Sequence[Run], root: Path | None = None) -> list[dict[str, Any]]:
    """Rows for all runs, sorted by dataset, norm, ratio, epochs, generated count, name."""
    rows = [run_row(r, root) for r in runs]
    return sorted(rows, key=lambda r: (str(r["dataset"]), str(r["norm"]), r["ratio"] if r["ratio"] is not None else 2,
                                       r["epochs"] or 0, r["n_generated"], r["run"]))


# Columns averaged over the seeds of one setting (key, header).
SEED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("clean_best", "clean best (%)"), ("pgd_best", "PGD best (%)"), ("pgd_last", "PGD last (%)"),
    ("pgd_gap", "PGD best−last"), ("autoattack", "AutoAttack (%)"))


def seed_groups(runs: Sequence[Run], rows: Sequence[dict[str, Any]], root: Path | None = None) -> list[dict[str, Any]]:
    """Runs that differ only in ``seed``, grouped: per group its setting (what differs from the other groups), its
    runs, and per column of SEED_COLUMNS the mean, the sample standard deviation and the range over its seeds.
    Only groups of two or more seeds are returned; an empty list when no run repeats a setting."""
    settings = swept_settings(runs)
    if not any("seed" in s for s in settings.values()):
        return []
    by_path = {r["path"]: r for r in rows}
    groups: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for run in runs:
        setting = {k: v for k, v in settings[str(run.path)].items() if k != "seed"}
        key = json.dumps(setting, sort_keys=True, default=str)
        groups.setdefault(key, []).append((setting, by_path[_relpath(run.path, root)]))
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        group: dict[str, Any] = {"setting": members[0][0], "runs": sorted(r["run"] for _, r in members),
                                 "n": len(members)}
        for key, _ in SEED_COLUMNS:
            values = [r[key] for _, r in members if r.get(key) is not None]
            if len(values) < 2:
                group[key] = None
                continue
            mean = sum(values) / len(values)
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            group[key] = {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "n": len(values)}
        out.append(group)
    return sorted(out, key=lambda g: json.dumps(g["setting"], sort_keys=True, default=str))


def _seed_cell(key: str, v: dict[str, Any] | None, seeds: int) -> str:
    """mean ± sd (lowest to highest), and how many seeds have the value where some lack it (e.g. no AutoAttack)."""
    if v is None:
        return "—"
    f = "+.2f" if key == "pgd_gap" else ".2f"
    part = "" if v["n"] == seeds else f"; {v['n']} of {seeds} seeds"
    return f"{v['mean']:{f}} ± {v['sd']:.2f} ({v['min']:{f}} to {v['max']:{f}}{part})"


def _setting_label(setting: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(setting.items())) or "(one setting)"


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "—"
    if key == "n_generated":
        return format_count(v)
    if key == "pgd_gap":
        return f"{v:+.2f}"
    if isinstance(v, float) and key != "ratio":
        return f"{v:.2f}"
    return str(v)


def render_markdown(rows: Sequence[dict[str, Any]], figures: dict[str, str], title: str, *,
                    sweep_figure: str | None = None, edm_rows: Sequence[dict[str, Any]] = (),
                    edm_loss_figure: str | None = None, seeds: Sequence[dict[str, Any]] = ()) -> str:
    """report.md: the TRADES table, the sweep figure, each run's curves, the EDM section, the warnings. Figure
    paths are relative to the report; ``edm_rows[i]["grid"]`` too."""
    lines = [f"# {title}", ""]
    if rows:
        standard = sum(r.get("training", "").startswith("standard") for r in rows)
        counted = f"{len(rows) - standard} adversarial training run(s)" + (
            f" and {standard} standard training run(s) (loss=ce, no attack: measuring classifiers, not robust "
            "models)" if standard else "")
        lines += [f"{counted}. Accuracies in %. *best* = the checkpoint with the best validation PGD, or the best "
                  "validation clean accuracy where *training* says *by clean* "
                  "(model.pt; *PGD steps* = the attack's steps during training), *last* = the final epoch; eval and "
                  "AutoAttack columns come from eval.json (best checkpoint; see *eval points* for how many test "
                  "images). *generated FD*: the generated data's FID, or (clf) its classifier FD, with the "
                  "classifier's label agreement (robustdiff-fid score). Paper columns: Wang et al. (ICML 2023) for "
                  "the same dataset, norm, model and amount of generated data, when published.", ""]
        lines.append("| " + " | ".join(h for _, h in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        for r in rows:
            cells = []
            for key, _ in COLUMNS:
                cell = _fmt(key, r.get(key))
                if key == "autoattack" and r.get("autoattack") is not None and r.get("autoattack_version") != "standard":
                    cell += " (subset)"
                cells.append(cell.replace("|", "\\|"))
            lines.append("| " + " | ".join(cells) + " |")
    if seeds:
        lines += ["", "## Over seeds", "", "Runs that differ only in their seed, per setting: mean ± sample standard "
                  "deviation over the seeds (lowest to highest). Accuracies in %.", "",
                  "| setting | seeds | " + " | ".join(h for _, h in SEED_COLUMNS) + " |",
                  "|" + "---|" * (len(SEED_COLUMNS) + 2)]
        for g in seeds:
            cells = [_setting_label(g["setting"]), str(g["n"])] + [_seed_cell(k, g.get(k), g["n"]) for k, _ in SEED_COLUMNS]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if sweep_figure:
        lines += ["", "## Sweep", "", "Validation and test PGD accuracy per epoch, one line per run, labelled by the "
                  "settings that differ between the runs (★: each run's best epoch).", "",
                  f"![sweep]({sweep_figure})", ""]
    if figures:
        lines += ["", "## Training curves", ""]
        for r in rows:
            if r["path"] in figures:
                lines += [f"### {r['run']}", "", f"![{r['run']}]({figures[r['path']]})", ""]
    if edm_rows:
        lines += ["", "## EDM runs", "", f"{len(edm_rows)} generator run(s) (robustdiff-edm). *kimg*: thousands of "
                  "training images seen; *last loss*: the last logged training loss (logger=csv). Sample grids: the "
                  "EMA network at the latest snapshot, one row per class.", ""]
        lines.append("| " + " | ".join(h for _, h in EDM_COLUMNS) + " |")
        lines.append("|" + "---|" * len(EDM_COLUMNS))
        for r in edm_rows:
            lines.append("| " + " | ".join(_fmt(k, r.get(k)).replace("|", "\\|") for k, _ in EDM_COLUMNS) + " |")
        if edm_loss_figure:
            lines += ["", f"![EDM training loss]({edm_loss_figure})"]
        for r in edm_rows:
            lines += ["", f"### {r['run']}", ""]
            lines.append(f"![{r['run']} samples]({r['grid']})" if r.get("grid") else "no sample grid yet")
            if r.get("loss_last") is None:
                lines += ["", "no training loss recorded (logged with logger=csv)"]
    notes = [(r["run"], w) for r in rows for w in r["warnings"]]
    if notes:
        lines += ["", "## Warnings", ""] + [f"- **{name}**: {w}" for name, w in notes]
    return "\n".join(lines).rstrip() + "\n"


def render_csv(rows: Sequence[dict[str, Any]]) -> str:
    keys = ["path"] + [k for k, _ in COLUMNS] + ["last_epoch", "autoattack_version", "autoattack_flags", "warnings"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(keys)
    for r in rows:
        writer.writerow(["" if r.get(k) is None else ("; ".join(r[k]) if k == "warnings" else r[k]) for k in keys])
    return buf.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def write_report(path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                 wandb_run: Any = None, runs: Sequence[str | os.PathLike] | None = None,
                 title: str | None = None) -> list[dict[str, Any]]:
    """Report on one run or a sweep: ``report.md``, ``report.csv`` and ``figures/<run>.png`` in ``out_dir``
    (default: ``path``). ``runs``: exactly these run directories (paths shown relative to ``path``) instead of
    every run found below ``path``. With two or more TRADES runs, ``figures/_sweep.png`` overlays them; EDM runs
    get their own section (``figures/_edm-loss.png`` and their latest sample grids). With ``wandb_run`` (a wandb
    Run), also logs the table and the figures. Returns the TRADES rows.
    """
    root = Path(path)
    out_dir = Path(out_dir) if out_dir is not None else root
    runs_ok, skipped = [], []
    for d in (find_runs(root) if runs is None else runs):
        try:
            runs_ok.append(load_run(d))
        except (OSError, ValueError) as e:  # one damaged run must not hide the others
            skipped.append(f"{d}: skipped — {e}")
    edm_runs = [r for r in runs_ok if r.is_edm]
    runs = [r for r in runs_ok if not r.is_edm]
    rows = table_rows(runs, root)
    figures: dict[str, str] = {}
    for run in runs:
        key = _relpath(run.path, root)
        if run.history:
            png = out_dir / "figures" / f"{_slug(key)}.png"
            plot_training_curves(run, png)
            figures[key] = os.path.relpath(png, out_dir)
    # Figure names of the whole report start with "_", which no run's (_slug-ed) name does.
    sweep_png = None
    curves = [r for r in runs if r.history]
    if len(curves) >= 2:
        sweep_png = plot_sweep(curves, out_dir / "figures" / "_sweep.png", title=title or f"sweep: {root}")
    edm_rows = [edm_row(r, root) for r in edm_runs]
    for r in edm_rows:
        if r["grid"] is not None:
            r["grid"] = os.path.relpath(r["grid"], out_dir)
    edm_png = plot_edm_losses(edm_runs, out_dir / "figures" / "_edm-loss.png") if edm_runs else None
    text = render_markdown(rows, figures, title or f"robustdiff report: {root}",
                           sweep_figure=os.path.relpath(sweep_png, out_dir) if sweep_png else None,
                           edm_rows=edm_rows, edm_loss_figure=os.path.relpath(edm_png, out_dir) if edm_png else None,
                           seeds=seed_groups(runs, rows, root))
    if skipped:
        text += "\n## Skipped runs\n\n" + "".join(f"- {line}\n" for line in skipped)
        for line in skipped:
            print(f"robustdiff-report: {line}")
    atomic_write_text(out_dir / "report.md", text)
    atomic_write_text(out_dir / "report.csv", render_csv(rows))
    if wandb_run is not None:
        import wandb

        keys = ["path"] + [k for k, _ in COLUMNS]
        table = wandb.Table(columns=keys, data=[[r.get(k) for k in keys] for r in rows])
        payload: dict[str, Any] = {"report/runs": table}
        for key, rel in figures.items():
            payload[f"report/curves/{_slug(key)}"] = wandb.Image(str(out_dir / rel))
        if sweep_png is not None:
            payload["report/sweep"] = wandb.Image(str(sweep_png))
        if edm_png is not None:
            payload["report/edm/loss"] = wandb.Image(str(edm_png))
        for r in edm_rows:
            if r["grid"] is not None:
                payload[f"report/edm/samples/{_slug(r['path'])}"] = wandb.Image(str(out_dir / r["grid"]))
        wandb_run.log(payload)
    return rows
