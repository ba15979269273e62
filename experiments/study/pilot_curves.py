"""Plot the robust-overfitting pilot: test PGD, validation PGD and train robust accuracy against the epoch for
each pilot run, and write the figure with a copy of each run's history.json beside it.

    python experiments/study/pilot_curves.py RUN_DIR [RUN_DIR ...] --out experiments/study/results/pilot
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in args.runs:
        history = json.loads((run / "history.json").read_text())
        cfg = json.loads((run / "run.json").read_text())
        label = f"{run.name}: {cfg.get('model', {}).get('name', '?')}, ε={cfg.get('norm', {}).get('eps', '?')}"
        tested = [r for r in history if r.get("test_pgd_acc") is not None]
        axes[0].plot([r["epoch"] for r in tested], [100 * r["test_pgd_acc"] for r in tested], marker="o", ms=3,
                     label=label)
        axes[1].plot([r["epoch"] for r in history], [100 * r["val_pgd_acc"] for r in history], lw=0.8, label=label)
        axes[2].plot([r["epoch"] for r in history], [100 * r["train_acc_adv"] for r in history], lw=0.8, label=label)
        shutil.copyfile(run / "history.json", args.out / f"{run.name}.history.json")
    for ax, title in zip(axes, ("test PGD-10 (first 1,000 test images)", "validation PGD-10 (256 images)",
                                "train robust accuracy (TRADES batches)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "pilot_curves.png", dpi=110)
    print(args.out / "pilot_curves.png")


if __name__ == "__main__":
    main()
