"""The report of a study that lists its arms, written from the v2 study's kept results
(experiments/study/results/fmnist_v2: real run.json / history.json / eval.json files, no model weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from robustdiff.cli.study import main as study_main
from robustdiff.evaluation.arms_report import best_generator, collect, same_generator_pairs, store_points
from robustdiff.study.spec import load_study

ROOT = Path(__file__).resolve().parents[1]
V2 = ROOT / "experiments" / "study" / "fmnist_v2.yaml"
KEPT = ROOT / "experiments" / "study" / "results" / "fmnist_v2"


@pytest.fixture
def study_dir(tmp_path):
    out = tmp_path / "v2"
    out.mkdir()
    for part in ("runs", "quality"):
        shutil.copytree(KEPT / part, out / part)
    shutil.copy(KEPT / "study.yaml", out / "study.yaml")
    return out


def test_the_kept_results_rewrite_the_report_with_generator_quality_in_every_row(study_dir, capsys):
    assert study_main([str(V2), "--out", str(study_dir), "--report-only"]) == 0
    assert f"wrote {study_dir / 'report.md'}" in capsys.readouterr().out
    report = (study_dir / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| arm |"))
    assert "| classifier FD | label agreement | generated images |" in header
    quality = json.loads((KEPT / "quality" / "best-10k.json").read_text())
    best_row = next(line for line in report.splitlines() if line.startswith("| best-10k-s0 |"))
    assert f"| {quality['value']:.3f} | {100 * quality['label_agreement']:.2f} | 10,000 |" in best_row
    real_row = next(line for line in report.splitlines() if line.startswith("| real-s0 |"))
    assert "| none | — | — | 0 |" in real_row
    # the study's own comparisons at one generator: 5,000 vs 10,000 of its images
    assert "AutoAttack, raw-200kimg (1 seed(s)) vs best-10k" in report and "both from edm-200kimg" in report
    for png in ("pgd_vs_epoch.png", "aa_vs_fd.png", "aa_vs_amount.png"):
        assert (study_dir / "figures" / png).stat().st_size > 10_000


def test_amount_points_hold_the_generator_fixed_and_average_the_seeds(study_dir):
    data = collect(study_dir, load_study(V2, study_dir))
    assert best_generator(data) == "edm-200kimg"  # the lowest-FD raw store's generator, not a selected store's
    amount = {p["store"]: p for p in store_points(data, "n_generated", best_generator(data))}
    assert "raw-100kimg" not in amount and "raw-200kimg" in amount  # another generator's store stays out
    seeds = [r["aa"] for r in data["rows"] if r["store"] == "best-10k" and r["finished"]]
    assert len(seeds) >= 2 and amount["best-10k"]["n"] == len(seeds)
    assert amount["best-10k"]["mean"] == pytest.approx(sum(seeds) / len(seeds))
    one = next(p for p in store_points(data, "fd") if p["store"] == "raw-200kimg")
    assert amount["best-10k"]["se"] < one["se"]  # the mean of several seeds has the smaller error
    pairs = same_generator_pairs(data, list(data["quality"]))
    assert ("raw-200kimg", "best-10k") in pairs and ("raw-200kimg", "best-selected") in pairs
    assert not any("raw-100kimg" in p for p in pairs)
