"""Reports over training runs: training curves (the robust-overfitting view) and a comparison table.

A run directory is any directory holding ``run.json`` (written by robustdiff-train, with
``history.json``/``history.csv``, ``summary.json`` and, after robustdiff-eval, ``eval.json``; or by
robustdiff-edm, with ``samples/grid-<kimg>.png`` and, with ``logger=csv``, the training loss in
``csv/version_<k>/metrics.csv``). A sweep is any directory with run directories somewhere below it.

The report has the TRADES table, a sweep figure (validation and test PGD per epoch, one line per run,
labelled by the settings that differ between the runs), each run's training curves, and a section for
EDM runs (their latest sample grid and training loss).

Accuracies are fractions in the run files; tables and plots show percentages.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils.io import atomic_path, atomic_write_text
from .robustness import format_count, format_eps, paper_result

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


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # run.json
    history: list[dict[str, Any]]  # one row per epoch, missing values None
    summary: dict[str, Any] | None
    evaluation: dict[str, Any] | None  # eval.json

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.name)

    @property
    def is_standard(self) -> bool:
        """Standard training (``loss=ce``, no attack): a measuring classifier, not an adversarial run."""
        return self.config.get("loss") == "ce"

    @property
    def selected_by(self) -> str:
        """What picked the best epoch: validation PGD (the reference) or clean accuracy (``eval.select=clean``)."""
        return "clean accuracy" if (self.config.get("eval") or {}).get("select") == "clean" else "validation PGD"

    @property
    def is_edm(self) -> bool:
        """An EDM (generator) run of robustdiff-edm rather than a TRADES run."""
        return is_edm_config(self.config)


def is_edm_config(config: dict[str, Any]) -> bool:
    """run.json of robustdiff-edm: it describes a network (preset and constructor kwargs), not a threat model."""
    return "kwargs" in config and "network" in config and "norm" not in config


def find_runs(path: str | os.PathLike) -> list[Path]:
    """Run directories at or below ``path`` (those holding run.json), sorted."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    if (path / "run.json").is_file():
        return [path]
    runs = sorted(p.parent for p in path.rglob("run.json") if p.is_file())
    if not runs:
        raise FileNotFoundError(f"no run directories (with run.json) at or below {path}")
    return runs


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _cell(value: str) -> Any:
    value = value.strip()
    if value == "" or value.lower() in ("none", "nan", "null"):
        return None
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and re.fullmatch(r"-?\d+", value) else number


def read_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """history.json (a list of rows, or {'rows': [...]}) or else history.csv; NaN and empty cells become None."""
    run_dir = Path(run_dir)
    if (run_dir / "history.json").is_file():
        rows = _read_json(run_dir / "history.json")
        rows = rows.get("rows", []) if isinstance(rows, dict) else rows
    elif (run_dir / "history.csv").is_file():
        with open(run_dir / "history.csv", newline="") as f:
            rows = [{k: _cell(v or "") for k, v in row.items()} for row in csv.DictReader(f)]
    else:
        return []
    clean = []
    for row in rows:
        clean.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return sorted(clean, key=lambda r: r.get("epoch") or 0)


def load_run(run_dir: str | os.PathLike) -> Run:
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "run.json")
    summary = _read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else None
    evaluation = _read_json(run_dir / "eval.json") if (run_dir / "eval.json").is_file() else None
    return Run(run_dir, config, read_history(run_dir), summary, evaluation)


# --- plots -------------------------------------------------------------------------------------------

def _series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in history:
        if row.get(key) is not None and row.get("epoch") is not None:
            xs.append(row["epoch"])
            ys.append(100 * float(row[key]))
    return xs, ys


def _title(run: Run) -> str:
    c = run.config
    norm = c.get("norm") or {}
    eps = f" ε={format_eps(norm['eps'])}" if norm.get("eps") else ""
    kind = ", standard training (loss=ce, no attack), best epoch by clean accuracy" if run.is_standard else ""
    return (f"{run.name}: {c.get('dataset', '?')} {norm.get('name', '?')}{eps}, ratio {c.get('ratio', '?')}, "
            f"{format_count(c.get('n_generated'))} generated{kind}")


def wrap(title: str, fig_width_in: float, fontsize: float = 9) -> str:
    """``title`` broken into lines that fit a figure ``fig_width_in`` inches wide (≈ 0.55·fontsize pt a
    character), so that long titles are never clipped."""
    chars = max(20, int(fig_width_in * 72 / (0.55 * fontsize)) - 4)
    return "\n".join(textwrap.wrap(title, chars, break_long_words=True, break_on_hyphens=False)) or title


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save(fig, out_png: str | os.PathLike) -> Path:
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png


