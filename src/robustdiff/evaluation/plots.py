"""Figures of a report: each run's training curves (the robust-overfitting view), the sweep overlay and the
EDM training loss, written as PNG files.

Accuracies are fractions in the run files; the figures show percentages. matplotlib is imported only when a
figure is drawn.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..utils.io import atomic_path
from .results import format_count, format_eps
from .runs import Run, edm_losses, pgd_steps, swept_settings


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

def _legend(settings: dict[str, Any], fallback: str) -> str:
    def short(key: str, v: Any) -> str:
        if isinstance(v, float):
            text = format_eps(v) if key.split(".")[-1] in ("eps", "step") else f"{v:g}"
        else:
            text = str(v)
        if "/" in text.rstrip("/"):  # a store's path: its last two parts tell them apart
            text = "/".join(Path(text).parts[-2:])
        return text if len(text) <= 32 else text[:31] + "…"

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