def curve_styles(run: Run) -> list[tuple[str, str, str, str, str | None]]:
    """(history field, legend label, colour, line style, marker) of each curve of a run's figure."""
    pgd = f"PGD-{pgd_steps(run)}" if pgd_steps(run) else "PGD"
    styles = [("test_clean_acc", "clean (test)", "tab:blue", "-", None),
              ("val_pgd_acc", f"{pgd} (validation)", "tab:red", "-", None),
              ("test_pgd_acc", f"{pgd} (test)", "tab:red", "none", "o")]
    if run.selected_by == "clean accuracy":
        styles.append(("val_clean_acc", "clean (validation, selects the epoch)", "tab:green", "-", None))
    if not run.is_standard:  # a standard run trains on clean images: it has no adversarial training accuracy
        styles.append(("train_acc_adv", "adversarial (train)", "tab:gray", ":", None))
    return styles


def plot_training_curves(run: Run, out_png: str | os.PathLike) -> Path:
    """Clean test accuracy, validation and test PGD accuracy per epoch, best epoch marked. Writes a PNG."""
    from matplotlib.ticker import MaxNLocator

    fig, (ax,) = _figure(7.5, 4.2)
    for key, label, color, line, marker in curve_styles(run):
        xs, ys = _series(run.history, key)
        if xs:
            ax.plot(xs, ys, label=label, color=color, linestyle=line, marker=marker, markersize=4)
    best = (run.summary or {}).get("best_epoch")
    if best is None:
        best = next((r["epoch"] for r in reversed(run.history) if r.get("is_best")), None)
    if best is not None:
        by = " by clean accuracy" if run.selected_by == "clean accuracy" else ""
        ax.axvline(best, color="tab:green", linestyle="--", linewidth=1, label=f"best epoch ({best}){by}")
        xs, ys = _series(run.history, "val_clean_acc" if by else "val_pgd_acc")
        if best in xs:
            ax.plot([best], [ys[xs.index(best)]], marker="*", color="tab:green", markersize=12, linestyle="none")
    s = run.summary or {}
    if s.get("test_pgd_acc_best") is not None and s.get("test_pgd_acc_last") is not None:
        gap = 100 * (s["test_pgd_acc_best"] - s["test_pgd_acc_last"])
        ax.text(0.99, 0.02, f"test PGD best − last: {gap:+.2f} points", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(wrap(_title(run), 7.5), fontsize=9)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="best")
    return _save(fig, out_png)


# --- sweeps ------------------------------------------------------------------------------------------

# run.json fields that tell runs apart when they predate run.json's "identity" (flat config without the keys
# that may change on resume).
_LEGACY_IDENTITY = ("dataset", "model", "norm", "loss", "generated", "ratio", "generated_sampling", "epochs",
                    "batch_size", "lr", "beta", "seed", "limit_train", "val_size")
_NOISE = ("name", "data_dir", "generated_quality")  # never the point of a sweep


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    if isinstance(config.get("identity"), dict):
        return dict(config["identity"])
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}")
        else:
            flat[prefix] = node

    for key in _LEGACY_IDENTITY:
        walk(config.get(key), key)
    return flat


def swept_settings(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """{run path: {setting: value}} of the settings that differ between ``runs`` (what a sweep varied), from
    run.json's identity."""
    flats = {str(r.path): {k: v for k, v in _flat(r.config).items() if k.split(".")[0] not in _NOISE} for r in runs}
    keys = sorted({k for f in flats.values() for k in f})
    varied = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats.values()}) > 1]
    return {path: {k: f.get(k) for k in varied} for path, f in flats.items()}


def _legend(settings: dict[str, Any], fallback: str) -> str:
    def short(key: str, v: Any) -> str:
        if isinstance(v, float):
            text = format_eps(v) if key.split(".")[-1] in ("eps", "step") else f"{v:g}"
        else:
            text = str(v)
        return text if len(text) <= 24 else "…" + text[-23:]  # a store's path: its last part tells them apart

    parts = [f"{k}={short(k, v)}" for k, v in settings.items()]
    return ", ".join(parts) if parts else fallback


def plot_sweep(runs: Sequence[Run], out_png: str | os.PathLike, title: str = "") -> Path:
    """Validation PGD (left) and test PGD (right) accuracy per epoch, one line per run (same colour in both
    panels), labelled by the swept settings; ★ marks each run's best epoch. Writes a PNG."""
    from matplotlib.ticker import MaxNLocator

    settings = swept_settings(runs)
    fig, axes = _figure(11, 4.6, ncols=2)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for run, colour in zip(runs, colours):
        label = _legend(settings[str(run.path)], run.name)
        xs, ys = _series(run.history, "val_pgd_acc")
        axes[0].plot(xs, ys, color=colour, label=label, marker=".", markersize=4)
        best = (run.summary or {}).get("best_epoch")
        if best in xs:
            axes[0].plot([best], [ys[xs.index(best)]], marker="*", color=colour, markersize=11, linestyle="none")
        xs, ys = _series(run.history, "test_pgd_acc")
        axes[1].plot(xs, ys, color=colour, label=label, marker="o", markersize=4)
    if axes[0].has_data():  # the same epoch axis in both panels (test PGD is sparse: every test_every epochs)
        axes[1].set_xlim(axes[0].get_xlim())
    steps = {pgd_steps(r) for r in runs}
    pgd = f"PGD-{steps.pop()}" if len(steps) == 1 and None not in steps else "PGD"
    for ax, split in zip(axes, ("validation", "test")):
        ax.set_title(f"{pgd} accuracy ({split})", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(wrap(title or f"sweep of {len(runs)} runs", 11, 10), fontsize=10)
    fig.tight_layout()
    if handles:  # below the panels, in as many columns as fit: long labels never cover the curves
        ncol = max(1, min(len(handles), int(11 * 72 / (0.55 * 8) // max(len(t) + 6 for t in labels))))
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        rows = -(-len(handles) // ncol)
        fig.subplots_adjust(bottom=0.12 + 0.05 * rows)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png


# --- EDM runs ----------------------------------------------------------------------------------------

def edm_losses(run_dir: str | os.PathLike) -> tuple[list[float], list[float]]:
    """(kimg, training loss) per logged step from ``csv/version_*/metrics.csv`` (logger=csv; a resumed run adds
    a version), sorted by kimg, later versions winning; empty without a CSV log."""
    by_kimg: dict[float, float] = {}
    versions = sorted(Path(run_dir).glob("csv/version_*/metrics.csv"),
                      key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
    for path in versions:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                loss, kimg = _cell(row.get("train/loss") or ""), _cell(row.get("kimg") or "")
                if isinstance(loss, (int, float)) and isinstance(kimg, (int, float)):
                    by_kimg[float(kimg)] = float(loss)
    kimgs = sorted(by_kimg)
    return kimgs, [by_kimg[k] for k in kimgs]


def sample_grids(run_dir: str | os.PathLike) -> list[Path]:
    """``samples/grid-<kimg>.png`` of an EDM run, oldest first (the names are zero-padded, so they sort)."""
    return sorted(Path(run_dir).glob("samples/grid-*.png"))


def plot_edm_losses(runs: Sequence[Run], out_png: str | os.PathLike) -> Path | None:
    """Training loss vs kimg, one line per EDM run (thin: per logged step; thick: running mean over ~5 % of the
    run). None when no run has a CSV log."""
    curves = [(run, *edm_losses(run.path)) for run in runs]
    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    fig, (ax,) = _figure(7.5, 4.2)
    for i, (run, xs, ys) in enumerate(curves):
        colour = f"C{i % 10}"
        ax.plot(xs, ys, color=colour, alpha=0.3, linewidth=0.8)
        k = max(1, len(ys) // 20)
        mean = [sum(ys[max(0, j - k + 1):j + 1]) / len(ys[max(0, j - k + 1):j + 1]) for j in range(len(ys))]
        ax.plot(xs, mean, color=colour, linewidth=1.8, label=run.name)
    ax.set_xlabel("training images (kimg)")
    ax.set_ylabel("EDM loss")
    low, high = min(min(ys) for _, _, ys in curves), max(max(ys) for _, _, ys in curves)
    if low > 0 and high / low > 10:  # the first steps' loss is often orders of magnitude above the rest
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(wrap("EDM training loss: " + ", ".join(r.name for r, _, _ in curves), 7.5), fontsize=9)
    return _save(fig, out_png)


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


def pgd_steps(run: Run) -> int | None:
    """Steps of the PGD that scored the run during training (run.json's eval.steps); None for runs written
    before run.json recorded it."""
    steps = (run.config.get("eval") or {}).get("steps")
    return int(steps) if steps is not None else None


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
                    edm_loss_figure: str | None = None) -> str:
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
                           edm_rows=edm_rows, edm_loss_figure=os.path.relpath(edm_png, out_dir) if edm_png else None)
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
